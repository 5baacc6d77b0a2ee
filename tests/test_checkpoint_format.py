"""The model's parameters are exactly the official checkpoint's tensors, and a checkpoint folder of that
format loads through Hugging Face's remote-code path."""

import json

import torch
from transformers import AutoConfig, AutoModel

from checkpoints import DeepseekOCR2Config, DeepseekOCR2ForCausalLM, DeepseekOCRConfig, DeepseekOCRForCausalLM
from checkpoints.generation import STOP_EOS, STOP_MAX_NEW_TOKENS
from conftest import REFERENCE, document_image, reference_tensor_shapes

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


def test_official_config_builds_every_official_tensor_and_nothing_else():
    config = DeepseekOCRConfig(**json.loads((REFERENCE / "config.json").read_text()))
    with torch.device("meta"):
        model = DeepseekOCRForCausalLM(config)
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    reference = reference_tensor_shapes()
    assert sorted(set(reference) - set(ours)) == []
    assert sorted(set(ours) - set(reference)) == []
    assert {n: s for n, s in ours.items() if reference[n] != s} == {}
    assert sum(t.numel() for t in model.state_dict().values()) == 3_336_106_240


def test_official_ocr2_config_builds_every_official_ocr2_tensor_and_nothing_else():
    folder = REFERENCE / "deepseek-ocr-2"
    config = DeepseekOCR2Config(**json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = DeepseekOCR2ForCausalLM(config)
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    reference = reference_tensor_shapes(folder)
    assert sorted(set(reference) - set(ours)) == []
    assert sorted(set(ours) - set(reference)) == []
    assert {n: s for n, s in ours.items() if reference[n] != s} == {}
    parameters = sum(t.numel() for t in model.state_dict().values())
    facts = json.loads((folder / "checkpoint-facts.json").read_text())
    assert parameters == facts["parameters"] == 3_389_119_360
    # The official index's total size is not twice the parameter count: see checkpoint-facts.json.
    assert facts["index_total_size"] - 2 * parameters == facts["bytes_beyond_bf16"] == 1_010_688
    # The decoder is the first model's, name for name and shape for shape.
    first = reference_tensor_shapes()
    decoder = {n: s for n, s in first.items() if n.startswith(("model.layers.", "model.embed_tokens", "model.norm",
                                                                "lm_head"))}
    assert {n: reference[n] for n in decoder} == decoder


def test_ocr2_random_checkpoint_has_the_official_names(tiny_ocr2_checkpoint):
    """The tiny model has fewer layers and experts, the same tensor names otherwise."""
    import re

    from safetensors import safe_open

    def patterns(names):
        return {re.sub(r"\.\d+\.", ".N.", name) for name in names}

    with safe_open(str(tiny_ocr2_checkpoint / "model-00001-of-000001.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert patterns(names) == patterns(reference_tensor_shapes(REFERENCE / "deepseek-ocr-2"))


def test_tiny_checkpoint_loads_through_automodel_with_remote_code(tiny_checkpoint, tiny_tokenizer, tiny_model):
    config = AutoConfig.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert type(config).__name__ == "DeepseekOCRConfig"
    model, info = AutoModel.from_pretrained(tiny_checkpoint, trust_remote_code=True, dtype=torch.float32,
                                            output_loading_info=True)
    assert type(model).__name__ == "DeepseekOCRForCausalLM"
    assert type(model) is not DeepseekOCRForCausalLM  # the folder's copy of the code, not this import
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info.get("mismatched_keys")
    # The remote-code model is the same model: it reads the same prompt into the same logits and writes
    # the same tokens as our code imported directly, loading the same folder.
    model.eval()
    inputs = model.prepare_inputs(tiny_tokenizer, PROMPT, [document_image(800, 1000)])
    assert int(inputs.image_mask.sum()) == 273 + (10 * 2 + 1) * 10 * 3  # Gundam, 2 columns × 3 rows of tiles
    with torch.inference_mode():
        logits = [m(input_ids=inputs.input_ids[None], image_mask=inputs.image_mask[None],
                    images=[inputs.images]).logits for m in (model, tiny_model)]
    assert torch.isfinite(logits[0]).all()
    assert torch.equal(logits[0], logits[1])
    remote, remote_stop = model.generate_tokens(inputs, max_new_tokens=8)
    direct, direct_stop = tiny_model.generate_tokens(inputs, max_new_tokens=8)
    assert (remote, remote_stop) == (direct, direct_stop)
    assert (len(remote), remote_stop) == (8, STOP_MAX_NEW_TOKENS) or (len(remote) < 8 and remote_stop == STOP_EOS)


def test_tokenizer_carries_official_special_token_ids(tiny_tokenizer):
    rows = (REFERENCE / "tokenizer-added-tokens.tsv").read_text(encoding="utf-8").splitlines()[1:]
    for row in rows:
        token_id, content, _ = row.split("\t")
        assert tiny_tokenizer.convert_tokens_to_ids(content) == int(token_id), content
    ids = tiny_tokenizer.encode("<image>\n<|grounding|>Convert the document to markdown.", add_special_tokens=False)
    assert ids[0] == 128815 and 128820 in ids
    assert tiny_tokenizer.bos_token_id == 0 and tiny_tokenizer.eos_token_id == 1


def test_model_code_has_no_cuda_calls_and_no_torchvision():
    from conftest import REPO

    for source in (REPO / "checkpoints").glob("*.py"):
        text = source.read_text()
        assert ".cuda(" not in text, source.name
        assert "torchvision" not in text, source.name


def test_loaded_weights_equal_the_file(tiny_checkpoint, tiny_model):
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint / "model-00001-of-000001.safetensors"), "pt") as handle:
        for name in ["model.sam_model.blocks.1.attn.rel_pos_h", "model.layers.2.mlp.experts.5.up_proj.weight",
                     "model.view_seperator", "lm_head.weight"]:
            expected = handle.get_tensor(name).float()
            assert torch.equal(tiny_model.state_dict()[name], expected), name
