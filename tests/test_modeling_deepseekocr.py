"""The tiny model's forward, cache, attention back-ends, batching, stopping and `infer`."""

import copy
import os

import pytest
import torch
from PIL import Image

from checkpoints.generation import STOP_EOS, STOP_MAX_NEW_TOKENS
from checkpoints.modeling_deepseekocr import save_ocr_results
from checkpoints.modeling_deepseekv2 import KVCache
from conftest import document_image

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


@pytest.fixture(scope="module")
def gundam_inputs(tiny_model, tiny_tokenizer):
    return tiny_model.prepare_inputs(tiny_tokenizer, PROMPT, [document_image(1240, 1754)], 1024, 640, True)


def full_logits(model, inputs, attention=None):
    model.config._attn_implementation = attention or "sdpa"
    with torch.inference_mode():
        out = model(input_ids=inputs.input_ids[None], image_mask=inputs.image_mask[None], images=[inputs.images])
    model.config._attn_implementation = "sdpa"
    return out.logits[0]


def test_attention_backends_agree(tiny_model, gundam_inputs):
    sdpa = full_logits(tiny_model, gundam_inputs, "sdpa")
    eager = full_logits(tiny_model, gundam_inputs, "eager")
    assert torch.isfinite(sdpa).all()
    assert (sdpa - eager).norm() / sdpa.norm() < 1e-5


def test_image_features_fill_the_image_positions_in_layout_order(tiny_model, gundam_inputs):
    model = tiny_model.model
    with torch.inference_mode():
        features = model.embed_image(gundam_inputs.images[0])
    assert features.shape[0] == 903
    tile_rows, tile_width = 3 * 10, 2 * 10 + 1  # 2×3 tiles of 10×10 features, each row closed by a newline
    for row in range(tile_rows):
        assert torch.equal(features[row * tile_width + tile_width - 1], model.image_newline)
    global_start = tile_rows * tile_width
    for row in range(16):
        assert torch.equal(features[global_start + row * 17 + 16], model.image_newline)
    assert torch.equal(features[-1], model.view_seperator)
    with torch.inference_mode():
        embeds = model.embed_prompt(gundam_inputs.input_ids[None], gundam_inputs.image_mask[None],
                                    [gundam_inputs.images])
    assert torch.equal(embeds[0, gundam_inputs.image_mask], features)


def test_cached_decoding_matches_full_forward(tiny_model, tiny_tokenizer, gundam_inputs):
    tokens, _ = tiny_model.generate_tokens(gundam_inputs, max_new_tokens=6, repetition=0, loops=None)
    extended = copy.copy(gundam_inputs)
    extended.input_ids = torch.cat([gundam_inputs.input_ids, torch.tensor(tokens[:-1])])
    extended.image_mask = torch.cat([gundam_inputs.image_mask, torch.zeros(len(tokens) - 1, dtype=torch.bool)])
    logits = full_logits(tiny_model, extended)
    prompt_len = gundam_inputs.input_ids.numel()
    assert logits[prompt_len - 1:].argmax(-1).tolist() == tokens


