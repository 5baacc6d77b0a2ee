"""The engine serving DeepSeek-OCR 2 on the CPU (float32, tiny checkpoint): the model the folder holds is the one
served, with its own views and presets; the batched paged path gives the plain path's greedy tokens."""

import pytest

from conftest import document_image
from ocr_service.engine import OCREngine, checkpoint_tensor_shapes
from ocr_service.errors import InputError
from ocr_service.presets import Resolution, resolution
from ocr_service.settings import Settings
from ocr_service.vision import pass_pixels, vision_pass_shapes

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
CPU = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cpu"})
# (width, height): an A4 page (2×3 tiles), a wide page (3×1), a banner (6×1, the most tiles), a small page (none)
SHAPES = [(1240, 1754), (2000, 600), (2400, 400), (600, 400)]


def engine(checkpoint, logs=None, **settings) -> OCREngine:
    return OCREngine(checkpoint, CPU.replace(**settings), (logs.append if logs is not None else lambda _: None))


@pytest.fixture(scope="module")
def reference(tiny_ocr2_checkpoint):
    return engine(tiny_ocr2_checkpoint, engine="reference")


def test_the_folder_decides_the_model_and_its_presets(tiny_ocr2_checkpoint, reference):
    logs = []
    served = engine(tiny_ocr2_checkpoint, logs, engine="reference")  # DEEPSEEK_OCR_MODEL left at deepseek-ocr
    assert type(served.model).__name__ == "DeepseekOCR2ForCausalLM"
    assert any("holds DeepSeek-OCR 2 weights: serving them" in line for line in logs)
    assert any(line.startswith("DeepSeek-OCR 2 loaded on cpu") for line in logs)
    assert served.presets == {"Gundam (Recommended)": Resolution(1024, 768, True),
                              "Small": Resolution(768, 768, False), "Base": Resolution(1024, 1024, False)}
    for name in ("Tiny", "Large"):
        with pytest.raises(InputError, match=rf"resolution_size '{name}' has no equivalent in DeepSeek-OCR 2.*"
                                             "choose one of Gundam \\(Recommended\\), Small, Base"):
            served.resolution(name)
    with pytest.raises(InputError, match="unknown resolution_size 'Huge'; choose one of Gundam"):
        served.resolution("Huge")


def test_a_preset_chosen_by_name_gets_this_models_views(reference):
    """presets.resolution gives the first model's geometry with the choice's name (the pipeline and the bulk
    command use it): this engine reads the choice with its own views, or refuses it naming the choices."""
    page = document_image(1240, 1754)
    job = reference.prepare([page], PROMPT, resolution("Gundam (Recommended)"), 2)
    assert job.resolution == Resolution(1024, 768, True) and job.prompt_sizes[0] > 1121
    assert reference.prompt_tokens(PROMPT, page.size, resolution("Small")) == \
        reference.prompt_tokens(PROMPT, page.size, Resolution(768, 768, False))
    with pytest.raises(InputError, match="resolution_size 'Tiny' has no equivalent in DeepSeek-OCR 2"):
        reference.prepare([page], PROMPT, resolution("Tiny"), 2)
    with pytest.raises(InputError, match=r"resolution_size: DeepSeek-OCR 2 cannot read this preset.*choose one of"):
        reference.prepare([page], PROMPT, Resolution(1024, 640, True), 2)  # geometry alone: the first model's tiles


def test_prompt_sizes_are_known_before_preprocessing(reference):
    for name, preset in reference.presets.items():
        for size in SHAPES + [(768, 768), (769, 300), (3000, 500)]:
            image = document_image(*size)
            inputs = reference.model.prepare_inputs(reference.tokenizer, PROMPT, [image], preset.base_size,
                                                    preset.image_size, preset.crop_mode)
            assert reference.prompt_tokens(PROMPT, image.size, preset) == inputs.input_ids.numel(), (name, size)


def test_batched_paged_path_matches_the_plain_path_on_every_page_shape(tiny_ocr2_checkpoint, reference):
    batched = engine(tiny_ocr2_checkpoint, max_rows=2, sync_every=5)
    pages = [document_image(*size, seed=i) for i, size in enumerate(SHAPES)]
    jobs = [(pages, "Gundam (Recommended)", 12), (pages[:2], "Base", 7), (pages[2:], "Small", 9)]
    submitted = [batched.submit(images, PROMPT, batched.resolution(name), n) for images, name, n in jobs]
    for job, (images, name, n) in zip(submitted, jobs):  # 8 pages through 2 rows: rows and blocks reused
        got = job.wait(300)
        plain = reference.run_pages(images, PROMPT, reference.resolution(name), n)
        assert [r.token_ids for r in got] == [r.token_ids for r in plain]
        assert [r.image_tokens for r in got] == [r.image_tokens for r in plain]
        assert sum(len(r.token_ids) for r in got) > 0
    gundam = [r.image_tokens for r in submitted[0].wait(1)]
    assert gundam == [256 + 144 * tiles + 1 for tiles in (6, 3, 6, 0)]


def test_vision_passes_are_sized_for_this_models_views(reference):
    model = reference.model
    shapes = vision_pass_shapes(model, 16, pass_pixels(model))
    assert sorted((side, views) for views, _, side, _ in shapes) == [(768, 16), (768, 16 * 6), (1024, 16)]
    assert pass_pixels(model) == 16 * 6 * 768 ** 2


def test_checkpoint_tensor_shapes_match_the_file(tiny_ocr2_checkpoint):
    from safetensors import safe_open

    with safe_open(str(tiny_ocr2_checkpoint / "model-00001-of-000001.safetensors"), "pt") as handle:
        in_file = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    assert checkpoint_tensor_shapes(tiny_ocr2_checkpoint) == in_file


def test_the_vision_setting_reaches_this_models_sam(tiny_ocr2_checkpoint, reference):
    import torch

    original = engine(tiny_ocr2_checkpoint, engine="reference", vision="original")
    blocks = [model.model.sam_model.blocks for model in (reference.model, original.model)]
    assert all(b.attn.fold_relative_positions for b in blocks[0])
    assert not any(b.attn.fold_relative_positions for b in blocks[1])
    views = torch.randn(2, 3, 768, 768)
    with torch.inference_mode():
        folded, dense = reference.model.model.encode_views(views), original.model.model.encode_views(views)
    assert torch.allclose(folded, dense, rtol=1e-4, atol=1e-5)
