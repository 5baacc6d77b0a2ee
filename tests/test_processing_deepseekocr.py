"""Preprocessing and image-token layout, against the counts and tile grids of the original rules."""

import pytest
import torch
from PIL import Image

from checkpoints.processing_deepseekocr import (
    IMAGE_TOKEN_ID, build_prompt_inputs, candidate_grids, choose_tile_grid, image_token_count, normalisation_table,
    normalise_by_table, prepare_image, to_tensor,
)
from conftest import document_image

PRESETS = {  # name: (base_size, image_size, crop_mode)
    "Tiny": (512, 512, False),
    "Small": (640, 640, False),
    "Base": (1024, 1024, False),
    "Large": (1280, 1280, False),
    "Gundam": (1024, 640, True),
}

# (width, height) → tile grid (cols, rows) the original picks, and Gundam's image-token count.
GRID_TABLE = [
    ((1240, 1754), (2, 3), 903),  # A4 portrait at 150 dpi
    ((1754, 1240), (3, 2), 893),
    ((2480, 3508), (2, 3), 903),  # A4 at 300 dpi
    ((2000, 600), (3, 1), 583),
    ((600, 2400), (1, 4), 713),
    ((1500, 1500), (3, 3), 1203),
    ((641, 640), (2, 2), 693),  # just over the tiling threshold
    ((1250, 1000), (3, 2), 893),  # aspect 1.25: a tie between 2×2 and 3×2, the larger grid wins
    ((1000, 1250), (2, 3), 903),
    ((3000, 100), (9, 1), 1183),
    ((100, 3000), (1, 9), 1263),
    ((1920, 1080), (4, 2), 1093),
    ((1080, 1920), (2, 4), 1113),
    ((1300, 650), (2, 1), 483),
    ((700, 2100), (1, 3), 603),
]


@pytest.mark.parametrize("name, expected", [("Tiny", 73), ("Small", 111), ("Base", 273), ("Large", 421)])
def test_token_count_without_crop(name, expected):
    base, size, crop = PRESETS[name]
    for width, height in [(300, 200), (1240, 1754), (4000, 500)]:
        views = prepare_image(Image.new("RGB", (width, height)), base, size, crop)
        assert views.num_tokens == expected
        assert views.global_view.shape == (3, size, size)
        assert not views.has_tiles


@pytest.mark.parametrize("size, grid, tokens", GRID_TABLE)
def test_gundam_grid_and_tokens(size, grid, tokens):
    assert choose_tile_grid(*size, tile_size=640) == grid
    views = prepare_image(Image.new("RGB", size, "white"), 1024, 640, True)
    assert views.grid == grid and views.num_tokens == tokens
    assert views.tiles.shape == (grid[0] * grid[1], 3, 640, 640)
    assert views.global_view.shape == (3, 1024, 1024)
    assert tokens == 273 + (10 * grid[0] + 1) * 10 * grid[1]


@pytest.mark.parametrize("size", [(640, 640), (400, 300), (1, 1), (640, 20)])
def test_gundam_small_images_are_not_tiled(size):
    views = prepare_image(Image.new("RGB", size), 1024, 640, True)
    assert not views.has_tiles and views.num_tokens == 273


def test_candidate_grids_hold_two_to_nine_tiles():
    grids = candidate_grids()
    assert all(2 <= c * r <= 9 for c, r in grids)
    assert len(grids) == len(set(grids)) == 22
    assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)


def test_normalisation_and_padding_colour():
    image = Image.new("RGB", (100, 50), (255, 0, 127))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 50, 100)
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, -1.0, (127 / 255 - 0.5) / 0.5]))
    # Base pads (no stretch): the top rows are the mean-grey border.
    views = prepare_image(image, 1024, 1024, False)
    grey = (127 / 255 - 0.5) / 0.5
    assert torch.allclose(views.global_view[:, 0, 0], torch.full((3,), grey))
    # Tiny stretches to the square: no border.
    assert torch.allclose(prepare_image(image, 512, 512, False).global_view[:, 0, 0], tensor[:, 0, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_raw_pixels_normalised_by_the_table_are_the_normalised_views_bit_for_bit(dtype):
    # The serving engine ships uint8 pixels and normalises them on the GPU by this table: the same numbers.
    image = document_image(1240, 1754, seed=3)
    normalised = prepare_image(image, 1024, 640, True)
    raw = prepare_image(image, 1024, 640, True, raw_pixels=True)
    assert raw.global_view.dtype == raw.tiles.dtype == torch.uint8 and raw.grid == normalised.grid
    table = normalisation_table().to(dtype)
    assert torch.equal(normalise_by_table(raw.global_view[None], table)[0], normalised.global_view.to(dtype))
    assert torch.equal(normalise_by_table(raw.tiles, table), normalised.tiles.to(dtype))
    every_value = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)
    assert torch.equal(normalise_by_table(every_value, normalisation_table()),
                       torch.stack([to_tensor(Image.new("RGB", (16, 16), (v, v, v)))[:, 0, 0] for v in range(256)],
                                   dim=1).view(1, 3, 16, 16))


def test_tiles_are_cut_row_major_from_the_stretched_image():
    image = Image.new("RGB", (1280, 1920), "white")
    image.paste((255, 0, 0), (0, 0, 640, 640))  # top-left tile red
    image.paste((0, 0, 255), (640, 1280, 1280, 1920))  # bottom-right tile blue
    views = prepare_image(image, 1024, 640, True)
    assert views.grid == (2, 3)
    assert views.tiles[0, 0].mean() > 0.99 and views.tiles[0, 2].mean() < -0.99
    assert views.tiles[5, 2].mean() > 0.99 and views.tiles[5, 0].mean() < -0.99


def test_prompt_layout(tiny_tokenizer):
    prompt = "<image>\n<|grounding|>Convert the document to markdown."
    inputs = build_prompt_inputs(tiny_tokenizer, prompt, [document_image(1240, 1754)], 1024, 640, True)
    ids, mask = inputs.input_ids, inputs.image_mask
    assert ids[0] == 0 and ids[-1] != 1  # BOS first, no EOS
    assert mask.sum() == 903 and bool(mask[1:904].all()) and not bool(mask[0]) and not bool(mask[904:].any())
    assert bool((ids[mask] == IMAGE_TOKEN_ID).all())
    text_ids = tiny_tokenizer.encode("\n<|grounding|>Convert the document to markdown.", add_special_tokens=False)
    assert ids[904:].tolist() == text_ids


def test_prompt_needs_one_placeholder_per_image(tiny_tokenizer):
    with pytest.raises(ValueError, match="placeholder"):
        build_prompt_inputs(tiny_tokenizer, "Free OCR.", [Image.new("RGB", (10, 10))], 1024, 640, True)


def test_counts_agree_with_formula_for_all_presets():
    for name, (base, size, crop) in PRESETS.items():
        assert image_token_count(base, size, crop) == prepare_image(Image.new("RGB", (500, 400)), base, size,
                                                                    crop).num_tokens, name