def test_left_padded_batch_matches_single_rows(tiny_model, tiny_tokenizer):
    model = tiny_model.model
    prompts = [tiny_model.prepare_inputs(tiny_tokenizer, PROMPT, [document_image(500, 400, seed=1)], 512, 512, False),
               tiny_model.prepare_inputs(tiny_tokenizer, "<image>\nFree OCR.", [document_image(300, 900, seed=2)],
                                         512, 512, False)]
    length = max(p.input_ids.numel() for p in prompts)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.bool)
    attention = torch.zeros(2, length, dtype=torch.long)
    for row, p in enumerate(prompts):
        n = p.input_ids.numel()
        ids[row, length - n:], mask[row, length - n:], attention[row, length - n:] = p.input_ids, p.image_mask, 1
    with torch.inference_mode():
        cache = KVCache(tiny_model.config.num_hidden_layers)
        embeds = model.embed_prompt(ids, mask, [p.images for p in prompts])
        batched = tiny_model.lm_head(model.decode(embeds, cache=cache, attention_mask=attention)[:, -1])
        next_ids = batched.argmax(-1)
        attention = torch.cat([attention, torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = tiny_model.lm_head(model.decode(model.embed_tokens(next_ids[:, None]), cache=cache,
                                               attention_mask=attention)[:, -1])
    for row, p in enumerate(prompts):
        single = full_logits(tiny_model, p)[-1]
        assert (batched[row] - single).norm() / single.norm() < 1e-5
        extended = copy.copy(p)
        extended.input_ids = torch.cat([p.input_ids, next_ids[row:row + 1]])
        extended.image_mask = torch.cat([p.image_mask, torch.zeros(1, dtype=torch.bool)])
        single_step = full_logits(tiny_model, extended)[-1]
        assert (step[row] - single_step).norm() / single_step.norm() < 1e-5


def test_generation_stops_at_eos_and_at_max_new_tokens(tiny_model, tiny_tokenizer):
    inputs = tiny_model.prepare_inputs(tiny_tokenizer, "<image>\nFree OCR.", [document_image(600, 600)], 512, 512,
                                       False)
    capped, stop = tiny_model.generate_tokens(inputs, max_new_tokens=5)
    assert len(capped) == 5 and stop == STOP_MAX_NEW_TOKENS
    eager_to_stop = copy.deepcopy(tiny_model)
    with torch.no_grad():
        eager_to_stop.lm_head.weight[1] = eager_to_stop.model.norm.weight * 50  # EOS wins every step
    stopped, stop = eager_to_stop.generate_tokens(inputs, max_new_tokens=5)
    assert stop == STOP_EOS and stopped == [] and eager_to_stop.decode_text(tiny_tokenizer, stopped) == ""


def test_infer_returns_text_and_writes_results(tiny_model, tiny_tokenizer, tmp_path, capsys):
    image_path = tmp_path / "page.png"
    document_image(900, 1200).save(image_path)
    out = tmp_path / "out"
    text = tiny_model.infer(tiny_tokenizer, prompt=PROMPT, image_file=str(image_path), output_path=str(out),
                            base_size=1024, image_size=640, crop_mode=True, save_results=True, test_compress=True,
                            max_new_tokens=4)
    assert isinstance(text, str)
    assert (out / "result.mmd").read_text(encoding="utf-8") == text  # no grounding tags to clean
    assert Image.open(out / "result_with_boxes.jpg").size == (900, 1200)
    assert (out / "images").is_dir()
    eval_text = tiny_model.infer(tiny_tokenizer, prompt="<image>\nFree OCR.", image_file=str(image_path),
                                 output_path=str(out), base_size=512, image_size=512, crop_mode=False,
                                 eval_mode=True, max_new_tokens=4)
    assert isinstance(eval_text, str)


def test_saved_results_clean_grounding_and_crop_figures(tmp_path):
    image = document_image(1000, 800)
    raw = ("<|ref|>title<|/ref|><|det|>[[100, 100, 900, 200]]<|/det|>\n# Title\n"
           "<|ref|>image<|/ref|><|det|>[[0, 300, 499, 999]]<|/det|>\n"
           "<|ref|>text<|/ref|><|det|>[[100, 250, 900, 300]]<|/det|>\nBody \\coloneqq x")
    os.makedirs(tmp_path / "images")
    save_ocr_results(raw, image, str(tmp_path))
    assert (tmp_path / "result.mmd").read_text(encoding="utf-8") == "\n# Title\n![](images/0.jpg)\n\n\nBody := x"
    figure = Image.open(tmp_path / "images" / "0.jpg")
    assert figure.size == (int(499 / 999 * 1000), 800 - int(300 / 999 * 800))
    boxes = Image.open(tmp_path / "result_with_boxes.jpg")
    assert boxes.size == image.size and boxes.tobytes() != image.tobytes()
