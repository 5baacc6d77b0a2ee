"""How close our model's GPU numerics are to the original code's, on the same full-size random weights.

For every preset, `--pages` A4 pages (3 by default; one page's distances move by tenths of a percent from page
to page, so a comparison of one page each can fall either way) through both models in bf16 on CUDA: the first step's logits (relative
error, overlap of the top 10) and greedy agreement over the first tokens (the original's whole-sequence
20-gram rule on both sides, no loop stop), for our model as served (float32 rotary frequencies, Triton
kernels, SDPA), as served with the original's bf16 rounding of the frequencies
(`rope_inv_freq_dtype="bfloat16"`), and computed in the original's order (that rounding, eager
attention, PyTorch's operations), and as served with the vision towers' blocks compiled (the default,
`DEEPSEEK_OCR_VISION=compiled`; on the CPU the compile's plumbing only, backend "eager"); beside it, for scale, how far our bf16 logits and the original's are
from our float32 ones.

On the device machine (see README "Parity with the original"):
    python benchmarks/bench_numerics.py --original .bench/orig --original-site /tmp/origsite
    python benchmarks/bench_numerics.py --model ocr2 --original .bench/orig2 --original-site /tmp/origsite

`--model ocr2` compares DeepSeek-OCR 2 with its original code instead, for each of its modes (Gundam: a 1024
global view and 768 tiles; Small: one 768 view; Base: one 1024 view). `--original` holds the original
remote-code .py files of that model (fetched, never committed); `--original-site` a site-packages folder with
transformers 4.46.3 for them. The original runs in a subprocess. Without a GPU the script runs ours only, in
bf16 on the CPU (`--size tiny`: a smoke test of the script).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    MODEL_CLASSES, MODEL_PRESETS, PROMPT, a4_page, default_checkpoint, device_name, random_checkpoint,
    run_original_driver,
)
from checkpoints.generation import ORIGINAL_NO_REPEAT_RULE  # noqa: E402
from checkpoints.modeling_deepseekv2 import RotaryEmbedding  # noqa: E402
from ocr_service.engine import choose_vision_kernels  # noqa: E402
from ocr_service.settings import Settings  # noqa: E402
from ocr_service.vision_compile import compile_vision_towers, uncompile_vision_towers  # noqa: E402

ORIGINAL_DRIVER = r'''
tokens, image_paths, out_path = int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
presets = json.loads(sys.argv[6])
original_generate = model.generate
captured = {}

def recording_generate(*args, **kwargs):
    kwargs.update(max_new_tokens=tokens, no_repeat_ngram_size=20, output_logits=True, return_dict_in_generate=True,
                  do_sample=False)
    kwargs.pop("streamer", None)
    out = original_generate(*args, **kwargs)
    prompt_length = args[0].shape[1]
    captured["logits"] = out.logits[0][0].float().cpu()
    captured["tokens"] = out.sequences[0, prompt_length:].tolist()
    return out.sequences

model.generate = recording_generate
results = {}
for name, (base, size, crop) in presets.items():
    for page, image_path in enumerate(image_paths):
        model.infer(tokenizer, prompt="<image>\n<|grounding|>Convert the document to markdown.", image_file=image_path,
                    output_path="/tmp/original-numerics-out", base_size=base, image_size=size, crop_mode=crop,
                    save_results=False, eval_mode=True)
        results[(name, page)] = dict(captured)
    print(name, "done", flush=True)
torch.save(results, out_path)
'''


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_original(args, checkpoint: Path, image_paths: list, presets: dict) -> dict:
    out_path = "/tmp/original-numerics.pt"
    done = run_original_driver(ORIGINAL_DRIVER, args.original, args.original_site, checkpoint, args.tokens,
                               json.dumps(image_paths), out_path, json.dumps(presets), timeout=args.original_timeout)
    return torch.load(out_path) if done.returncode == 0 else {}


def set_rotary(model, mode: str) -> None:
    config = model.config
    model.model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, mode)


@torch.inference_mode()
def ours(model, tokenizer, images: list, tokens: int, presets: dict) -> dict:
    """(preset, page) → the first step's logits and the greedy tokens."""
    results = {}
    for name, (base, size, crop) in presets.items():
        for page, image in enumerate(images):
            inputs = model.prepare_inputs(tokenizer, PROMPT, [image], base, size, crop)
            device = model.lm_head.weight.device
            out = model(input_ids=inputs.input_ids[None].to(device), image_mask=inputs.image_mask[None].to(device),
                        images=[inputs.images])
            generated, _ = model.generate_tokens(inputs, tokens, repetition=ORIGINAL_NO_REPEAT_RULE, loops=None,
                                                 eos_token_id=tokenizer.eos_token_id)
            results[(name, page)] = {"logits": out.logits[0, -1].float().cpu(), "tokens": generated}
    return results


