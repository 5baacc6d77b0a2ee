"""Write a random-weight checkpoint in the official DeepSeek-OCR (or DeepSeek-OCR 2) format.

The folder gets what the official Hugging Face repo holds for loading: config.json,
model-00001-of-000001.safetensors (official tensor names) with model.safetensors.index.json,
and a small byte-level BPE tokenizer whose special tokens carry the official ids
(`<image>` = 128815, `<|ref|>` = 128816, ..., BOS 0, EOS 1, pad 2).

Sizes:
  tiny    small vision towers and decoder: the CPU tests (runs in seconds)
  parity  full vision towers, a 1280-wide decoder with few layers/experts: the original code
          hard-codes those tower sizes, so this is the smallest it can load, for side-by-side runs
  full    the official config: GPU benchmarks

`--model ocr2` writes DeepSeek-OCR 2 instead (its official config, its vision encoder; the same decoder
sizes and tokenizer); parity is then the full SAM and Qwen2 encoder the original hard-codes.

    python scripts/make_random_checkpoint.py --size tiny --out /tmp/tiny-ckpt
    python scripts/make_random_checkpoint.py --model ocr2 --size tiny --out /tmp/tiny-ocr2-ckpt
"""

import argparse
import copy
import csv
import json
import sys
from pathlib import Path

import torch

# The official checkpoint's config, processor config, added tokens and tensor shapes, kept in the repository
# (scripts/data/README.md lists them): the one place scripts and tests read them from.
DATA = Path(__file__).resolve().parent / "data"
REPO = DATA.parent.parent

CORPUS = """# Document title
DeepSeek-OCR reads documents and converts them to markdown. Free OCR returns the plain text.
Parse the figure. Locate the object by reference in the image. Tables have rows and cells.
| Name | Value |
|------|-------|
| alpha | 0.5 |
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?
$$ E = mc^2 $$ \\frac{a}{b} \\sum_{i=1}^{n} x_i
"""

DECODER_SIZES = {
    "tiny": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3,
                 intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
                 n_shared_experts=2, first_k_dense_replace=1),
    "parity": dict(num_hidden_layers=3, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=8,
                   num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1),
    "full": {},
}

# The tiny SAM both models' tiny vision towers start with (its last width is what the next tower reads).
TINY_SAM = {"downsample_channels": [32, 48], "global_attn_indexes": [1, 3], "heads": 2, "layers": 4, "width": 32,
            "out_chans": 16}

TINY_VISION = {
    "image_size": 1024,
    "model_type": "vision",
    "width": {
        "clip-l-14-224": {"heads": 2, "image_size": 224, "layers": 2, "patch_size": 14, "width": 48},
        "sam_vit_b": TINY_SAM,
    },
}


# DeepSeek-OCR 2's official facts live in their own folder; its tokenizer and processor files are the
# first model's, byte for byte.
OCR2_DATA = DATA / "deepseek-ocr-2"

TINY_VISION_OCR2 = {
    "image_size": 1024,
    "model_type": "vision",
    "width": {
        "qwen2-0-5b": {"dim": 48, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 96},
        "sam_vit_b": TINY_SAM,
    },
}

MODELS = ("ocr", "ocr2")


def make_config(size: str, model: str = "ocr") -> dict:
    config = json.loads(((OCR2_DATA if model == "ocr2" else DATA) / "config.json").read_text())
    for key, value in DECODER_SIZES[size].items():
        config[key] = value
        config["language_config"][key] = value
    if size == "tiny" and model == "ocr2":
        config["vision_config"] = copy.deepcopy(TINY_VISION_OCR2)
        config["projector_config"]["input_dim"] = 48
        config["projector_config"]["n_embed"] = config["hidden_size"]
    elif size == "tiny":
        config["vision_config"] = copy.deepcopy(TINY_VISION)
        config["projector_config"]["input_dim"] = 48 + 48
        config["projector_config"]["n_embed"] = config["hidden_size"]
    return config


def added_tokens() -> list[tuple[int, str, bool]]:
    with open(DATA / "tokenizer-added-tokens.tsv", encoding="utf-8") as handle:
        return [(int(r["id"]), r["content"], r["special"] == "True") for r in csv.DictReader(handle, delimiter="\t")]


