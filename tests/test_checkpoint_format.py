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
    # The candidate explanation: bf16 query tables of the encoder's width for 512, 640 and 1280 pixel views
    # (8², 10² and 20² queries), which the code does not build.
    width = reference["model.qwen2_model.query_1024.weight"][1]
    assert (8 ** 2 + 10 ** 2 + 20 ** 2) * width * 2 == facts["bytes_beyond_bf16"]
    assert not any(name.startswith("model.qwen2_model.query_") for name in set(reference) - {
        "model.qwen2_model.query_768.weight", "model.qwen2_model.query_1024.weight"})
    # The decoder is the first model's, name for name and shape for shape.
    first = reference_tensor_shapes()
    decoder = {n: s for n, s in first.items() if n.startswith(("model.layers.", "model.embed_tokens", "model.norm",
                                                                "lm_head"))}
    assert {n: reference[n] for n in decoder} == decoder


def test_ocr2_random_checkpoint_has_the_official_names_and_dtype(tiny_ocr2_checkpoint):
    """The tiny model has fewer layers and experts, the same tensor names and dtype otherwise."""
    import re

    from ocr_service.weights import _tensor_entries

    def patterns(names):
        return {re.sub(r"\.\d+\.", ".N.", name) for name in names}

    tensors, problem = _tensor_entries(tiny_ocr2_checkpoint / "model-00001-of-000001.safetensors")
    assert problem is None
    assert patterns(tensors) == patterns(reference_tensor_shapes(REFERENCE / "deepseek-ocr-2"))
    facts = json.loads((REFERENCE / "deepseek-ocr-2" / "checkpoint-facts.json").read_text())
    assert {info["dtype"] for info in tensors.values()} == {facts["tensor_dtype"]}


def test_ocr2_float32_tensors_load_cast_into_a_bf16_model(tiny_ocr2_checkpoint, tmp_path):
    """The weight check tolerates F32 tensors beside BF16 ones: loading casts them to the model's dtype."""
    import shutil

    from safetensors.torch import load_file, save_file

    shard = "model-00001-of-000001.safetensors"
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_ocr2_checkpoint, folder)
    tensors = load_file(str(folder / shard))
    widened = ["model.qwen2_model.query_768.weight", "model.qwen2_model.query_1024.weight", "model.view_seperator",
               "model.sam_model.blocks.0.attn.rel_pos_h"]
    # float32 values that bf16 cannot hold, so that the cast is visible
    expected = {name: tensors[name].float() + 1e-3 for name in widened}
    tensors.update(expected)
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    model = DeepseekOCR2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    state = model.state_dict()
    for name, value in expected.items():
        assert state[name].dtype == torch.bfloat16, name
        assert torch.equal(state[name], value.to(torch.bfloat16)), name
    assert torch.equal(state["lm_head.weight"], tensors["lm_head.weight"])


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
