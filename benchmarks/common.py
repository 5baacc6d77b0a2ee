"""What the benchmarks share: the models and their presets, an A4 page that looks like a document, GPU timing and memory
helpers that are no-ops on the CPU, and the folder the original code is loaded from."""

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoints import (  # noqa: E402
    DeepseekOCR2ForCausalLM, DeepseekOCRForCausalLM, deepencoder, deepencoder2, processing_deepseekocr,
    processing_deepseekocr2,
)

# The benchmarks' --model: its class and its resolution modes, name → (base_size, image_size, crop_mode), as its
# processing module names them (the predictor's choices map onto them: ocr_service/presets.py).
MODEL_CLASSES = {"ocr": DeepseekOCRForCausalLM, "ocr2": DeepseekOCR2ForCausalLM}
MODEL_PRESETS = {"ocr": dict(processing_deepseekocr.RESOLUTION_MODES),
                 "ocr2": dict(processing_deepseekocr2.RESOLUTION_MODES)}
PRESETS = MODEL_PRESETS["ocr"]
# The tower that reads SAM's features, as the inner model names it, and the function composing SAM, it and the
# projector (both take (sam, stage-2 encoder, projector, pixels)): CLIP-L for the first model, the Qwen2
# encoder with its learned queries for OCR 2.
STAGE_TWO_ENCODERS = {"ocr": ("vision_model", deepencoder.encode_views),
                      "ocr2": ("qwen2_model", deepencoder2.encode_views)}
PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


def a4_page(width: int = 1240, height: int = 1754, seed: int = 0) -> Image.Image:
    """An A4 page at 150 dpi with text-like lines, a figure block and noise (Gundam tiles it 2 × 3)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for y in range(60, height - 60, 36):
        draw.rectangle([80, y, int(width * rng.uniform(0.4, 0.92)), y + 14], fill=(rng.randint(0, 60),) * 3)
    draw.rectangle([width // 4, height // 3, width // 2, height // 2], fill=(120, 140, 160))
    for _ in range(2000):
        draw.point((rng.randrange(width), rng.randrange(height)), fill=(rng.randrange(256),) * 3)
    return image


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib(kind: str) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    return (torch.cuda.max_memory_allocated() if kind == "allocated" else torch.cuda.max_memory_reserved()) / 2**30


def cold_work() -> dict:
    """Counters of work a warm engine should not do again: Triton kernels compiled so far (each new
    specialisation of a kernel compiles on the thread that launches it) and pinned host allocations
    (cudaHostAlloc, slow and serialising). Their difference across a measured run says whether the run
    paid for either."""
    from triton.runtime.jit import JITFunction

    from checkpoints import triton_attention, triton_moe, triton_ops

    compiled = 0
    for module in (triton_attention, triton_moe, triton_ops):
        for value in vars(module).values():
            if isinstance(value, JITFunction):
                compiled += sum(len(caches[0]) for caches in value.device_caches.values())
    counters = {"triton_compiled": compiled}
    if torch.cuda.is_available():
        stats = torch.cuda.host_memory_stats()
        counters.update({name: value for name, value in stats.items()
                         if "host_alloc" in name and isinstance(value, (int, float))})
    return counters


def cold_work_since(before: dict) -> dict:
    after = cold_work()
    return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def original_checkpoint(checkpoint: Path, original_code: str, folder: Path) -> Path:
    """A folder the original code loads from: the checkpoint's data files linked, its remote-code files
    copied (from outside the repository; never committed)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.suffix != ".py":
            (folder / item.name).symlink_to(item)
    for source in Path(original_code).glob("*.py"):
        shutil.copy(source, folder / source.name)
    return folder


# What every program driving the original on the GPU starts with: its stack first on the path, then its
# tokenizer and its model in bf16 on CUDA, loaded as its usage loads them (argv: site, checkpoint folder).
ORIGINAL_GPU_PROLOGUE = r'''
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from transformers import AutoModel, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2], trust_remote_code=True)
model = AutoModel.from_pretrained(sys.argv[2], trust_remote_code=True, use_safetensors=True,
                                  torch_dtype=torch.bfloat16).eval().cuda().to(torch.bfloat16)
'''


def run_original_driver(driver: str, original_code: str, original_site: str, checkpoint: Path, *arguments,
                        timeout: int) -> subprocess.CompletedProcess:
    """Run `driver` (Python code that finds `tokenizer` and `model` loaded by ORIGINAL_GPU_PROLOGUE) in a
    subprocess on the original's stack, its own arguments from sys.argv[3] on; prints the tails of its
    output."""
    folder = original_checkpoint(checkpoint, original_code, Path("/tmp/original-checkpoint"))
    command = [sys.executable, "-c", ORIGINAL_GPU_PROLOGUE + driver, original_site, str(folder),
               *map(str, arguments)]
    done = subprocess.run(command, env=dict(os.environ, PYTHONPATH=original_site), capture_output=True, text=True,
                          timeout=timeout)
    print(done.stdout[-2000:], done.stderr[-3000:], flush=True)
    return done


