"""Speed of our engine beside the original Hugging Face code, on the same random full-size weights.

Prints one table: per preset, time to first token for an A4 page, decode tokens/s at batch 1,
aggregate tokens/s and pages/s at batch 8 and 32, peak GPU memory. Output length is forced
(EOS never stops a sequence) so every run decodes the same number of tokens.

On the device machine (see README "Performance"):
    python benchmarks/bench_decode.py --original .bench/orig --original-site /tmp/origsite

`--original` is a folder holding the original remote-code files (fetched, never committed) and
`--original-site` a site-packages folder with transformers 4.46.3 / tokenizers 0.20.3 /
huggingface_hub 0.26 for it; the original then runs in a subprocess of this script.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from checkpoints import DeepseekOCRForCausalLM  # noqa: E402
from ocr_service.fast_decoder import BatchGenerator, GenerationRequest  # noqa: E402
from scripts.make_random_checkpoint import write_checkpoint  # noqa: E402

PRESETS = {
    "Gundam": (1024, 640, True),
    "Tiny": (512, 512, False),
    "Small": (640, 640, False),
    "Base": (1024, 1024, False),
    "Large": (1280, 1280, False),
}
PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
NEVER = -1  # an EOS id no token has: forces the output length


def page_image(width=1240, height=1754, seed=0):
    """An A4 page at 150 dpi with text-like lines, a figure block and noise."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for y in range(60, height - 60, 36):
        draw.rectangle([80, y, int(width * rng.uniform(0.4, 0.92)), y + 14], fill=(rng.randint(0, 60),) * 3)
    draw.rectangle([width // 4, height // 3, width // 2, height // 2], fill=(120, 140, 160))
    for _ in range(2000):
        draw.point((rng.randrange(width), rng.randrange(height)), fill=(rng.randrange(256),) * 3)
    return image


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ours(args, checkpoint: Path) -> dict:
    from transformers import PreTrainedTokenizerFast

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(checkpoint))
    model = DeepseekOCRForCausalLM.from_pretrained(str(checkpoint), dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    images = [page_image(seed=i) for i in range(max(args.batches))]
    results = {}

    # Agreement of the fast path with the plain path in this precision, and the plain path's speed.
    base, size, crop = PRESETS["Gundam"]
    inputs = model.prepare_inputs(tokenizer, PROMPT, [images[0]], base, size, crop)
    model.generate_tokens(inputs, max_new_tokens=4, eos_token_id=NEVER)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    started = time.perf_counter()
    plain, _ = model.generate_tokens(inputs, max_new_tokens=args.check_tokens, eos_token_id=NEVER)
    sync()
    plain_rate = (len(plain) - 1) / (time.perf_counter() - started)
    plain_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    generator = BatchGenerator(model, max_batch=max(args.batches), max_seq_len=1536 + args.tokens + 64,
                               no_repeat_ngram_size=20, eos_token_id=NEVER)
    started = time.perf_counter()
    graphs = generator.capture_all()
    print(f"captured {graphs} CUDA graphs in {time.perf_counter() - started:.1f} s", flush=True)

    def run(preset: str, batch: int, tokens: int):
        """Image → tokens for `batch` pages; returns (total seconds, generation seconds, requests).

        Generation covers the prefill of every page and the decoding; the rest is preprocessing and
        the vision encoder."""
        base, size, crop = PRESETS[preset]
        sync()
        started = time.perf_counter()
        requests = []
        with torch.inference_mode():
            for image in images[:batch]:
                prompt_inputs = model.prepare_inputs(tokenizer, PROMPT, [image], base, size, crop)
                embeds = model.model.embed_prompt(prompt_inputs.input_ids.to(device)[None],
                                                  prompt_inputs.image_mask.to(device)[None],
                                                  [prompt_inputs.images])[0]
                requests.append(GenerationRequest(prompt_inputs.input_ids, embeds, tokens))
        sync()
        encoded = time.perf_counter()
        generator.generate(requests)
        sync()
        total = time.perf_counter() - started
        return total, total - (encoded - started), requests

    fast_check = None
    for preset in PRESETS:
        for batch in args.batches:
            run(preset, batch, 2)  # warm-up
        ttft = min(run(preset, 1, 1)[0] for _ in range(3))  # time to first token: encode, prefill, first token
        total, _, requests = run(preset, 1, args.tokens)
        decode_rate = (args.tokens - 1) / (total - ttft)
        row = {"ttft_s": ttft, "decode_tok_s_b1": decode_rate}
        if preset == "Gundam":
            fast_check = requests[0].tokens[: args.check_tokens]
        for batch in args.batches:
            if batch == 1:
                continue
            torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
            total, generating, requests = run(preset, batch, args.tokens)
            produced = sum(len(r.tokens) for r in requests)
            row[f"agg_tok_s_b{batch}"] = produced / generating
            row[f"pages_s_b{batch}"] = batch / total
            if device.type == "cuda":
                row[f"peak_gib_b{batch}"] = torch.cuda.max_memory_allocated() / 2**30
        results[preset] = row
        print(preset, json.dumps(row), flush=True)
    agree = next((i for i, (a, b) in enumerate(zip(plain, fast_check)) if a != b), len(fast_check))
    results["_check"] = {"plain_tok_s_b1": plain_rate, "plain_peak_gib": plain_peak,
                         "fast_vs_plain_same_prefix": agree,
                         "compared": len(fast_check)}
    return results


ORIGINAL_DRIVER = r'''
import json, sys, time, types, torch
sys.path.insert(0, sys.argv[1])
from transformers import AutoModel, AutoTokenizer
checkpoint, tokens, image_path = sys.argv[2], int(sys.argv[3]), sys.argv[4]
presets = json.loads(sys.argv[5])
tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, use_safetensors=True,
                                  torch_dtype=torch.bfloat16).eval().cuda()
original_generate = model.generate
marks = {}

class Clock:
    def __init__(self): self.calls = 0
    def put(self, value):
        self.calls += 1
        if self.calls == 2: torch.cuda.synchronize(); marks["first"] = time.perf_counter()
    def end(self): pass

def timed_generate(*args, **kwargs):
    kwargs.update(max_new_tokens=marks["n"], min_new_tokens=marks["n"], streamer=Clock())
    return original_generate(*args, **kwargs)

model.generate = timed_generate
out = {}
for name, (base, size, crop) in presets.items():
    for n in (2, tokens):  # the first run warms up
        marks["n"] = n
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model.infer(tokenizer, prompt="<image>\n<|grounding|>Convert the document to markdown.",
                    image_file=image_path, output_path="/tmp/orig-out", base_size=base, image_size=size,
                    crop_mode=crop, save_results=False, eval_mode=False)
        torch.cuda.synchronize(); end = time.perf_counter()
    out[name] = {"ttft_s": marks["first"] - start, "decode_tok_s_b1": (tokens - 1) / (end - marks["first"]),
                 "peak_gib_b1": torch.cuda.max_memory_allocated() / 2**30}
    print(name, json.dumps(out[name]), flush=True)
print("RESULT " + json.dumps(out))
'''


def original(args, checkpoint: Path) -> dict:
    folder = Path("/tmp/original-checkpoint")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for item in checkpoint.iterdir():
        if item.suffix != ".py":
            (folder / item.name).symlink_to(item)
    for source in Path(args.original).glob("*.py"):
        shutil.copy(source, folder / source.name)
    image_path = "/tmp/bench-page.png"
    page_image().save(image_path)
    env = dict(os.environ, PYTHONPATH=args.original_site)
    command = [sys.executable, "-c", ORIGINAL_DRIVER, args.original_site, str(folder), str(args.original_tokens),
               image_path, json.dumps(PRESETS)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.original_timeout)
    print(done.stdout[-4000:], done.stderr[-4000:], flush=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {}


def table(our: dict, theirs: dict, batches) -> str:
    head = ["preset", "engine", "TTFT s", "tok/s b1"] + [f"decode tok/s b{b}" for b in batches if b > 1] + \
           [f"pages/s b{b}" for b in batches if b > 1] + ["peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset in PRESETS:
        for name, rows in (("ours", our), ("original", theirs)):
            row = rows.get(preset)
            if not row:
                continue
            cells = [preset, name, f"{row['ttft_s']:.3f}", f"{row['decode_tok_s_b1']:.1f}"]
            for b in batches:
                if b > 1:
                    cells.append(f"{row[f'agg_tok_s_b{b}']:.0f}" if f"agg_tok_s_b{b}" in row else "one at a time")
            for b in batches:
                if b > 1:
                    cells.append(f"{row[f'pages_s_b{b}']:.2f}" if f"pages_s_b{b}" in row else "-")
            peak = max((v for k, v in row.items() if k.startswith("peak_gib")), default=float("nan"))
            cells.append(f"{peak:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="full", choices=["full", "parity", "tiny"])
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/bench-checkpoint"))
    parser.add_argument("--tokens", type=int, default=512, help="tokens decoded per page (forced)")
    parser.add_argument("--check-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--original", help="folder with the original remote-code .py files")
    parser.add_argument("--original-site", help="site-packages folder with transformers 4.46.3 for the original")
    parser.add_argument("--original-tokens", type=int, default=128)
    parser.add_argument("--original-timeout", type=int, default=420)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if not (args.checkpoint / "config.json").exists():
        started = time.perf_counter()
        write_checkpoint(args.checkpoint, size=args.size, seed=0)
        print(f"wrote a {args.size} random checkpoint in {time.perf_counter() - started:.0f} s", flush=True)
    theirs = original(args, args.checkpoint) if args.original else {}
    our = ours(args, args.checkpoint)
    print(json.dumps({"ours": our, "original": theirs}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"ours": our, "original": theirs}, indent=1))
    print(f"\n{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
          f"{args.tokens} tokens/page forced (original: {args.original_tokens}), A4 page 1240x1754\n")
    print(table(our, theirs, args.batches))


if __name__ == "__main__":
    main()
