"""What one page costs each model, counted instead of timed: DeepSeek-OCR and DeepSeek-OCR 2 side by side.

For one A4 page (`common.a4_page`) under each model's preset (Gundam by default, as the engine benchmarks run):
- the views and pixels the preprocessing makes of it (the models' own `prepare_inputs`);
- the vision FLOPs, split by part (SAM, the stage-2 encoder: CLIP-L for the first model, the Qwen2 encoder with
  its prefix-LM mask for OCR 2; the projector) and by view (global view, tiles), counted with
  `torch.utils.flop_counter.FlopCounterMode` while each model, built at full size on the meta device, encodes
  the page's views: only shapes flow, so nothing is allocated and nothing is computed. SDPA counts as the
  matrix products of its math form, masked positions included, as the CUDA kernels are counted (on CPU
  tensors its fused kernel would not be counted at all);
- the prompt's tokens (image tokens + text, BOS included) and the decoder's prefill FLOPs for that prompt
  (`bench_vision.prefill_flops`, from the decoder's shapes);
- the decode cost of one generated token at the page's mean position (prompt + half the generated tokens): the
  KV bytes one step reads for the row, and the row's share of one step's floor at `--rows` rows
  (`bench_engine.step_floor_bytes`: KV, the experts the batch routes to, the dense weights).

Then each stage of a page job (encode, prefill, decode) is scaled by its work ratio, weighted by the first
model's busy seconds in a measured job (`--ocr1-job`, a bench_engine JSON; `--ocr2-job` adds the measured
OCR 2 seconds beside the prediction), for the pages/s ratio to expect if time followed work: once with the
stages in series, once with the vision worker beside the decoder (the engine encodes in its own thread:
the job's time is the longer of encode and prefill + decode).

Runs on the CPU in seconds:
    python benchmarks/page_cost.py [--json page-cost.json]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_engine import step_floor_bytes  # noqa: E402
from benchmarks.bench_vision import prefill_flops  # noqa: E402
from benchmarks.common import MODEL_CLASSES, MODEL_PRESETS, PROMPT, STAGE_TWO_ENCODERS, a4_page  # noqa: E402
from scripts.make_random_checkpoint import make_config, write_tokenizer  # noqa: E402

MODELS = ("ocr", "ocr2")
RESULTS = REPO / "benchmarks" / "results" / "h200-2026-11-30"
VISION_PARTS = ("sam", "stage-2 encoder", "projector")
ATTENTION_PARTS = ("sam", "stage-2 encoder")


def build_on_meta(model: str, size: str = "full"):
    """The model of the official config (`size` "full"; "tiny" for a test), its tensors on the meta device."""
    model_class = MODEL_CLASSES[model]
    with torch.device("meta"):
        return model_class(model_class.config_class(**make_config(size, model))).eval()


def random_tokenizer():
    """The tokenizer of the benchmarks' random checkpoints (its added tokens are the official ones)."""
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(Path(folder))
        return PreTrainedTokenizerFast.from_pretrained(folder)


def vision_flops_by_part(model, model_name: str, views) -> dict:
    """FLOPs of encoding one image's views (`ImageViews`), as "part, view kind" → FLOPs for the parts of
    VISION_PARTS and the view kinds "global" and "tiles" ("part attention, kind": the part's batched matrix
    products, for the parts of ATTENTION_PARTS), plus "total, global" and "total, tiles". The views
    go to the model's device first (meta: counted from shapes alone)."""
    inner = model.model
    modules = {"sam": inner.sam_model, "stage-2 encoder": getattr(inner, STAGE_TWO_ENCODERS[model_name][0]),
               "projector": inner.projector}
    flops = {}
    for kind, pixels in (("global", views.global_view[None]), ("tiles", views.tiles)):
        counter = FlopCounterMode(display=False)
        if pixels is not None:
            with counter, torch.inference_mode():
                inner.encode_views(pixels.to(inner.vision_device))
        by_module = counter.get_flop_counts()  # a module called on its own is named by its class
        for part, module in modules.items():
            by_op = by_module.get(type(module).__name__, {})
            flops[f"{part}, {kind}"] = sum(by_op.values())
            if part in ATTENTION_PARTS:  # their batched products are attention's QK and PV (SAM's: and its
                # relative-position terms); their linear layers run as addmm/mm
                flops[f"{part} attention, {kind}"] = by_op.get(torch.ops.aten.bmm, 0)
        flops[f"total, {kind}"] = counter.get_total_flops()
    return flops


