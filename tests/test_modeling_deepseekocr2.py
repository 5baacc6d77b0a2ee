"""DeepSeek-OCR 2 on a tiny checkpoint: loading through remote code, its token layout, the cache, generation,
and the same logits and greedy tokens as transformers' own implementation of the model."""

import copy
import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModel

from checkpoints.generation import STOP_EOS, STOP_MAX_NEW_TOKENS
from conftest import document_image

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


@pytest.fixture(scope="module")
def a4_inputs(tiny_ocr2_model, tiny_tokenizer):
    return tiny_ocr2_model.prepare_inputs(tiny_tokenizer, PROMPT, [document_image(1240, 1754)])


def test_tiny_checkpoint_loads_through_automodel_with_remote_code(tiny_ocr2_checkpoint, tiny_tokenizer):
    config = AutoConfig.from_pretrained(tiny_ocr2_checkpoint, trust_remote_code=True)
    assert type(config).__name__ == "DeepseekOCR2Config"
    model, info = AutoModel.from_pretrained(tiny_ocr2_checkpoint, trust_remote_code=True, dtype=torch.float32,
                                            output_loading_info=True)
    assert type(model).__name__ == "DeepseekOCR2ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    inputs = model.eval().prepare_inputs(tiny_tokenizer, PROMPT, [document_image(800, 1000)])
    assert int(inputs.image_mask.sum()) == 256 + 6 * 144 + 1  # 2×3 tiles of 768
    tokens, stop_reason = model.generate_tokens(inputs, max_new_tokens=4)
    assert (len(tokens), stop_reason) == (4, STOP_MAX_NEW_TOKENS) or stop_reason == STOP_EOS


