"""The vision side of the engine (`ocr_service/vision.py`) on the CPU with tiny checkpoints: views shipped as
uint8 pixels and normalised where the towers run give what the model's own normalised views give."""

import pytest
import torch

from conftest import document_image
from ocr_service.presets import Resolution
from ocr_service.vision import Preprocessor, encode_prompts, views_for_towers

PROMPT = "<image>\nFree OCR."


@pytest.fixture(scope="module", params=["ocr", "ocr2"])
def model_and_tokenizer(request, tiny_checkpoint, tiny_ocr2_checkpoint):
    import checkpoints
    from transformers import PreTrainedTokenizerFast

    folder = tiny_checkpoint if request.param == "ocr" else tiny_ocr2_checkpoint
    cls = checkpoints.DeepseekOCRForCausalLM if request.param == "ocr" else checkpoints.DeepseekOCR2ForCausalLM
    return cls.from_pretrained(str(folder), dtype=torch.float32).eval(), PreTrainedTokenizerFast.from_pretrained(
        str(folder))


def gundam(model) -> Resolution:
    return Resolution(*model.processing.RESOLUTION_MODES["Gundam"])


def test_the_preprocessor_ships_uint8_pixels_that_the_towers_see_normalised(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    preset = gundam(model)
    image = document_image(900, 1300, seed=4)
    shipped = Preprocessor(model, tokenizer, 1)._prepare(image, PROMPT, preset)
    own = model.prepare_inputs(tokenizer, PROMPT, [image], preset.base_size, preset.image_size, preset.crop_mode)
    raw, normalised = shipped.images[0], own.images[0]
    assert raw.global_view.dtype == raw.tiles.dtype == torch.uint8
    assert torch.equal(shipped.input_ids, own.input_ids)
    assert torch.equal(views_for_towers(model, raw.global_view[None]), normalised.global_view[None])
    assert torch.equal(views_for_towers(model, raw.tiles), normalised.tiles)
    assert torch.equal(views_for_towers(model, normalised.tiles), normalised.tiles)  # normalised views pass through


def test_encoding_shipped_pixels_equals_encoding_the_models_own_views(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    preset = gundam(model)
    images = [document_image(900, 1300, seed=5), document_image(700, 500, seed=6)]
    preprocessor = Preprocessor(model, tokenizer, 1)
    shipped = [preprocessor._prepare(image, PROMPT, preset) for image in images]
    own = [model.prepare_inputs(tokenizer, PROMPT, [image], preset.base_size, preset.image_size, preset.crop_mode)
           for image in images]
    for from_pixels, from_views in zip(encode_prompts(model, shipped), encode_prompts(model, own)):
        assert torch.equal(from_pixels, from_views)


def test_a_batched_pass_gives_each_prompt_the_models_own_embeddings(model_and_tokenizer):
    """encode_prompts writes the image features by position, all prompts in one tensor: each prompt's rows
    are its own token embeddings where it has text and its image's features (in the model's order) where it
    has `<image>` tokens, as the model's own embed_prompt gives them."""
    model, tokenizer = model_and_tokenizer
    preset = gundam(model)
    images = [document_image(900, 1300, seed=7), document_image(640, 480, seed=8), document_image(1200, 800, seed=9)]
    prompts = [model.prepare_inputs(tokenizer, PROMPT, [image], preset.base_size, preset.image_size, preset.crop_mode)
               for image in images]
    batched = encode_prompts(model, prompts)
    assert [e.shape[0] for e in batched] == [p.input_ids.numel() for p in prompts]
    with torch.inference_mode():
        for embeds, prompt in zip(batched, prompts):
            own = model.model.embed_prompt(prompt.input_ids[None], prompt.image_mask[None], [prompt.images])[0]
            text = ~prompt.image_mask
            assert torch.equal(embeds[text], own[text])
            torch.testing.assert_close(embeds[prompt.image_mask], own[prompt.image_mask], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the uploads' own stream is CUDA's")
def test_on_cuda_the_pixels_upload_on_a_stream_of_their_own_before_the_towers_read_them(tiny_checkpoint):
    """On a GPU the pass's views are copied from pinned memory on a stream of their own, every size at once, and
    the towers' stream waits for each size's copies: the embeddings are, bit for bit, those of the same pass
    over views that were on the GPU before it began."""
    import copy

    import checkpoints
    from transformers import PreTrainedTokenizerFast

    model = checkpoints.DeepseekOCRForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    model = model.to("cuda").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tiny_checkpoint))
    preset = gundam(model)
    images = [document_image(900, 1300, seed=10), document_image(1200, 800, seed=11)]
    pinned = [Preprocessor(model, tokenizer, 1, pin=True)._prepare(image, PROMPT, preset) for image in images]
    assert pinned[0].images[0].tiles.is_pinned()
    there = copy.deepcopy(pinned)
    for prompt in there:
        for views in prompt.images:
            views.global_view, views.tiles = views.global_view.cuda(), views.tiles.cuda()
    torch.cuda.synchronize()
    expected = encode_prompts(model, there)
    uploaded = encode_prompts(model, pinned)
    for got, want in zip(uploaded, expected):
        assert torch.equal(got, want)
