"""predict.py as `cog build` reads it: literal choices, defaults, bounds and concurrency, equal to the
values the service uses; and Cog's current runner API, nothing it calls deprecated."""

import ast
import inspect
import warnings
from pathlib import Path

import predict
from ocr_service import presets
from ocr_service.engine import MAX_NEW_TOKENS
from ocr_service.settings import Settings

SOURCE = (Path(__file__).resolve().parent.parent / "predict.py").read_text(encoding="utf-8")


def input_of(name: str):
    return inspect.signature(predict.Predictor.run).parameters[name].default


def test_the_literals_are_the_services_values():
    assert predict.TASK_TYPES == list(presets.TASK_TYPES)
    assert predict.RESOLUTIONS == list(presets.RESOLUTIONS)
    assert input_of("task_type").default == presets.DEFAULT_TASK_TYPE
    assert input_of("resolution_size").default == presets.DEFAULT_RESOLUTION
    assert input_of("max_new_tokens").default == MAX_NEW_TOKENS
    assert predict.Predictor.run.__cog_concurrent_max__ == Settings.from_env({}).concurrency


def test_cog_build_can_read_them_without_running_the_file():
    tree = ast.parse(SOURCE)
    method = next(node for node in ast.walk(tree) if isinstance(node, ast.AsyncFunctionDef) and node.name == "run")
    decorator = method.decorator_list[0]
    assert isinstance(decorator.keywords[0].value, ast.Constant)  # @concurrent(max=<int literal>)
    for call in (d for d in method.args.defaults if isinstance(d, ast.Call)):
        for keyword in call.keywords:
            if keyword.arg in ("default", "ge", "le"):
                assert isinstance(keyword.value, ast.Constant), keyword.arg
            if keyword.arg == "choices":  # a list literal, or a module-level list literal of predict.py
                value = keyword.value
                if isinstance(value, ast.Name):
                    value = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                                 and n.targets[0].id == value.id)
                assert isinstance(value, ast.List) and all(isinstance(e, ast.Constant) for e in value.elts)


def test_cog_finds_run_on_a_runner_without_deprecation_warnings():
    from cog import BaseRunner
    from cog._inspector import create_predictor

    assert issubclass(predict.Predictor, BaseRunner) and "predict" not in vars(predict.Predictor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = create_predictor("predict", "Predictor")  # what the server and the schema writer call
    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []
    assert list(info.inputs) == ["image", "task_type", "reference_text", "resolution_size", "pages", "max_new_tokens"]
