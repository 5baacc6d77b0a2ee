"""Settings: one object read from the environment, every variable documented, bad values named."""

import re
from pathlib import Path

import pytest

from ocr_service.inputs import Limits
from ocr_service.settings import ENVIRONMENT_VARIABLES, Settings, SettingsError, available_cores
from ocr_service.weights import DEFAULT_URL

README = Path(__file__).resolve().parent.parent / "README.md"


def test_defaults_on_the_cpu():
    settings = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cpu"})
    assert settings.device == "cpu" and settings.dtype == "float32" and settings.engine == "batched"
    assert settings.max_rows == 8 and settings.preprocess_workers == 1
    assert settings.repetition_rule == "serving" and settings.stop_loops and settings.rotary == "float32"
    assert settings.limits == Limits()
    assert settings.weights_source == {"url": DEFAULT_URL, "local_dir": None, "offline": False}
    assert settings.concurrency == 64 and settings.request_timeout_s == 900


def test_defaults_on_a_gpu():
    settings = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cuda"})
    assert settings.dtype == "bfloat16" and settings.max_rows is None and settings.gpu_memory_gib is None
    # every SAM block through the Triton kernel; the GELU kernel, whose first-step logits were further from float32
    # than the original's, stays opt-in
    assert settings.sam_kernel == "all" and settings.sam_gelu == "epilogue"
    # SAM's windows over the grid as it is, their padding made up in the window kernel (rounding a few values
    # differently, within the original's distance from float32 over 16 pages); the grid padded first is opt-in
    assert settings.sam_window_padding == "kernel"
    # the prefill replayed as CUDA graphs (its in-job figure steady whatever the host does); called, opt-in
    assert settings.prefill_graphs
    assert not Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cuda", "DEEPSEEK_OCR_PREFILL_GRAPHS": "0"}).prefill_graphs


def test_rows_and_memory_follow_the_card_unless_set():
    gib = 2**30
    default = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cuda"})
    assert default.rows_and_budget(80 * gib) == (128, 40.0)  # an 80 GB card, and smaller ones
    assert default.rows_and_budget(141 * gib) == (256, 110.0)  # an H200: the measured faster setting
    assert Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cpu"}).rows_and_budget(None)[0] == 8
    chosen = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cuda", "DEEPSEEK_OCR_MAX_ROWS": "64",
                                "DEEPSEEK_OCR_GPU_MEMORY_GIB": "30"})
    assert chosen.rows_and_budget(141 * gib) == (64, 30.0) and chosen.rows_and_budget(24 * gib) == (64, 30.0)


def test_preprocessing_fits_in_the_cpus_the_process_may_use():
    # A Ray engine, or a container limited to a few cores, sizes its pool from its share, not the host.
    settings = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cuda", "DEEPSEEK_OCR_CPUS": "6"})
    assert settings.cpus == 6 and settings.preprocess_workers == 4
    assert Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cuda", "DEEPSEEK_OCR_CPUS": "2"}).preprocess_workers == 1
    assert Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cuda", "DEEPSEEK_OCR_CPUS": "64"}).preprocess_workers == 12
    assert Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cpu"}).cpus == available_cores() >= 1
    with pytest.raises(SettingsError, match="DEEPSEEK_OCR_CPUS"):
        Settings.from_env({"DEEPSEEK_OCR_CPUS": "0"})


def test_values_from_the_environment():
    settings = Settings.from_env({
        "DEEPSEEK_OCR_DEVICE": "cpu", "DEEPSEEK_OCR_MAX_PAGES": "3", "DEEPSEEK_OCR_MAX_PIXELS": "1000",
        "DEEPSEEK_OCR_PDF_DPI": " 72 ", "DEEPSEEK_OCR_WEIGHTS_URL": "http://127.0.0.1:1/x.tar",
        "DEEPSEEK_OCR_WEIGHTS_DIR": "/w", "DEEPSEEK_OCR_OFFLINE": "1", "DEEPSEEK_OCR_GPU_MEMORY_GIB": "30.5",
        "DEEPSEEK_OCR_REPETITION_RULE": "original", "DEEPSEEK_OCR_STOP_LOOPS": "0", "COG_MAX_CONCURRENCY": "12",
        "DEEPSEEK_OCR_ROTARY": "original", "DEEPSEEK_OCR_ENGINE": "reference",
    })
    assert settings.limits == Limits(3, 1000, 72)
    assert settings.weights_source == {"url": "http://127.0.0.1:1/x.tar", "local_dir": "/w", "offline": True}
    assert settings.gpu_memory_gib == 30.5 and settings.concurrency == 12
    assert settings.repetition_rule == "original" and not settings.stop_loops and settings.rotary == "original"
    assert settings.engine == "reference"
    assert Settings.from_env({"DEEPSEEK_OCR_PDF_DPI": ""}).pdf_dpi == Limits().pdf_dpi


@pytest.mark.parametrize("variable, value", [
    ("DEEPSEEK_OCR_MAX_PAGES", "٥٠"), ("DEEPSEEK_OCR_MAX_PAGES", "50 pages"), ("DEEPSEEK_OCR_MAX_PAGES", "1_000"),
    ("DEEPSEEK_OCR_MAX_PAGES", "0"), ("DEEPSEEK_OCR_MAX_PAGES", "-5"), ("DEEPSEEK_OCR_MAX_PIXELS", "1e6"),
    ("DEEPSEEK_OCR_MAX_PAGES", "9" * 40), ("DEEPSEEK_OCR_REQUEST_TIMEOUT", "nan"),
    ("DEEPSEEK_OCR_REQUEST_TIMEOUT", "inf"), ("COG_MAX_CONCURRENCY", "²"), ("DEEPSEEK_OCR_GPU_MEMORY_GIB", "0"),
    ("DEEPSEEK_OCR_STOP_LOOPS", "maybe"), ("DEEPSEEK_OCR_ENGINE", "turbo"), ("DEEPSEEK_OCR_DTYPE", "int8"),
])
def test_a_bad_value_names_its_variable(variable, value):
    with pytest.raises(SettingsError, match=re.escape(variable)):
        Settings.from_env({variable: value})


def test_every_variable_is_in_the_readme_settings_table():
    table = README.read_text(encoding="utf-8").split("## Settings", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in ENVIRONMENT_VARIABLES if f"`{name}`" not in table]
    assert not missing, f"README's Settings table lacks {missing}"