def page_cost(model_name: str, page, tokenizer, preset: str = "Gundam", size: str = "full", generated: int = 1024,
              rows: int = 128) -> dict:
    model = build_on_meta(model_name, size)
    base_size, image_size, crop_mode = MODEL_PRESETS[model_name][preset]
    inputs = model.prepare_inputs(tokenizer, PROMPT, [page], base_size, image_size, crop_mode)
    views = inputs.images[0]
    tiles = views.tiles.shape[0] if views.has_tiles else 0
    vision = vision_flops_by_part(model, model_name, views)
    prompt_tokens = int(inputs.input_ids.numel())
    image_tokens = int(inputs.image_mask.sum())
    positions = prompt_tokens + generated // 2
    config = model.config
    one_row, all_rows = step_floor_bytes(config, 1, positions), step_floor_bytes(config, rows, positions)
    return {
        "model": model_name, "preset": preset, "size": size, "page": list(page.size),
        "global_view": views.global_view.shape[-1], "tile_size": views.tiles.shape[-1] if tiles else None,
        "tiles": tiles, "grid": list(views.grid), "views": 1 + tiles,
        "pixels": views.global_view[0].numel() + (views.tiles[:, 0].numel() if tiles else 0),
        "vision_flops": vision, "vision_flops_total": vision["total, global"] + vision["total, tiles"],
        "image_tokens": image_tokens, "text_tokens": prompt_tokens - image_tokens, "prompt_tokens": prompt_tokens,
        "prefill_flops": prefill_flops(config, [prompt_tokens]),
        "decode_positions": positions, "rows": rows,
        "kv_bytes_per_position": one_row["kv"] / positions,
        "decode_kv_bytes_per_row_step": one_row["kv"],
        "decode_step_bytes_per_row": all_rows["total"] / rows,
    }


def job_busy_seconds(path: Path):
    """busy seconds by stage (encode, prefill, decode) and pages/s of the page job in a bench_engine JSON."""
    if path is None or not path.exists():
        return None
    job = json.loads(path.read_text()).get("ours", {}).get("job")
    return {"busy_s": job["busy_s"], "pages_s": job["pages_s"]} if job and "busy_s" in job else None


# Which count each stage's time is taken to follow.
STAGE_WORK = {"encode": "vision_flops_total", "prefill": "prefill_flops", "decode": "decode_step_bytes_per_row"}


def predict(first: dict, second: dict, measured_first: dict, measured_second=None) -> dict:
    """Each stage's busy seconds of the first model's job scaled by the stage's work ratio → the pages/s ratio
    (OCR 2 / OCR 1) to expect, stages in series and with encode beside prefill + decode."""
    busy = measured_first["busy_s"]
    ratio = {stage: second[key] / first[key] for stage, key in STAGE_WORK.items()}
    scaled = {stage: busy[stage] * ratio[stage] for stage in STAGE_WORK}
    overlapped = lambda s: max(s["encode"], s["prefill"] + s["decode"])  # noqa: E731
    out = {"work_ratio": ratio, "ocr1_busy_s": busy, "ocr2_predicted_busy_s": scaled,
           "pages_s_ratio_serial": sum(busy[s] for s in STAGE_WORK) / sum(scaled.values()),
           "pages_s_ratio_overlapped": overlapped(busy) / overlapped(scaled)}
    if measured_second is not None:
        out["ocr2_measured_busy_s"] = measured_second["busy_s"]
        out["pages_s_ratio_measured"] = measured_second["pages_s"] / measured_first["pages_s"]
    return out