def random_checkpoint(folder: Path, size: str = "full", model: str = "ocr") -> Path:
    """A random checkpoint of the official format in `folder` (`model` "ocr" or "ocr2"), written on first use
    (the full size takes about half a minute and 6.7 GB); a folder written before must hold that model."""
    if not (folder / "config.json").exists():
        from scripts.make_random_checkpoint import write_checkpoint

        started = time.perf_counter()
        write_checkpoint(folder, size=size, seed=0, model=model)
        print(f"wrote a {size} random {model} checkpoint in {time.perf_counter() - started:.0f} s", flush=True)
    architectures = json.loads((folder / "config.json").read_text()).get("architectures", [])
    if MODEL_CLASSES[model].__name__ not in architectures:
        raise SystemExit(f"{folder} holds {architectures}, not {MODEL_CLASSES[model].__name__}: give another "
                         "--checkpoint folder")
    return folder


def default_checkpoint(model: str) -> Path:
    """Where a benchmark writes its full-size random checkpoint of `model`, one folder per model."""
    return Path("/tmp/bench-checkpoint" if model == "ocr" else f"/tmp/bench-{model}-checkpoint")


def work_since(engine, before: dict, pages: int) -> dict:
    """What the engine did since `before` (its `work_done()` then) for `pages` pages: busy seconds by stage (the
    encoder works beside prefill and decode), vision milliseconds a page, vision passes' mean size, prompt tokens
    prefilled per second of prefill, prefills run and their mean time and size."""
    work = {key: value - before[key] for key, value in engine.server.work_done().items()}
    return {"busy_s": {stage: round(work[f"{stage}_s"], 2) for stage in ("encode", "prefill", "decode")},
            "encode_ms_per_page": work["encode_s"] / pages * 1e3,
            "vision_pages_per_pass": work["vision_pages"] / max(work["vision_passes"], 1),
            "prefill_tokens_s": work["prefill_tokens"] / max(work["prefill_s"], 1e-9),
            "prefills": work["prefills"], "prefill_ms_each": work["prefill_s"] / max(work["prefills"], 1) * 1e3,
            "pages_per_prefill": pages / max(work["prefills"], 1)}


# A thread whose innermost frame is in one of these is waiting (a lock, an event, a queue, a pool's idle worker).
IDLE_FILES = {"threading.py", "queue.py", "selectors.py", "thread.py"}


class ThreadSampler:
    """What the process's Python threads are doing, sampled every `interval` s from a thread of its own:
    each other thread's innermost Python frame, counted by (thread group, function, file:line), the group
    being the thread's name without its number. A thread in a C call shows the Python line that called it
    (a blocking wait as much as a kernel launch), so read the table as where threads spend their time, not
    who holds the interpreter; threads waiting on a lock, an event or a queue are left out. Beside it, the sampler's own lateness: how much later than asked it woke,
    on average (the interpreter's and the CPUs' contention, as any Python thread of the process sees it)."""

    def __init__(self, interval: float = 0.01):
        import threading

        self.interval, self.counts, self.samples, self.late_s = interval, {}, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thread-sampler", daemon=True)

    def _run(self) -> None:
        import re
        import threading

        own = threading.get_ident()
        while not self._stop.is_set():
            asked = time.perf_counter()
            time.sleep(self.interval)
            self.late_s += time.perf_counter() - asked - self.interval
            names = {thread.ident: re.sub(r"[-_]?\d+(_\d+)?$", "", thread.name) for thread in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == own:
                    continue
                code = frame.f_code
                if Path(code.co_filename).name in IDLE_FILES:
                    continue
                key = (names.get(ident, "?"), code.co_name, f"{Path(code.co_filename).name}:{frame.f_lineno}")
                self.counts[key] = self.counts.get(key, 0) + 1
            self.samples += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self, top: int = 25) -> dict:
        ranked = sorted(self.counts.items(), key=lambda item: -item[1])[:top]
        return {"samples": self.samples, "mean_lateness_ms": 1e3 * self.late_s / max(self.samples, 1),
                "top": [[count / max(self.samples, 1), *key] for key, count in ranked]}


def print_thread_report(what: str, report: dict) -> None:
    print(f"threads during {what}: {report['samples']} samples, the sampler woke "
          f"{report['mean_lateness_ms']:.2f} ms late on average; share of samples by (thread, function, line):")
    for share, group, function, line in report["top"]:
        print(f"  {share:6.1%}  {group:<28} {function:<32} {line}")
