"""DeepSeek-OCR 2 beside its original code on the CPU in float32: the same inputs, logits and greedy tokens.

As `parity_cpu.py` does for the first model: both load one random checkpoint of the official OCR 2 format
(`make_random_checkpoint.py --model ocr2 --size parity`: the full SAM and Qwen2 encoder the original
hard-codes, a 3-layer, 8-expert decoder of width 1280). The original runs its own `infer()` in another
Python environment (transformers 4.46.3 and the torchvision it imports; its CUDA and bf16 calls mapped to
the CPU and float32), with `generate` wrapped so that the tensors it receives, its first-step logits and its
greedy tokens (its 20-gram rule) are recorded. Ours gets the same image and views: its input ids, image
mask, views and grid are compared to the original's, its first-step logits (eager attention), and its
greedy tokens from the model's plain `generate_tokens` and from the service's batched engine, both with the
original's rule (`DEEPSEEK_OCR_REPETITION_RULE=original`); the engine is given every case at once, one job
each, as concurrent requests reach the service. One more column encodes the views of every case together,
one batch per view size (as the service's vision pass does), and compares the first-step logits that batch
gives with the original's.

    python benchmarks/parity_cpu_ocr2.py --original /path/to/original-ocr2-code --python /path/to/venv/bin/python
"""

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchmarks.common import random_checkpoint  # noqa: E402
from benchmarks.parity_cpu import PROMPT, relative_error, run_original  # noqa: E402
from checkpoints import DeepseekOCR2ForCausalLM  # noqa: E402
from checkpoints.generation import ORIGINAL_NO_REPEAT_RULE  # noqa: E402
from conftest import document_image  # noqa: E402
from ocr_service.engine import OCREngine  # noqa: E402
from ocr_service.presets import Resolution  # noqa: E402
from ocr_service.settings import Settings  # noqa: E402
from ocr_service.vision import encode_prompts  # noqa: E402

CASES = [  # (name, width, height, base_size, image_size, crop_mode)
    ("A4 1240x1754, dynamic (2x3 tiles)", 1240, 1754, 1024, 768, True),
    ("wide 2000x600, dynamic", 2000, 600, 1024, 768, True),
    ("banner 2400x400, dynamic (6x1 tiles)", 2400, 400, 1024, 768, True),
    ("small 600x400, dynamic (no tiles)", 600, 400, 1024, 768, True),
    ("A4 1240x1754, global view 1024 only", 1240, 1754, 1024, 1024, False),
    ("900x1200, global view 768 only", 900, 1200, 768, 768, False),
]


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, help="folder with the original OCR 2 remote-code .py files")
    parser.add_argument("--python", required=True, help="a Python with transformers 4.46.3 and torchvision")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/parity-ocr2-checkpoint"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--timeout", type=int, default=6000)
    parser.add_argument("--reuse-original", action="store_true",
                        help="use the original's results of the last run (/tmp/parity-ocr2-original.pt)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    random_checkpoint(args.checkpoint, size="parity", model="ocr2")
    cases = []
    for seed, (name, width, height, base, size, crop) in enumerate(CASES):
        path = f"/tmp/parity-ocr2-case-{seed}.png"
        document_image(width, height, seed=seed).save(path)
        cases.append((name, path, base, size, crop))
    saved = Path("/tmp/parity-ocr2-original.pt")
    theirs = (torch.load(saved) if args.reuse_original and saved.exists()
              else run_original(args, args.checkpoint, cases, prefix="parity-ocr2"))

    from PIL import Image
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(args.checkpoint))
    model = DeepseekOCR2ForCausalLM.from_pretrained(str(args.checkpoint), dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    prompts = [model.prepare_inputs(tokenizer, PROMPT, [Image.open(path).convert("RGB")], base, size, crop)
               for _, path, base, size, crop in cases]
    batched = encode_prompts(model, prompts)  # the service's vision pass: views of one size together
    settings = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cpu", "DEEPSEEK_OCR_REPETITION_RULE": "original",
                                  "DEEPSEEK_OCR_STOP_LOOPS": "0", "DEEPSEEK_OCR_MAX_ROWS": str(len(cases))})
    engine = OCREngine(args.checkpoint, settings, log=lambda _: None)
    jobs = [engine.submit([Image.open(path).convert("RGB")], PROMPT, Resolution(base, size, crop), args.tokens)
            for _, path, base, size, crop in cases]
    engine_tokens = [job.wait()[0].token_ids for job in jobs]
    rows = []
    for (name, _, _, _, _), inputs, batch_embeds, engine_ids in zip(cases, prompts, batched, engine_tokens):
        original = theirs[name]
        views = inputs.images[0]
        same_inputs = (torch.equal(inputs.input_ids, original["input_ids"])
                       and torch.equal(inputs.image_mask, original["images_seq_mask"])
                       and torch.equal(views.global_view, original["global_view"][0])
                       and (torch.equal(views.tiles, original["crop"]) if views.has_tiles
                            else not original["crop"].any())
                       and list(views.grid) == original["spatial_crop"][0].tolist())
        logits = model(input_ids=inputs.input_ids[None], image_mask=inputs.image_mask[None],
                       images=[inputs.images]).logits[0, -1]
        batch_logits = model(inputs_embeds=batch_embeds[None]).logits[0, -1]
        plain, _ = model.generate_tokens(inputs, args.tokens, repetition=ORIGINAL_NO_REPEAT_RULE, loops=None,
                                         eos_token_id=tokenizer.eos_token_id)
        expected = original["tokens"]
        rows.append({"case": name, "inputs_identical": same_inputs, "image_tokens": int(inputs.image_mask.sum()),
                     "tiles": views.tiles.shape[0] if views.has_tiles else 0,
                     "logits_rel_error": relative_error(logits, original["logits"]),
                     "batched_vision_logits_rel_error": relative_error(batch_logits, original["logits"]),
                     "plain_equal": sum(a == b for a, b in zip(plain, expected)),
                     "batched_equal": sum(a == b for a, b in zip(engine_ids, expected)), "compared": len(expected),
                     "same_length": len(plain) == len(expected) == len(engine_ids)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"\nCPU, float32, torch {torch.__version__}; the original: transformers 4.46.3, eager attention\n")
    print("| case | input ids, image mask, global view, tiles, grid | image tokens | first-step logits, relative "
          "error | same, views batched across cases | greedy tokens equal, plain / batched engine |\n"
          "|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {'identical' if row['inputs_identical'] else 'DIFFERENT'} | {row['image_tokens']} | "
              f"{row['logits_rel_error']:.1e} | {row['batched_vision_logits_rel_error']:.1e} | "
              f"{row['plain_equal']}/{row['compared']} / {row['batched_equal']}/{row['compared']} |")


if __name__ == "__main__":
    main()
