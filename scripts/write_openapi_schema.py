"""Write .cog/openapi_schema.json for predict.py:Predictor, as `cog build` does inside the image.

The Cog runtime validates inputs against this file and serves it at /openapi.json; without the Go
CLI (tests, CI) it has to be written by hand. It is built from the SDK's own introspection of the
predictor (`cog._inspector`), so names, types, choices, defaults and bounds come from predict.py.

    python scripts/write_openapi_schema.py [--predictor predict.py:Predictor] [--out .cog/openapi_schema.json]
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def input_property(field) -> dict:
    prop = {"title": field.name.replace("_", " ").title(), "x-order": field.order}
    prop.update(field.type.json_type())
    if field.choices is not None:
        prop["enum"] = list(field.choices)
    if field.description:
        prop["description"] = field.description
    if field.default is not None:
        prop["default"] = field.type.json_encode(field.default) if hasattr(field.type, "json_encode") else field.default
    bounds = {"minimum": field.ge, "maximum": field.le, "minLength": field.min_length,
              "maxLength": field.max_length, "pattern": field.regex}
    integer = prop.get("type") == "integer"
    prop.update({key: int(value) if integer and key in ("minimum", "maximum") else value
                 for key, value in bounds.items() if value is not None})
    return prop


def build_schema(module: str, cls: str) -> dict:
    from cog._inspector import create_predictor

    info = create_predictor(module, cls)
    fields = sorted(info.inputs.values(), key=lambda f: f.order)
    input_schema = {
        "title": "Input",
        "type": "object",
        "properties": {f.name: input_property(f) for f in fields},
        "required": [f.name for f in fields if f.default is None and not _optional(f)],
    }
    status = {"title": "Status", "type": "string",
              "enum": ["starting", "processing", "succeeded", "canceled", "failed"]}
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {
            "/predictions": {"post": {
                "summary": "Predict",
                "requestBody": {"content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/PredictionRequest"}}}},
                "responses": {"200": {"description": "Successful Response", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/PredictionResponse"}}}}},
            }},
        },
        "components": {"schemas": {
            "Input": input_schema,
            "Output": info.output.json_type(),
            "Status": status,
            "PredictionRequest": {"title": "PredictionRequest", "type": "object", "properties": {
                "id": {"title": "Id", "type": "string"},
                "input": {"$ref": "#/components/schemas/Input"},
                "webhook": {"title": "Webhook", "type": "string", "format": "uri"},
            }},
            "PredictionResponse": {"title": "PredictionResponse", "type": "object", "properties": {
                "id": {"title": "Id", "type": "string"},
                "input": {"$ref": "#/components/schemas/Input"},
                "output": {"$ref": "#/components/schemas/Output"},
                "status": {"$ref": "#/components/schemas/Status"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string", "default": ""},
                "metrics": {"title": "Metrics", "type": "object"},
            }},
        }},
    }


def _optional(field) -> bool:
    return "OPTIONAL" in str(getattr(field.type, "repetition", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictor", default="predict.py:Predictor")
    parser.add_argument("--out", type=Path, default=REPO / ".cog" / "openapi_schema.json")
    args = parser.parse_args()
    module_file, cls = args.predictor.split(":")
    sys.path.insert(0, str(REPO))
    schema = build_schema(Path(module_file).stem, cls)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(schema, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
