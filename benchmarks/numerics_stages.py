"""Where our bf16 GPU numerics part from the original's: stage by stage, one page, both models.

Captures, in both models, the pixels, SAM's output, CLIP's at several depths (and inside its first
layer), the projector's, the decoder's input embeddings, every decoder layer's output and the first
step's logits, and prints the relative error and the share of bit-identical values of ours against
the original's at each stage: for the served computation and for ours computed in the original's
order. Then our decoder alone, fed the original's input embeddings, in each configuration between
those two (which fused kernel or attention accounts for the difference), each also against a float32
decoder on the same embeddings, beside the original's own distance from it.

    python benchmarks/numerics_stages.py --original .bench/orig --original-site /tmp/origsite
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import PRESETS, PROMPT, a4_page, random_checkpoint, run_original_driver  # noqa: E402
from checkpoints import DeepseekOCRForCausalLM  # noqa: E402
from checkpoints.modeling_deepseekv2 import RotaryEmbedding  # noqa: E402

ORIGINAL_DRIVER = r'''
image_path, out_path = sys.argv[3], sys.argv[4]
presets = json.loads(sys.argv[5])
inner = model.model
stages = {}

def keep(name):
    def hook(module, args, output):
        if stages.get("done"):
            return
        value = output if torch.is_tensor(output) else output[0]
        stages.setdefault(name, []).append(value.detach().cpu().clone())
    return hook

def keep_input(module, args, kwargs):
    if "embeds" not in stages:
        hidden = args[0] if args else kwargs["hidden_states"]
        stages["embeds"] = hidden[0].detach().cpu().clone()

def keep_pixels(module, args):
    if not stages.get("done"):
        stages.setdefault("pixels", []).append(args[0].detach().cpu().clone())

inner.sam_model.register_forward_pre_hook(keep_pixels)
for stage, path in json.loads(sys.argv[6]).items():
    try:
        inner.get_submodule(path).register_forward_hook(keep(stage))
    except AttributeError:
        pass
inner.layers[0].register_forward_pre_hook(keep_input, with_kwargs=True)
for i, layer in enumerate(inner.layers):
    layer.register_forward_hook(keep(f"layer{i}"))
original_generate = model.generate

def recording_generate(*args, **kwargs):
    kwargs.update(max_new_tokens=1, output_logits=True, return_dict_in_generate=True, do_sample=False)
    kwargs.pop("streamer", None)
    out = original_generate(*args, **kwargs)
    stages["logits"] = out.logits[0][0].float().cpu()
    stages["done"] = True
    return out.sequences

model.generate = recording_generate
results = {}
for name, (base, size, crop) in presets.items():
    stages.clear()
    model.infer(tokenizer, prompt="<image>\n<|grounding|>Convert the document to markdown.", image_file=image_path,
                output_path="/tmp/original-stages-out", base_size=base, image_size=size, crop_mode=crop,
                save_results=False, eval_mode=True)
    stages.pop("done")
    results[name] = {k: v for k, v in stages.items()}
    print(name, "done", sorted(results[name]), flush=True)
torch.save(results, out_path)
'''


def run_original(args, checkpoint: Path, image_path: str, presets: dict) -> dict:
    out_path = "/tmp/original-stages.pt"
    done = run_original_driver(ORIGINAL_DRIVER, args.original, args.original_site, checkpoint, image_path, out_path,
                               json.dumps(presets), json.dumps(VISION_STAGES), timeout=600)
    if done.returncode:
        raise SystemExit("the original failed (its output is above)")
    return torch.load(out_path)


# stage → module path inside `model.model`, the same in both models
VISION_STAGES = {
    "sam": "sam_model",
    "clip.embeddings": "vision_model.embeddings",
    "clip.pre_norm": "vision_model.pre_layrnorm",
    "clip0.norm1": "vision_model.transformer.layers.0.layer_norm1",
    "clip0.attn": "vision_model.transformer.layers.0.self_attn",
    "clip0.fc1": "vision_model.transformer.layers.0.mlp.fc1",
    "clip0.mlp": "vision_model.transformer.layers.0.mlp",
    **{f"clip{i}": f"vision_model.transformer.layers.{i}" for i in range(0, 24, 4)},
    "clip": "vision_model",
    "projector": "projector",
}


class StageRecorder:
    """Forward hooks on our model that keep the same stages as the original driver: every call of a vision
    module (a Gundam page encodes its tiles, then its global view), the decoder's first pass only."""

    def __init__(self, model):
        inner = model.model
        self.stages: dict = {}
        self.handles = [
            inner.sam_model.register_forward_pre_hook(self._pixels),
            inner.layers[0].register_forward_pre_hook(self._embeds),
        ]
        for stage, path in VISION_STAGES.items():
            try:
                module = inner.get_submodule(path)
            except AttributeError:  # a smaller test checkpoint
                continue
            self.handles.append(module.register_forward_hook(self._keep(stage)))
        for i, layer in enumerate(inner.layers):
            self.handles.append(layer.register_forward_hook(self._layer(i)))

    def _pixels(self, module, args):
        self.stages.setdefault("pixels", []).append(args[0].detach().cpu().clone())

    def _keep(self, name):
        def hook(module, args, output):
            self.stages.setdefault(name, []).append(output.detach().cpu().clone())
        return hook

    def _embeds(self, module, args):
        self.stages.setdefault("embeds", args[0][0].detach().cpu().clone())

    def _layer(self, i):
        def hook(module, args, output):
            hidden, residual = output  # this layer's output is their sum, as the next norm adds them
            total = hidden if residual is None else hidden + residual
            self.stages.setdefault(f"layer{i}", [total.detach().cpu().clone()])
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def scripted_activation_probe() -> list:
    """What a TorchScript-compiled x·sigmoid(1.702·x) computes on bf16 input, call after call, with and
    without bf16 autocast (the original runs it under autocast): the share of values equal to eager bf16
    (three roundings) and to float32 rounded once."""

    @torch.jit.script
    def scripted(x):
        return x * torch.sigmoid(1.702 * x)

    x = torch.randn(7, 101, 4096, device="cuda").to(torch.bfloat16)
    eager = x * torch.sigmoid(1.702 * x)
    wide = x.float()
    once = (wide * torch.sigmoid(1.702 * wide)).to(torch.bfloat16)
    rows = []
    for autocast in (False, True):
        for call in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                y = scripted(x)
            rows.append(f"autocast {autocast} call {call}: {y.dtype}, same as eager bf16 "
                        f"{float((y == eager).float().mean()):.2%}, as float32 rounded once "
                        f"{float((y.to(torch.bfloat16) == once).float().mean()):.2%}")
    return rows