def markdown(first: dict, second: dict, prediction=None) -> str:
    def ratio(a, b):
        return f"{b / a:.2f}" if a else "–"

    def views_text(cost):
        tiles = f" + {cost['tiles']} × {cost['tile_size']}²" if cost["tiles"] else ""
        return f"{cost['global_view']}²{tiles}"

    g = 1e9
    rows = [("views a page (global + tiles)", views_text(first), views_text(second), ratio(first["views"], second["views"])),
            ("pixels a page, M", f"{first['pixels'] / 1e6:.2f}", f"{second['pixels'] / 1e6:.2f}",
             ratio(first["pixels"], second["pixels"]))]
    labels = {"sam": "SAM", "stage-2 encoder": "stage-2 encoder (CLIP-L / Qwen2 encoder)", "projector": "projector"}
    for part in VISION_PARTS:
        for kind in ("global", "tiles"):
            for key, what in ((f"{part}, {kind}", ""), (f"{part} attention, {kind}", "  of which attention products")):
                if key not in first["vision_flops"]:
                    continue
                a, b = first["vision_flops"][key], second["vision_flops"][key]
                label = what or f"vision GFLOP: {labels[part]}, {'global view' if kind == 'global' else 'tiles'}"
                rows.append((label, f"{a / g:.1f}", f"{b / g:.1f}", ratio(a, b)))
    a, b = first["vision_flops_total"], second["vision_flops_total"]
    rows.append(("**vision GFLOP a page**", f"{a / g:.1f}", f"{b / g:.1f}", f"**{ratio(a, b)}**"))
    for key, label in (("image_tokens", "image tokens"), ("text_tokens", "text tokens (BOS + prompt)"),
                       ("prompt_tokens", "**prompt tokens**")):
        rows.append((label, str(first[key]), str(second[key]), ratio(first[key], second[key])))
    a, b = first["prefill_flops"], second["prefill_flops"]
    rows.append(("**prefill GFLOP a page** (decoder, from its shapes)", f"{a / g:.1f}", f"{b / g:.1f}",
                 f"**{ratio(a, b)}**"))
    rows.append(("decode: mean position (prompt + generated / 2)", str(first["decode_positions"]),
                 str(second["decode_positions"]), ratio(first["decode_positions"], second["decode_positions"])))
    a, b = first["decode_kv_bytes_per_row_step"], second["decode_kv_bytes_per_row_step"]
    rows.append((f"decode: KV MB read a step a row ({first['kv_bytes_per_position'] / 1e3:.1f} kB a position)",
                 f"{a / 1e6:.1f}", f"{b / 1e6:.1f}", ratio(a, b)))
    a, b = first["decode_step_bytes_per_row"], second["decode_step_bytes_per_row"]
    rows.append((f"**decode: MB a step a row at {first['rows']} rows** (KV + weights ÷ rows)", f"{a / 1e6:.1f}",
                 f"{b / 1e6:.1f}", f"**{ratio(a, b)}**"))
    lines = [f"One {first['page'][0]} × {first['page'][1]} page, {first['preset']}, {first['size']} size "
             "(counted on the meta device)", "", "| per page | DeepSeek-OCR | DeepSeek-OCR 2 | OCR2/OCR1 |",
             "|---|---|---|---|"]
    lines += [f"| {label} | {a} | {b} | {r} |" for label, a, b, r in rows]
    if prediction:
        measured = prediction.get("ocr2_measured_busy_s")
        lines += ["", "| job stage | work ratio (what it follows) | OCR 1 busy s | OCR 2 predicted busy s | "
                  "OCR 2 measured busy s | measured ratio |", "|---|---|---|---|---|---|"]
        for stage, key in STAGE_WORK.items():
            busy, scaled = prediction["ocr1_busy_s"][stage], prediction["ocr2_predicted_busy_s"][stage]
            seen = f"{measured[stage]:.2f} | {measured[stage] / busy:.2f}" if measured else "– | –"
            lines.append(f"| {stage} | {prediction['work_ratio'][stage]:.2f} ({key}) | {busy:.2f} | {scaled:.2f} | "
                         f"{seen} |")
        lines += ["", f"pages/s ratio OCR2/OCR1 if time followed work: {prediction['pages_s_ratio_serial']:.3f} "
                  "(stages in series), "
                  f"{prediction['pages_s_ratio_overlapped']:.3f} (encode beside prefill + decode)"]
        if "pages_s_ratio_measured" in prediction:
            lines[-1] += f"; measured: {prediction['pages_s_ratio_measured']:.3f}"
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["full", "tiny"], default="full",
                        help="model size: full (the official configs) or tiny (a test of the script)")
    parser.add_argument("--preset", default="Gundam", choices=sorted(set(MODEL_PRESETS["ocr"]) & set(MODEL_PRESETS["ocr2"])))
    parser.add_argument("--page", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"),
                        help="the page's size in pixels (default: common.a4_page's, A4 at 150 dpi)")
    parser.add_argument("--generated", type=int, default=1024, help="tokens generated a page")
    parser.add_argument("--rows", type=int, default=128, help="decode rows sharing a step's weight reads")
    parser.add_argument("--ocr1-job", type=Path, default=RESULTS / "engine-ocr1-job.json",
                        help="bench_engine JSON of the first model's page job: its busy seconds weigh the stages")
    parser.add_argument("--ocr2-job", type=Path, default=RESULTS / "engine-ocr2.json",
                        help="bench_engine JSON of OCR 2's page job: measured beside predicted")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    page, tokenizer = a4_page(*args.page) if args.page else a4_page(), random_tokenizer()
    costs = {name: page_cost(name, page, tokenizer, args.preset, args.size, args.generated, args.rows)
             for name in MODELS}
    measured_first = job_busy_seconds(args.ocr1_job)
    prediction = (predict(costs["ocr"], costs["ocr2"], measured_first, job_busy_seconds(args.ocr2_job))
                  if measured_first else None)
    print(markdown(costs["ocr"], costs["ocr2"], prediction))
    report = {"costs": costs, "prediction": prediction,
              "jobs": {"ocr1": str(args.ocr1_job), "ocr2": str(args.ocr2_job)} if prediction else None}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
