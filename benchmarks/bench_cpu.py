"""What the real-size model costs on a CPU: peak resident memory, time to first token and decode tokens/s.

Builds (or reuses) a random checkpoint of the official size (3.34 B parameters, about 6.7 GB on disk,
`scripts/make_random_checkpoint.py --size full`), loads it through the service's engine as the server
does on a machine without a GPU (its defaults there: float32, SDPA, the batched decode path unless
--engine reference) and reads one A4 page (1240×1754) per preset with the Markdown prompt:

    python benchmarks/bench_cpu.py --tokens 32 [--engine server-default|reference] \
        [--checkpoint /tmp/deepseek-ocr-full-random]

Time to first token covers preprocessing, the vision encoder, the prefill and the first token
(a run with max_new_tokens=1); decode tokens/s is (tokens - 1) / (time of a full run - that), each
the fastest of --repeats runs.
Peak memory is this process's high-water resident set (VmHWM): the checkpoint is built in a child
process, so it counts loading and running only.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import a4_page  # noqa: E402
from ocr_service.engine import OCREngine, checkpoint_tensor_shapes  # noqa: E402
from ocr_service.presets import build_prompt, resolution  # noqa: E402
from ocr_service.weights import safetensors_header, verify_weights  # noqa: E402

PRESETS = ("Gundam (Recommended)", "Tiny")
TASK = "Convert to Markdown"


def memory_gib(field: str, source: str = "/proc/self/status") -> float:
    """A memory line of /proc (VmRSS: resident now, VmHWM: peak resident, MemAvailable) in GiB."""
    for line in Path(source).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"{source} has no {field}")


def check_memory_for_weights(checkpoint: Path, dtype: torch.dtype) -> None:
    """Refuse to start when the weights alone would not fit in the memory available now, rather than
    swap the machine to a halt; what the engine needs on top of them is what this benchmark measures."""
    parameters = sum(math.prod(shape) for shard in checkpoint.glob("*.safetensors")
                     for shape in safetensors_header(shard)[0].values())
    needed = parameters * torch.empty((), dtype=dtype).element_size() / 2**30
    available = memory_gib("MemAvailable", "/proc/meminfo")
    print(f"{parameters / 1e9:.2f} B parameters: {needed:.1f} GiB in {dtype}, {available:.1f} GiB available",
          flush=True)
    if needed > available:
        sys.exit(f"not enough memory: the weights alone need {needed:.1f} GiB and {available:.1f} GiB is available")


def full_checkpoint(folder: Path) -> Path:
    if not verify_weights(folder, checkpoint_tensor_shapes):
        print(f"reusing the full-size random checkpoint in {folder}", flush=True)
        return folder
    print(f"building a full-size random checkpoint in {folder} (about 6.7 GB)", flush=True)
    started = time.monotonic()
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_random_checkpoint.py"), "--size", "full",
                    "--out", str(folder)], check=True)
    print(f"built in {time.monotonic() - started:.0f} s", flush=True)
    return folder


def timed_page(engine: OCREngine, image, prompt: str, preset, max_new_tokens: int) -> tuple:
    started = time.perf_counter()
    (result,) = engine.run_pages([image], prompt, preset, max_new_tokens)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/deepseek-ocr-full-random"),
                        help="folder of the full-size random checkpoint (built there if missing)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate per page (default 32)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per measurement; the fastest counts (default 2)")
    parser.add_argument("--engine", choices=["server-default", "reference"], default="server-default",
                        help="server-default: the decode path the server runs; reference: the model's plain "
                             "generation, as DEEPSEEK_OCR_ENGINE=reference (needs less memory)")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error(f"--tokens {args.tokens}: at least 2, so that there is a decode step to time")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1")

    # The engine reads its settings from the environment, as in the server.
    os.environ["DEEPSEEK_OCR_DEVICE"] = "cpu"
    if args.engine == "reference":
        os.environ["DEEPSEEK_OCR_ENGINE"] = "reference"
    # Random weights repeat themselves: a loop guard would end the pages before --tokens.
    os.environ.setdefault("DEEPSEEK_OCR_STOP_LOOPS", "0")
    checkpoint = full_checkpoint(args.checkpoint)
    check_memory_for_weights(checkpoint, getattr(torch, os.environ.get("DEEPSEEK_OCR_DTYPE") or "float32"))
    transformers_logging.disable_progress_bar()  # one line per weight tensor otherwise
    started = time.monotonic()
    engine = OCREngine(checkpoint, log=lambda message: print(f"  engine: {message}", flush=True))
    load_s = time.monotonic() - started
    loaded_gib = memory_gib("VmRSS")

    image = a4_page()
    prompt = build_prompt(TASK)
    rows = {}
    for name in PRESETS:
        preset = resolution(name)
        timed_page(engine, image, prompt, preset, 2)  # warm-up: first-call allocations, thread pools
        # The fastest of a few runs: on a shared machine, other work only ever adds time.
        ttft = min(timed_page(engine, image, prompt, preset, 1)[0] for _ in range(args.repeats))
        runs = [timed_page(engine, image, prompt, preset, args.tokens) for _ in range(args.repeats)]
        total, result = min(runs, key=lambda run: run[0])
        generated = len(result.token_ids)
        decode_s = total - ttft
        rows[name] = {"image_tokens": result.image_tokens, "generated_tokens": generated,
                      "ttft_s": round(ttft, 2), "total_s": round(total, 2),
                      # None when decoding took under 5% of the run: the difference is then noise (raise --tokens).
                      "decode_tok_s": round((generated - 1) / decode_s, 2) if decode_s > 0.05 * total else None}
        print(name, json.dumps(rows[name]), flush=True)

    summary = {
        "engine": args.engine, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "dtype": str(next(engine.model.parameters()).dtype), "load_s": round(load_s, 1),
        "rss_after_load_gib": round(loaded_gib, 2), "peak_rss_gib": round(memory_gib("VmHWM"), 2),
        "tokens_per_page": args.tokens, "repeats": args.repeats, "presets": rows,
    }
    print(json.dumps(summary), flush=True)
    print(f"\n{args.engine} engine, torch {summary['torch']}, {summary['threads']} threads, {summary['dtype']}; "
          f"loaded in {summary['load_s']} s, "
          f"{summary['rss_after_load_gib']} GiB resident after loading, peak {summary['peak_rss_gib']} GiB\n")
    print("| preset | image tokens | time to first token s | decode tok/s | tokens |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        decode = "not measurable" if row["decode_tok_s"] is None else row["decode_tok_s"]
        print(f"| {name} | {row['image_tokens']} | {row['ttft_s']} | {decode} | "
              f"{row['generated_tokens']} |")


if __name__ == "__main__":
    main()