def write_tokenizer(out: Path, vocab_size: int = 600) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokens = added_tokens()
    base_specials = [content for token_id, content, _ in sorted(tokens) if token_id < 3]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=base_specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CORPUS] * 4, trainer)
    spec = json.loads(tokenizer.to_str())
    # Added tokens keep their official ids, far above this small vocabulary: the tokenizers library
    # honours an added token's id only when the model's vocabulary maps the token to it, as the
    # official tokenizer.json does.
    for token_id, content, _ in tokens:
        spec["model"]["vocab"][content] = token_id
    spec["added_tokens"] = [
        {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": not special, "special": special}
        for token_id, content, special in tokens
    ]
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (out / "special_tokens_map.json").write_text((DATA / "special_tokens_map.json").read_text(encoding="utf-8"),
                                                 encoding="utf-8")
    by_id = {token_id: content for token_id, content, _ in tokens}
    # The official tokenizer_config.json's keys and values, with this vocabulary's added tokens.
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        "added_tokens_decoder": {
            str(token_id): {"content": content, "lstrip": False, "normalized": not special, "rstrip": False,
                            "single_word": False, "special": special}
            for token_id, content, special in tokens
        },
        "additional_special_tokens": ["<|User|>", "<|Assistant|>"],
        "bos_token": by_id[0],
        "clean_up_tokenization_spaces": False,
        "eos_token": by_id[1],
        "extra_special_tokens": {},
        "legacy": True,
        "model_max_length": 8192,
        "pad_token": by_id[2],
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None,
        "use_default_system_prompt": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=1),
                                               encoding="utf-8")


def random_state_dict(config: dict, seed: int, dtype: torch.dtype, model: str = "ocr") -> dict:
    sys.path.insert(0, str(REPO))
    from checkpoints import DeepseekOCR2Config, DeepseekOCR2ForCausalLM, DeepseekOCRConfig, DeepseekOCRForCausalLM

    config_class, model_class = ((DeepseekOCR2Config, DeepseekOCR2ForCausalLM) if model == "ocr2"
                                 else (DeepseekOCRConfig, DeepseekOCRForCausalLM))
    torch.manual_seed(seed)
    with torch.device("meta"):
        built = model_class(config_class(**config))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in built.state_dict().items():
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight", "layrnorm.weight",
                          "layer_norm1.weight", "layer_norm2.weight")) or ".neck.1.weight" in name \
                or ".neck.3.weight" in name:
            value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        elif name.endswith(("image_newline", "view_seperator", "class_embedding", "embed_tokens.weight",
                            "query_768.weight", "query_1024.weight")):
            value = torch.randn(tensor.shape, generator=generator) * 0.5
        elif name.endswith("bias"):
            value = 0.02 * torch.randn(tensor.shape, generator=generator)
        else:
            fan_in = max(1, tensor[0].numel()) if tensor.dim() > 1 else tensor.shape[-1]
            value = torch.randn(tensor.shape, generator=generator) / fan_in ** 0.5
        state[name] = value.to(dtype).contiguous()
    return state


def write_checkpoint(out: Path, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     model: str = "ocr") -> Path:
    from safetensors.torch import save_file

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, not {model!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = make_config(size, model)
    state = random_state_dict(config, seed, dtype, model)
    shard = "model-00001-of-000001.safetensors"
    save_file(state, str(out / shard), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": {name: shard for name in state}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "processor_config.json").write_text((DATA / "processor_config.json").read_text(encoding="utf-8"),
                                               encoding="utf-8")
    write_tokenizer(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="ocr", help="ocr: DeepSeek-OCR; ocr2: DeepSeek-OCR 2")
    parser.add_argument("--size", choices=sorted(DECODER_SIZES), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--with-code", action="store_true",
                        help="also copy checkpoints/*.py so that the folder loads with trust_remote_code")
    args = parser.parse_args()
    out = write_checkpoint(args.out, args.size, args.seed, getattr(torch, args.dtype), args.model)
    if args.with_code:
        for source in (REPO / "checkpoints").glob("*.py"):
            (out / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    print(f"wrote a {args.size} random {args.model} checkpoint to {out}")


if __name__ == "__main__":
    main()
