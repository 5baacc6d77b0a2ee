"""Our model beside the original code on the CPU in float32: the same inputs, logits and greedy tokens.

Both load one random checkpoint of the official format (`--size parity`: the full SAM and CLIP towers the
original hard-codes, a 3-layer, 8-expert decoder of width 1280). The original runs its own `infer()` in
another Python environment (transformers 4.46.3 and the torchvision it imports; it hard-codes CUDA and
bf16 pixels, which the driver maps to the CPU and float32), with `generate` wrapped so that the tensors it
receives, its first-step logits and its greedy tokens (its 20-gram rule) are recorded. Ours gets the same
image and preset: its input ids, image mask, views and grid are compared to the original's, its first-step
logits (eager attention), and its greedy tokens from the model's plain `generate_tokens` and from the
service's batched engine, both with the original's rule (`DEEPSEEK_OCR_REPETITION_RULE=original`).

    python benchmarks/parity_cpu.py --original .bench/orig --python /tmp/origvenv/bin/python
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchmarks.common import original_checkpoint, random_checkpoint  # noqa: E402
from checkpoints import DeepseekOCRForCausalLM  # noqa: E402
from checkpoints.generation import ORIGINAL_NO_REPEAT_RULE  # noqa: E402
from conftest import document_image  # noqa: E402
from ocr_service.engine import OCREngine  # noqa: E402
from ocr_service.presets import Resolution  # noqa: E402
from ocr_service.settings import Settings  # noqa: E402

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
CASES = [  # (name, width, height, base_size, image_size, crop_mode)
    ("A4 1240x1754, Gundam", 1240, 1754, 1024, 640, True),
    ("wide 2000x600, Gundam", 2000, 600, 1024, 640, True),
    ("small 400x300, Gundam (no tiles)", 400, 300, 1024, 640, True),
    ("A4 1240x1754, Tiny", 1240, 1754, 512, 512, False),
    ("900x1200, Small", 900, 1200, 640, 640, False),
    ("A4 1240x1754, Base", 1240, 1754, 1024, 1024, False),
    ("1500x1000, Large", 1500, 1000, 1280, 1280, False),
]

ORIGINAL_DRIVER = r'''
import json, sys, torch
checkpoint, tokens, cases_json, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
# The original hard-codes CUDA and bf16 pixels: on the CPU in float32 those become no-ops.
real_to = torch.Tensor.to
def to_float32(self, *args, **kwargs):
    args = tuple(torch.float32 if a is torch.bfloat16 else a for a in args)
    if kwargs.get("dtype") is torch.bfloat16:
        kwargs["dtype"] = torch.float32
    return real_to(self, *args, **kwargs)
torch.Tensor.to = to_float32
torch.Tensor.cuda = lambda self, *a, **k: self
torch.nn.Module.cuda = lambda self, *a, **k: self
from transformers import AutoModel, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True, use_safetensors=True,
                                  torch_dtype=torch.float32, _attn_implementation="eager").eval()
real_generate = model.generate
captured = {}
def recording_generate(input_ids, **kwargs):
    captured.update(input_ids=input_ids[0].clone(), images_seq_mask=kwargs["images_seq_mask"][0].clone(),
                    crop=kwargs["images"][0][0].clone(), global_view=kwargs["images"][0][1].clone(),
                    spatial_crop=kwargs["images_spatial_crop"].clone())
    kwargs.update(max_new_tokens=tokens, no_repeat_ngram_size=20, output_logits=True,
                  return_dict_in_generate=True, do_sample=False)
    kwargs.pop("streamer", None)
    out = real_generate(input_ids, **kwargs)
    captured["logits"] = out.logits[0][0].float()
    captured["tokens"] = out.sequences[0, input_ids.shape[1]:].tolist()
    return out.sequences
model.generate = recording_generate
results = {}
for name, path, base, size, crop in json.loads(cases_json):
    captured.clear()
    with torch.no_grad():
        model.infer(tokenizer, prompt="<image>\n<|grounding|>Convert the document to markdown.", image_file=path,
                    output_path="/tmp/parity-original-out", base_size=base, image_size=size, crop_mode=crop,
                    save_results=False, eval_mode=True)
    results[name] = dict(captured)
    print(name, "done", flush=True)
torch.save(results, out_path)
'''


def run_original(args, checkpoint: Path, cases: list, prefix: str = "parity") -> dict:
    """Run ORIGINAL_DRIVER on the cases in the original's environment; its files go to /tmp/<prefix>-original*."""
    folder = original_checkpoint(checkpoint, args.original, Path(f"/tmp/{prefix}-original-checkpoint"))
    out_path = f"/tmp/{prefix}-original.pt"
    done = subprocess.run([args.python, "-c", ORIGINAL_DRIVER, str(folder), str(args.tokens), json.dumps(cases),
                           out_path], capture_output=True, text=True, timeout=args.timeout)
    print(done.stdout[-1500:], done.stderr[-3000:], flush=True)
    if done.returncode != 0:
        raise SystemExit("the original failed")
    return torch.load(out_path)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, help="folder with the original remote-code .py files")
    parser.add_argument("--python", required=True, help="a Python with transformers 4.46.3 and torchvision")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/parity-checkpoint"))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--timeout", type=int, default=3000)
    parser.add_argument("--reuse-original", action="store_true",
                        help="use the original's results of the last run (/tmp/parity-original.pt)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    random_checkpoint(args.checkpoint, size="parity")
    cases = []
    for seed, (name, width, height, base, size, crop) in enumerate(CASES):
        path = f"/tmp/parity-case-{seed}.png"
        document_image(width, height, seed=seed).save(path)
        cases.append((name, path, base, size, crop))
    reuse = args.reuse_original and Path("/tmp/parity-original.pt").exists()
    theirs = torch.load("/tmp/parity-original.pt") if reuse else run_original(args, args.checkpoint, cases)

    from PIL import Image
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(args.checkpoint))
    model = DeepseekOCRForCausalLM.from_pretrained(str(args.checkpoint), dtype=torch.float32,
                                                   attn_implementation="eager").eval()
    settings = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cpu", "DEEPSEEK_OCR_REPETITION_RULE": "original",
                                  "DEEPSEEK_OCR_STOP_LOOPS": "0", "DEEPSEEK_OCR_MAX_ROWS": "2"})
    engine = OCREngine(args.checkpoint, settings, log=lambda _: None)
    rows = []
    for name, path, base, size, crop in cases:
        original = theirs[name]
        image = Image.open(path).convert("RGB")
        inputs = model.prepare_inputs(tokenizer, PROMPT, [image], base, size, crop)
        views = inputs.images[0]
        grid = views.grid if views.has_tiles else (1, 1)
        same_inputs = (torch.equal(inputs.input_ids, original["input_ids"])
                       and torch.equal(inputs.image_mask, original["images_seq_mask"])
                       and torch.equal(views.global_view, original["global_view"][0])
                       and (torch.equal(views.tiles, original["crop"]) if views.has_tiles
                            else not original["crop"].any())
                       and list(grid) == original["spatial_crop"][0].tolist())
        logits = model(input_ids=inputs.input_ids[None], image_mask=inputs.image_mask[None],
                       images=[inputs.images]).logits[0, -1]
        plain, _ = model.generate_tokens(inputs, args.tokens, repetition=ORIGINAL_NO_REPEAT_RULE, loops=None,
                                         eos_token_id=tokenizer.eos_token_id)
        batched = engine.run_pages([image], PROMPT, Resolution(base, size, crop), args.tokens)[0].token_ids
        expected = original["tokens"]
        rows.append({"case": name, "inputs_identical": same_inputs, "image_tokens": int(inputs.image_mask.sum()),
                     "logits_rel_error": relative_error(logits, original["logits"]),
                     "plain_equal": sum(a == b for a, b in zip(plain, expected)), "batched_equal":
                     sum(a == b for a, b in zip(batched, expected)), "compared": len(expected)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"\nCPU, float32, torch {torch.__version__}; the original: transformers 4.46.3, eager attention\n")
    print("| case | input ids, image mask, global view, tiles, grid | image tokens | first-step logits, relative "
          "error | greedy tokens equal, plain / batched engine |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {'identical' if row['inputs_identical'] else 'DIFFERENT'} | {row['image_tokens']} | "
              f"{row['logits_rel_error']:.1e} | {row['plain_equal']}/{row['compared']} / "
              f"{row['batched_equal']}/{row['compared']} |")


if __name__ == "__main__":
    main()
