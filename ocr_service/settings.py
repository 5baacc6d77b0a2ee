"""Every setting of the service, read once from the environment into one object.

The README's "Settings" table documents each variable (a test checks that every variable here is in
it). A value that does not parse fails the start with a message naming the variable.
"""

import os
import re
from dataclasses import dataclass, fields
from typing import Mapping, Optional

from .inputs import Limits
from .weights import DEFAULT_MODEL, DEFAULT_URL as DEFAULT_WEIGHTS_URL, OFFICIAL_WEIGHTS



class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _text(env: Mapping, name: str, default: Optional[str], choices: Optional[tuple] = None) -> Optional[str]:
    value = (env.get(name) or "").strip() or default
    if choices is not None and value not in choices:
        raise SettingsError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def _number(env: Mapping, name: str, default, kind=int, minimum=1):
    """A plain decimal number (ASCII digits, a point for decimals: no '1_000', 'nan' or '²') ≥ minimum."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    pattern = r"[0-9]{1,12}" if kind is int else r"[0-9]{1,12}(\.[0-9]{1,15})?"
    value = kind(raw) if re.fullmatch(pattern, raw) else None
    if value is None or value < minimum:
        kind_name = "whole number" if kind is int else "number"
        raise SettingsError(f"{name}={raw!r} must be a {kind_name} ≥ {minimum:g}")
    return value


def available_cores() -> int:
    """The cores the OS lets this process run on (a container's or taskset's limit, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _flag(env: Mapping, name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} must be 1 or 0")


# Decode rows and GPU memory budget when not set (Settings.rows_and_budget).
CPU_ROWS = 8
CARD_ROWS, CARD_BUDGET_GIB = 128, 40.0
LARGE_CARD_GIB, LARGE_CARD_ROWS, LARGE_CARD_BUDGET_GIB = 120, 256, 110.0


@dataclass(frozen=True)
class Settings:
    # weights
    model: str = DEFAULT_MODEL  # DEEPSEEK_OCR_MODEL (which official weights setup() fetches)
    weights_url: str = DEFAULT_WEIGHTS_URL  # DEEPSEEK_OCR_WEIGHTS_URL (default: the model's official source)
    weights_dir: Optional[str] = None  # DEEPSEEK_OCR_WEIGHTS_DIR
    offline: bool = False  # DEEPSEEK_OCR_OFFLINE
    # runtime
    device: str = "cpu"  # DEEPSEEK_OCR_DEVICE
    dtype: str = "float32"  # DEEPSEEK_OCR_DTYPE
    engine: str = "batched"  # DEEPSEEK_OCR_ENGINE
    attention: str = "sdpa"  # DEEPSEEK_OCR_ATTENTION (the reference path's attention)
    gpu_memory_gib: Optional[float] = None  # DEEPSEEK_OCR_GPU_MEMORY_GIB (None: per the card, `rows_and_budget`)
    cpu_cache_gib: float = 2.0  # DEEPSEEK_OCR_CPU_CACHE_GIB
    max_rows: Optional[int] = None  # DEEPSEEK_OCR_MAX_ROWS (None: per the device, `rows_and_budget`)
    sync_every: int = 16  # DEEPSEEK_OCR_SYNC_EVERY
    prefill_tokens: int = 16384  # DEEPSEEK_OCR_PREFILL_TOKENS
    prefill_graphs: bool = True  # DEEPSEEK_OCR_PREFILL_GRAPHS
    cpus: int = 1  # DEEPSEEK_OCR_CPUS (the cores this process's CPU work may use)
    preprocess_workers: int = 1  # DEEPSEEK_OCR_PREPROCESS_WORKERS
    # generation
    repetition_rule: str = "serving"  # DEEPSEEK_OCR_REPETITION_RULE
    stop_loops: bool = True  # DEEPSEEK_OCR_STOP_LOOPS
    rotary: str = "float32"  # DEEPSEEK_OCR_ROTARY
    vision: str = "compiled"  # DEEPSEEK_OCR_VISION
    vision_graphs: bool = True  # DEEPSEEK_OCR_VISION_GRAPHS
    vision_cudnn: bool = True  # DEEPSEEK_OCR_VISION_CUDNN
    sam_kernel: str = "all"  # DEEPSEEK_OCR_SAM_KERNEL: "all" (every block), "1" (grids walked by whole rows) or "0"
    # DEEPSEEK_OCR_SAM_GELU: SAM's MLP GELU in the first product's epilogue (cuBLASLt's), "1" through the Triton
    # kernel, "0" F.gelu after the product (the original's)
    sam_gelu: str = "epilogue"
    # DEEPSEEK_OCR_SAM_WINDOW_PADDING (with the kernel for every block): "kernel": SAM's windows over the grid as it
    # is, the keys and values of their padding past it made up in the window kernel from the projection's bias
    # (0.26 ms a page faster; its compiled norm rounds a few values differently, and over 16 pages its first-step
    # logits are closer to float32 than the original's on every preset, h200-2026-12-02 call 3); "grid": the grid
    # padded to whole windows before the qkv projection, as the original pads it
    sam_window_padding: str = "kernel"
    programmatic_launch: bool = True  # DEEPSEEK_OCR_PDL (the decode step's kernels, on Hopper and later)
    # requests
    max_pages: int = 50  # DEEPSEEK_OCR_MAX_PAGES
    max_pixels: int = 64_000_000  # DEEPSEEK_OCR_MAX_PIXELS
    pdf_dpi: int = 144  # DEEPSEEK_OCR_PDF_DPI
    request_timeout_s: float = 900.0  # DEEPSEEK_OCR_REQUEST_TIMEOUT
    concurrency: int = 64  # COG_MAX_CONCURRENCY

    @classmethod
    def from_env(cls, env: Optional[Mapping] = None) -> "Settings":
        env = os.environ if env is None else env
        device = _text(env, "DEEPSEEK_OCR_DEVICE", None) or _default_device()
        on_gpu = device.startswith("cuda")
        cores = _number(env, "DEEPSEEK_OCR_CPUS", available_cores())
        model = _text(env, "DEEPSEEK_OCR_MODEL", DEFAULT_MODEL, tuple(OFFICIAL_WEIGHTS))
        return cls(
            model=model,
            weights_url=_text(env, "DEEPSEEK_OCR_WEIGHTS_URL", OFFICIAL_WEIGHTS[model].url),
            weights_dir=_text(env, "DEEPSEEK_OCR_WEIGHTS_DIR", None),
            offline=_flag(env, "DEEPSEEK_OCR_OFFLINE", False),
            device=device,
            dtype=_text(env, "DEEPSEEK_OCR_DTYPE", "bfloat16" if on_gpu else "float32",
                        ("bfloat16", "float16", "float32")),
            engine=_text(env, "DEEPSEEK_OCR_ENGINE", "batched", ("batched", "reference")),
            attention=_text(env, "DEEPSEEK_OCR_ATTENTION", "sdpa", ("sdpa", "eager", "flash_attention_2")),
            gpu_memory_gib=_number(env, "DEEPSEEK_OCR_GPU_MEMORY_GIB", None, float),
            cpu_cache_gib=_number(env, "DEEPSEEK_OCR_CPU_CACHE_GIB", 2.0, float, minimum=1e-6),
            max_rows=_number(env, "DEEPSEEK_OCR_MAX_ROWS", None if on_gpu else CPU_ROWS),
            sync_every=_number(env, "DEEPSEEK_OCR_SYNC_EVERY", 16),
            prefill_tokens=_number(env, "DEEPSEEK_OCR_PREFILL_TOKENS", 16384, minimum=2048),
            prefill_graphs=_flag(env, "DEEPSEEK_OCR_PREFILL_GRAPHS", True),
            cpus=cores,
            preprocess_workers=_number(env, "DEEPSEEK_OCR_PREPROCESS_WORKERS",
                                       max(1, min(12, cores - 2)) if on_gpu else 1),
            repetition_rule=_text(env, "DEEPSEEK_OCR_REPETITION_RULE", "serving", ("serving", "original")),
            stop_loops=_flag(env, "DEEPSEEK_OCR_STOP_LOOPS", True),
            rotary=_text(env, "DEEPSEEK_OCR_ROTARY", "float32", ("float32", "original")),
            vision=_text(env, "DEEPSEEK_OCR_VISION", "compiled", ("compiled", "fast", "original")),
            vision_graphs=_flag(env, "DEEPSEEK_OCR_VISION_GRAPHS", True),
            vision_cudnn=_flag(env, "DEEPSEEK_OCR_VISION_CUDNN", True),
            sam_kernel=_text(env, "DEEPSEEK_OCR_SAM_KERNEL", "all", ("0", "1", "all")),
            sam_gelu=_text(env, "DEEPSEEK_OCR_SAM_GELU", "epilogue", ("0", "1", "epilogue")),
            sam_window_padding=_text(env, "DEEPSEEK_OCR_SAM_WINDOW_PADDING", "kernel", ("kernel", "grid")),
            programmatic_launch=_flag(env, "DEEPSEEK_OCR_PDL", True),
            max_pages=_number(env, "DEEPSEEK_OCR_MAX_PAGES", 50),
            max_pixels=_number(env, "DEEPSEEK_OCR_MAX_PIXELS", 64_000_000),
            pdf_dpi=_number(env, "DEEPSEEK_OCR_PDF_DPI", 144),
            request_timeout_s=_number(env, "DEEPSEEK_OCR_REQUEST_TIMEOUT", 900.0, float),
            concurrency=_number(env, "COG_MAX_CONCURRENCY", 64),
        )

    def rows_and_budget(self, card_bytes: Optional[int]) -> tuple:
        """(decode rows, GPU memory budget in GiB) on a card of `card_bytes` (None: not on a GPU): what is set
        wins; otherwise a large card (≥ LARGE_CARD_GIB) decodes 256 rows in 110 GiB and others 128 rows in
        40 GiB. Measured on the H200 (141 GB): a 256-page job ran 9–17% faster with 256 rows and 110 GiB than
        with 128 and 40, on the same machine (README "Performance")."""
        large = card_bytes is not None and card_bytes >= LARGE_CARD_GIB * 2**30
        rows = self.max_rows or (CPU_ROWS if card_bytes is None else LARGE_CARD_ROWS if large else CARD_ROWS)
        budget = self.gpu_memory_gib or (LARGE_CARD_BUDGET_GIB if large else CARD_BUDGET_GIB)
        return rows, budget

    @property
    def limits(self) -> Limits:
        return Limits(self.max_pages, self.max_pixels, self.pdf_dpi)

    @property
    def weights_source(self) -> dict:
        """The keyword arguments of weights.ensure_weights (and ensure_model_weights, with `model`) that say where
        the weights come from."""
        return {"url": self.weights_url, "local_dir": self.weights_dir, "offline": self.offline}

    def replace(self, **changes) -> "Settings":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


def _default_device() -> str:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


ENVIRONMENT_VARIABLES = (
    "DEEPSEEK_OCR_MODEL", "DEEPSEEK_OCR_WEIGHTS_URL", "DEEPSEEK_OCR_WEIGHTS_DIR", "DEEPSEEK_OCR_OFFLINE",
    "DEEPSEEK_OCR_DEVICE", "DEEPSEEK_OCR_DTYPE", "DEEPSEEK_OCR_ENGINE", "DEEPSEEK_OCR_ATTENTION", "DEEPSEEK_OCR_GPU_MEMORY_GIB",
    "DEEPSEEK_OCR_CPU_CACHE_GIB", "DEEPSEEK_OCR_MAX_ROWS", "DEEPSEEK_OCR_SYNC_EVERY", "DEEPSEEK_OCR_PREFILL_TOKENS",
    "DEEPSEEK_OCR_PREFILL_GRAPHS", "DEEPSEEK_OCR_PREPROCESS_WORKERS", "DEEPSEEK_OCR_REPETITION_RULE", "DEEPSEEK_OCR_STOP_LOOPS",
    "DEEPSEEK_OCR_ROTARY", "DEEPSEEK_OCR_VISION", "DEEPSEEK_OCR_VISION_GRAPHS", "DEEPSEEK_OCR_VISION_CUDNN",
    "DEEPSEEK_OCR_SAM_KERNEL", "DEEPSEEK_OCR_SAM_GELU", "DEEPSEEK_OCR_SAM_WINDOW_PADDING",
    "DEEPSEEK_OCR_PDL", "DEEPSEEK_OCR_MAX_PAGES", "DEEPSEEK_OCR_MAX_PIXELS", "DEEPSEEK_OCR_PDF_DPI",
    "DEEPSEEK_OCR_REQUEST_TIMEOUT", "COG_MAX_CONCURRENCY", "DEEPSEEK_OCR_TRITON",
)