def summarise(per_page: list) -> dict:
    """compare() of each page → their mean relative error, the worst, top-10 and greedy counts summed."""
    errors = [c["rel_error"] for c in per_page]
    return {"rel_error": sum(errors) / len(errors), "worst": max(errors), "per_page": errors,
            "top10": sum(c["top10"] for c in per_page), "top10_of": 10 * len(per_page),
            "same_prefix": sum(c["same_prefix"] for c in per_page), "compared": sum(c["compared"] for c in per_page)}


def compare(a: dict, b: dict) -> dict:
    """a against b: relative error of the logits, overlap of the top 10, greedy tokens in common."""
    error = float((a["logits"] - b["logits"]).norm() / b["logits"].norm())
    top_a, top_b = set(a["logits"].topk(10).indices.tolist()), set(b["logits"].topk(10).indices.tolist())
    same_prefix = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y),
                       min(len(a["tokens"]), len(b["tokens"])))
    return {"rel_error": error, "top10": len(top_a & top_b), "same_prefix": same_prefix,
            "compared": min(len(a["tokens"]), len(b["tokens"]))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_CLASSES), default="ocr",
                        help="ocr: DeepSeek-OCR; ocr2: DeepSeek-OCR 2")
    parser.add_argument("--size", choices=["full", "tiny"], default="full",
                        help="of the random checkpoint: tiny is a smoke test of the script")
    parser.add_argument("--checkpoint", type=Path, help="default: /tmp/bench-checkpoint (ocr), "
                        "/tmp/bench-ocr2-checkpoint (ocr2); -tiny appended for --size tiny")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--pages", type=int, default=16,
                        help="A4 pages a preset (bench's a4_page, seeds 0..N-1); a page's distance from float32 "
                        "moves by ~0.5 points with a rounding, so fewer pages decide by chance (at 6, two compiles of "
                        "the same code gave Tiny 1.34% and 1.54%, h200-2026-12-02)")
    parser.add_argument("--original", help="folder with the original remote-code .py files")
    parser.add_argument("--original-site", help="site-packages folder with transformers 4.46.3 for the original")
    parser.add_argument("--original-timeout", type=int, default=400)
    parser.add_argument("--variants", nargs="*", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                        help="served towers again under other settings (e.g. DEEPSEEK_OCR_SAM_KERNEL=all), each a "
                        "column of its own")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.checkpoint is None:
        default = default_checkpoint(args.model)
        args.checkpoint = default if args.size == "full" else default.with_name(default.name + "-tiny")
    random_checkpoint(args.checkpoint, size=args.size, model=args.model)
    model_class, presets = MODEL_CLASSES[args.model], MODEL_PRESETS[args.model]
    images = [a4_page(seed=seed) for seed in range(args.pages)]
    image_paths = [f"/tmp/numerics-page-{seed}.png" for seed in range(args.pages)]
    for image, path in zip(images, image_paths):
        image.save(path)
    theirs = run_original(args, args.checkpoint, image_paths, presets) if args.original else {}

    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(args.checkpoint))
    rows = {}
    model = model_class.from_pretrained(str(args.checkpoint), dtype=torch.bfloat16).to(DEVICE).eval()
    ours_f32_rotary = ours(model, tokenizer, images, args.tokens, presets)
    set_rotary(model, "bfloat16")
    ours_bf16_rotary = ours(model, tokenizer, images, args.tokens, presets)
    # The same, computed in the original's order of roundings: eager attention (scores and probabilities
    # rounded to bf16) and the PyTorch definitions of the fused operations instead of the Triton kernels
    # (numerics_stages.py finds it bit-identical to the original, layer by layer).
    os.environ["DEEPSEEK_OCR_TRITON"] = "0"
    model.config._attn_implementation = "eager"
    model.model.sam_model.use_relative_positions("materialised")  # SAM's dense bias, as the original adds it
    ours_eager = ours(model, tokenizer, images, args.tokens, presets)
    model.model.sam_model.use_relative_positions("folded")
    os.environ.pop("DEEPSEEK_OCR_TRITON")
    model.config._attn_implementation = "sdpa"
    # As served by default (DEEPSEEK_OCR_VISION=compiled): the same, with the towers' blocks compiled and SAM's
    # attention through the kernels the engine picks on a GPU (called here, where the engine replays graphs).
    set_rotary(model, "float32")
    choose_vision_kernels(model, Settings.from_env(), graphs=DEVICE == "cuda")
    compile_vision_towers(model, backend="inductor" if DEVICE == "cuda" else "eager")
    ours_compiled = ours(model, tokenizer, images, args.tokens, presets)
    uncompile_vision_towers(model)
    ours_variants = {}
    for variant in args.variants:  # the served towers under other settings
        torch._dynamo.reset()
        overrides = dict(pair.split("=", 1) for pair in variant.split(","))
        choose_vision_kernels(model, Settings.from_env({**os.environ, **overrides}), graphs=DEVICE == "cuda")
        compile_vision_towers(model, backend="inductor" if DEVICE == "cuda" else "eager")
        ours_variants[variant] = ours(model, tokenizer, images, args.tokens, presets)
        uncompile_vision_towers(model)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    reference = model_class.from_pretrained(str(args.checkpoint), dtype=torch.float32).to(DEVICE).eval()
    ours_fp32 = ours(reference, tokenizer, images, 0, presets)
    del reference
    for name in presets:
        keys = [(name, page) for page in range(args.pages)]

        def against(a: dict, b: dict) -> dict:
            return summarise([compare(a[key], b[key]) for key in keys])

        row = {"bf16_vs_fp32": against(ours_f32_rotary, ours_fp32), "compiled_vs_fp32": against(ours_compiled, ours_fp32),
               "compiled_vs_served": against(ours_compiled, ours_f32_rotary),
               "variants_vs_fp32": {variant: against(out, ours_fp32) for variant, out in ours_variants.items()}}
        if all(key in theirs for key in keys):
            row["compiled_vision"] = against(ours_compiled, theirs)
            row["original_vs_fp32"] = against(theirs, ours_fp32)
            row["rotary_float32"] = against(ours_f32_rotary, theirs)
            row["rotary_original"] = against(ours_bf16_rotary, theirs)
            row["rotary_original_eager"] = against(ours_eager, theirs)
        rows[name] = row
    print(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"\n{model_class.__name__}, {args.size} random weights, {device_name()}, torch {torch.__version__}, bf16, "
          f"{args.pages} A4 pages 1240x1754 a preset, {args.tokens} greedy tokens (original's 20-gram rule); "
          f"distances from fp32 are the pages' mean (worst)\n")
    head = ["preset", "ours bf16 vs fp32", "compiled vision vs fp32", "original vs fp32",
            "served: logits rel err", "top-10", "greedy same",
            "served, original rotary: logits rel err", "top-10", "greedy same",
            "original's order: logits rel err", "top-10", "greedy same",
            "compiled vision: logits rel err", "top-10", "greedy same"] + [
            f"compiled vision, {variant}, vs fp32" for variant in args.variants]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, row in rows.items():
        def distance(c):
            return "-" if c is None else f"{c['rel_error']:.2%} ({c['worst']:.2%})"

        cells = [name, distance(row["bf16_vs_fp32"]), distance(row["compiled_vs_fp32"]),
                 distance(row.get("original_vs_fp32"))]
        for mode in ("rotary_float32", "rotary_original", "rotary_original_eager", "compiled_vision"):
            c = row.get(mode)
            cells += ([f"{c['rel_error']:.2%}", f"{c['top10']}/{c['top10_of']}", f"{c['same_prefix']}/{c['compared']}"]
                      if c else ["-", "-", "-"])
        cells += [distance(row["variants_vs_fp32"][variant]) for variant in args.variants]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