def test_image_features_fill_the_image_positions_in_layout_order(tiny_ocr2_model, a4_inputs):
    model = tiny_ocr2_model.model
    views = a4_inputs.images[0]
    with torch.inference_mode():
        features = model.embed_image(views)
        tiles = model.encode_views(views.tiles)  # [6, 144, D]
        global_view = model.encode_views(views.global_view[None])[0]  # [256, D]
        embeds = model.embed_prompt(a4_inputs.input_ids[None], a4_inputs.image_mask[None], [a4_inputs.images])
    assert features.shape[0] == 1121
    torch.testing.assert_close(features[:6 * 144], tiles.reshape(-1, tiles.shape[-1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features[6 * 144:-1], global_view, rtol=1e-5, atol=1e-6)
    assert torch.equal(features[-1], model.view_seperator)
    assert torch.equal(embeds[0, a4_inputs.image_mask], features)
    assert model.vision_device == torch.device("cpu") and model.vision_dtype == torch.float32


def full_logits(model, inputs):
    with torch.inference_mode():
        return model(input_ids=inputs.input_ids[None], image_mask=inputs.image_mask[None],
                     images=[inputs.images]).logits[0]


def test_cached_decoding_matches_full_forward(tiny_ocr2_model, a4_inputs):
    tokens, _ = tiny_ocr2_model.generate_tokens(a4_inputs, max_new_tokens=6, repetition=0, loops=None)
    assert len(tokens) >= 2
    extended = copy.copy(a4_inputs)
    extended.input_ids = torch.cat([a4_inputs.input_ids, torch.tensor(tokens[:-1])])
    extended.image_mask = torch.cat([a4_inputs.image_mask, torch.zeros(len(tokens) - 1, dtype=torch.bool)])
    logits = full_logits(tiny_ocr2_model, extended)
    prompt_length = a4_inputs.input_ids.numel()
    greedy = logits[prompt_length - 1:].argmax(-1).tolist()
    assert greedy == tokens


def test_global_only_views_generate(tiny_ocr2_model, tiny_tokenizer):
    for size in (768, 1024):
        inputs = tiny_ocr2_model.prepare_inputs(tiny_tokenizer, PROMPT, [document_image(900, 1200)],
                                                base_size=size, image_size=size, crop_mode=False)
        assert int(inputs.image_mask.sum()) == (size // 64) ** 2 + 1
        tokens, stop_reason = tiny_ocr2_model.generate_tokens(inputs, max_new_tokens=3)
        assert (len(tokens), stop_reason) == (3, STOP_MAX_NEW_TOKENS) or stop_reason == STOP_EOS


# ---------------------------------------------------------------- against transformers' implementation


def transformers_copy(checkpoint, folder):
    """The tiny checkpoint as transformers' `DeepseekOcr2ForConditionalGeneration` loads it: its config
    written in transformers' terms, the same safetensors file (official names), converted at load time by
    transformers' own conversion mapping for `deepseek_ocr2`."""
    from transformers import DeepseekOcr2Config

    ours = json.loads((checkpoint / "config.json").read_text())
    sam, encoder = ours["vision_config"]["width"]["sam_vit_b"], ours["vision_config"]["width"]["qwen2-0-5b"]
    dense = ours["first_k_dense_replace"]
    text_keys = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok",
                 "n_shared_experts", "topk_method", "max_position_embeddings", "bos_token_id", "eos_token_id"]
    config = DeepseekOcr2Config(
        vision_config={
            "sam_config": {"hidden_size": sam["width"], "output_channels": sam["out_chans"],
                           "num_hidden_layers": sam["layers"], "num_attention_heads": sam["heads"],
                           "global_attn_indexes": sam["global_attn_indexes"],
                           "downsample_channels": [sam["downsample_channels"][0], encoder["dim"]]},
            "encoder_config": {"hidden_size": encoder["dim"], "num_hidden_layers": encoder["layers"],
                               "num_attention_heads": encoder["heads"], "num_key_value_heads": encoder["kv_heads"],
                               "intermediate_size": encoder["intermediate_size"], "rms_norm_eps": 1e-6,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}},
        },
        text_config={key: ours[key] for key in text_keys} | {
            "mlp_layer_types": ["dense"] * dense + ["sparse"] * (ours["num_hidden_layers"] - dense),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rms_norm_eps": 1e-6},
    )
    config.save_pretrained(folder)
    for name in ("model-00001-of-000001.safetensors", "model.safetensors.index.json"):
        os.symlink(checkpoint / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def transformers_model(tiny_ocr2_checkpoint, tmp_path_factory):
    from transformers import DeepseekOcr2ForConditionalGeneration

    folder = transformers_copy(tiny_ocr2_checkpoint, tmp_path_factory.mktemp("transformers-ocr2"))
    model, info = DeepseekOcr2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


def transformers_inputs(inputs):
    views = inputs.images[0]
    return dict(input_ids=inputs.input_ids[None], pixel_values=views.global_view[None],
                pixel_values_local=views.tiles if views.has_tiles else None,
                num_local_patches=[views.tiles.shape[0] if views.has_tiles else 0])


@pytest.mark.parametrize("size", [(1240, 1754), (2400, 400), (600, 400)], ids=["a4-6-tiles", "banner-6x1", "small"])
def test_same_logits_and_greedy_tokens_as_transformers(tiny_ocr2_model, tiny_tokenizer, transformers_model, size):
    inputs = tiny_ocr2_model.prepare_inputs(tiny_tokenizer, PROMPT, [document_image(*size)])
    ours = full_logits(tiny_ocr2_model, inputs)
    with torch.inference_mode():
        theirs = transformers_model(**transformers_inputs(inputs)).logits[0].float()
    assert ours.shape == theirs.shape
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5
    tokens, _ = tiny_ocr2_model.generate_tokens(inputs, max_new_tokens=8, repetition=0, loops=None)
    with torch.inference_mode():
        generated = transformers_model.generate(**transformers_inputs(inputs), max_new_tokens=8, do_sample=False,
                                                eos_token_id=1, pad_token_id=2)
    theirs_tokens = generated[0, inputs.input_ids.numel():].tolist()
    if theirs_tokens and theirs_tokens[-1] == 1:
        theirs_tokens = theirs_tokens[:-1]  # EOS: ours does not return it
    assert tokens == theirs_tokens


@pytest.mark.parametrize("size", [(1240, 1754), (2000, 600), (600, 400), (769, 768), (400, 2400)])
def test_token_count_without_views_matches_the_views(tiny_ocr2_model, tiny_model, size):
    """What the service asks before preprocessing a page agrees with the views, for both models."""
    image = document_image(*size)
    for model, presets in ((tiny_ocr2_model, [(1024, 768, True), (1024, 1024, False), (768, 768, False)]),
                           (tiny_model, [(1024, 640, True), (512, 512, False), (1280, 1280, False)])):
        for base, view, crop in presets:
            views = model.processing.prepare_image(image, base, view, crop)
            assert model.count_image_tokens(*size, base, view, crop) == views.num_tokens