# name → (rotary inverse frequencies, Triton kernels for the small operations, attention)
CONFIGURATIONS = {
    "served": ("float32", True, "sdpa"),
    "served, original rotary": ("bfloat16", True, "sdpa"),
    "Triton ops, eager attention": ("bfloat16", True, "eager"),
    "PyTorch ops, SDPA": ("bfloat16", False, "sdpa"),
    "original's order": ("bfloat16", False, "eager"),
}


def configure(model, name: str) -> None:
    """Compute the reference path as CONFIGURATIONS[name] says. "original's order" is PyTorch's
    definitions of the fused operations, eager attention, the original's rotary rounding and SAM's dense
    relative-position bias (the served path folds it into the attention kernel)."""
    rotary, triton, attention = CONFIGURATIONS[name]
    model.model.sam_model.use_relative_positions("materialised" if name == "original's order" else "folded")
    config = model.config
    model.model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, rotary)
    if triton:
        os.environ.pop("DEEPSEEK_OCR_TRITON", None)
    else:
        os.environ["DEEPSEEK_OCR_TRITON"] = "0"
    config._attn_implementation = attention


@torch.inference_mode()
def ours_stages(model, tokenizer, image, preset) -> dict:
    base, size, crop = preset
    inputs = model.prepare_inputs(tokenizer, PROMPT, [image], base, size, crop)
    device = model.lm_head.weight.device
    recorder = StageRecorder(model)
    try:
        out = model(input_ids=inputs.input_ids[None].to(device), image_mask=inputs.image_mask[None].to(device),
                    images=[inputs.images])
    finally:
        recorder.remove()
    recorder.stages["logits"] = out.logits[0, -1].float().cpu()
    return recorder.stages


@torch.inference_mode()
def decoder_on(model, embeds: torch.Tensor) -> dict:
    """Our decoder alone on given input embeddings [T, D]."""
    device = model.lm_head.weight.device
    recorder = StageRecorder(model)
    try:
        hidden = model.model.decode(embeds[None].to(device))
    finally:
        recorder.remove()
    recorder.stages["logits"] = model.lm_head(hidden[0, -1]).float().cpu()
    return recorder.stages


def compare(ours: dict, theirs: dict, only=None) -> dict:
    row = {}
    for name, reference in theirs.items():
        if only and name not in only:
            continue
        mine = ours.get(name)
        if mine is None:
            continue
        a = mine if torch.is_tensor(mine) else torch.cat([t.reshape(-1) for t in mine])
        b = reference if torch.is_tensor(reference) else torch.cat([t.reshape(-1) for t in reference])
        a, b = a.reshape(-1).float(), b.reshape(-1).float()
        if a.shape != b.shape:
            row[name] = f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
            continue
        error = float((a - b).norm() / b.norm().clamp_min(1e-30))
        row[name] = f"{error:.2e} ({float((a == b).float().mean()):.0%} same)"
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/bench-checkpoint"))
    parser.add_argument("--original", required=True)
    parser.add_argument("--original-site", required=True)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    presets = {name: PRESETS[name] for name in args.presets.split(",")}
    random_checkpoint(args.checkpoint)
    image = a4_page()
    image_path = "/tmp/numerics-page.png"
    image.save(image_path)
    theirs = run_original(args, args.checkpoint, image_path, presets)

    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(args.checkpoint))
    model = DeepseekOCRForCausalLM.from_pretrained(str(args.checkpoint), dtype=torch.bfloat16).cuda().eval()
    report = {"scripted quick gelu": scripted_activation_probe()}
    print("\n".join(report["scripted quick gelu"]))
    reference32 = DeepseekOCRForCausalLM.from_pretrained(str(args.checkpoint), dtype=torch.float32).cuda().eval()
    for name, preset in presets.items():
        reference = theirs[name]
        # How far each computation is from float32 arithmetic on the same input embeddings.
        configure(reference32, "PyTorch ops, SDPA")
        reference32.model.rotary = RotaryEmbedding(model.config.head_dim, model.config.rope_theta, "float32")
        exact = decoder_on(reference32, reference["embeds"].float())
        rows = {"original vs float32 decoder": compare(reference, exact, only=("logits",))}
        for configuration in ("served", "original's order"):
            configure(model, configuration)
            rows[configuration] = compare(ours_stages(model, tokenizer, image, preset), reference)
        for configuration in CONFIGURATIONS:
            configure(model, configuration)
            alone = decoder_on(model, reference["embeds"])
            rows[configuration + ": decoder on original's embeds"] = compare(alone, reference)
            rows[configuration + ": decoder on original's embeds vs float32"] = compare(alone, exact,
                                                                                       only=("logits",))
        report[name] = rows
        for mode, row in rows.items():
            print(f"--- {name} / {mode}")
            for stage, text in row.items():
                print(f"  {stage:10s} {text}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
