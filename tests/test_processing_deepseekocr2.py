"""DeepSeek-OCR 2's views and prompt layout: tiling by 768, token counts without newlines, the views' pixels."""

import pytest
import torch
from PIL import Image

from checkpoints.processing_deepseekocr import PAD_COLOR, to_tensor
from checkpoints.processing_deepseekocr2 import (TILING_THRESHOLD, build_prompt_inputs, check_resolution,
                                                 choose_tile_grid, image_token_count, prepare_image)
from conftest import document_image

# (width, height) → (cols, rows) of 768-pixel tiles, or None when the image is not tiled
TILING = [
    ((1240, 1754), (2, 3)),  # A4 portrait at 150 dpi
    ((1754, 1240), (3, 2)),  # A4 landscape
    ((2000, 600), (3, 1)),
    ((2400, 400), (6, 1)),  # the widest grid: 6 tiles
    ((400, 2400), (1, 6)),
    ((10000, 1000), (6, 1)),  # beyond 6:1 still 6 tiles
    ((800, 1600), (1, 2)),
    ((1600, 1200), (3, 2)),
    ((769, 768), (2, 2)),  # one side just over 768
    ((800, 1000), (2, 3)),
    ((1000, 800), (2, 2)),  # 5:4 ties (2, 2) and (3, 2); a small image keeps the fewer tiles
    ((1250, 1000), (2, 2)),  # still fewer: its area is under half of 6 tiles of 768 (with 640 it would tip)
    ((2000, 1600), (3, 2)),  # a large image takes the larger grid on that tie
    ((768, 768), None),  # both sides ≤ 768: no tiles
    ((600, 400), None),
    ((768, 300), None),
]


@pytest.mark.parametrize("size,grid", TILING)
def test_tiling_table(size, grid):
    width, height = size
    tiled = width > TILING_THRESHOLD or height > TILING_THRESHOLD
    assert tiled == (grid is not None)
    if grid is not None:
        assert choose_tile_grid(width, height) == grid
        cols, rows = grid
        assert 2 <= cols * rows <= 6


def test_tiling_agrees_with_transformers_over_a_sweep_of_sizes():
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import get_optimal_tiled_canvas

    sizes = [(w, h) for w in range(200, 6000, 149) for h in range(200, 6000, 163)]
    disagree = [(w, h) for w, h in sizes
                if choose_tile_grid(w, h) != tuple(get_optimal_tiled_canvas((h, w), (768, 768), 2, 6))]
    assert disagree == []


@pytest.mark.parametrize("base,size,crop,grid,count", [
    (1024, 768, True, (1, 1), 257),  # global view only: 256 + separator
    (1024, 768, True, (2, 3), 256 + 6 * 144 + 1),  # 1121
    (1024, 768, True, (3, 1), 256 + 3 * 144 + 1),
    (1024, 768, True, (2, 1), 256 + 2 * 144 + 1),
    (768, 768, True, (2, 2), 144 + 4 * 144 + 1),
    (1024, 1024, False, (1, 1), 257),
    (768, 768, False, (1, 1), 145),
])
def test_image_token_counts(base, size, crop, grid, count):
    assert image_token_count(base, size, crop, grid) == count


@pytest.mark.parametrize("base,size,crop", [(1024, 640, True), (1280, 768, True), (640, 640, False),
                                            (1280, 1280, False), (512, 512, False)])
def test_resolutions_without_learned_queries_are_refused(base, size, crop):
    with pytest.raises(ValueError, match="image_size|base_size"):
        check_resolution(base, size, crop)


def test_a4_page_views():
    image = document_image(1240, 1754)
    views = prepare_image(image, 1024, 768, True)
    assert views.grid == (2, 3) and views.num_tokens == 1121
    assert views.tiles.shape == (6, 3, 768, 768) and views.global_view.shape == (3, 1024, 1024)
    # The tiles are the image stretched to 2×3 tiles and cut row-major.
    stretched = image.resize((2 * 768, 3 * 768), Image.Resampling.BICUBIC)
    second = to_tensor(stretched.crop((768, 0, 2 * 768, 768)))
    assert torch.equal(views.tiles[1], second)
    # The global view keeps the aspect ratio: the sides are padded with the mean grey.
    grey = (PAD_COLOR[0] / 255 - 0.5) / 0.5
    assert torch.allclose(views.global_view[:, 512, :20], torch.full((3, 20), grey))


def test_small_image_has_only_the_global_view():
    views = prepare_image(document_image(600, 400), 1024, 768, True)
    assert views.tiles is None and views.grid == (1, 1) and views.num_tokens == 257


def test_global_only_views_stretch_768_and_pad_1024():
    image = document_image(900, 1200)
    stretched = prepare_image(image, 768, 768, False)
    assert stretched.global_view.shape == (3, 768, 768) and stretched.num_tokens == 145
    assert torch.equal(stretched.global_view, to_tensor(image.resize((768, 768), Image.Resampling.BICUBIC)))
    padded = prepare_image(image, 1024, 1024, False)
    assert padded.global_view.shape == (3, 1024, 1024) and padded.num_tokens == 257
    grey = (PAD_COLOR[0] / 255 - 0.5) / 0.5
    assert torch.allclose(padded.global_view[:, 512, :10], torch.full((3, 10), grey))


def test_prompt_reserves_one_token_per_query_and_the_separator(tiny_tokenizer):
    prompt = "<image>\n<|grounding|>Convert the document to markdown."
    inputs = build_prompt_inputs(tiny_tokenizer, prompt, [document_image(1240, 1754)])
    text_ids = tiny_tokenizer.encode("\n<|grounding|>Convert the document to markdown.", add_special_tokens=False)
    assert inputs.input_ids[0] == 0  # BOS
    assert int(inputs.image_mask.sum()) == 1121
    assert inputs.image_mask[1:1122].all() and not inputs.image_mask[1122:].any()
    assert inputs.input_ids[1122:].tolist() == text_ids
    assert (inputs.input_ids[inputs.image_mask] == 128815).all()
