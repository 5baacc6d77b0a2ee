"""Image preprocessing and prompt tokenisation for DeepSeek-OCR 2.

The same pixels as the first model (RGB, mean/std 0.5, mean-grey padding, bicubic resizing), other
views and another token layout:
- dynamic resolution (crop mode, the official default): a 1024-pixel global view, the image padded to
  the square; and when either side exceeds 768 pixels, local views: the image stretched onto a grid of
  768-pixel tiles (2 to 6, the grid whose aspect ratio best fits the image, chosen as the first model
  chooses with 768 in place of 640) and cut row-major;
- a single view (no crop): the image stretched to 768 or padded to 1024.

The encoder turns a view of S pixels into (S/64)² query outputs, and nothing else goes between them: no
row-end newline tokens. Per image, in the prompt and in the order of the embeddings that fill it:
    the tiles' tokens, tile after tile (144 each), then the global view's (256), then one view separator
    → 256 + 144·tiles + 1 `<image>` tokens (no crop: (S/64)² + 1).
"""

import math
from typing import Sequence

import torch
from PIL import Image

from . import processing_deepseekocr as first_model
from .processing_deepseekocr import (DOWNSAMPLE_RATIO, PATCH_SIZE, ImageViews, PromptInputs, cut_tiles,
                                     normalisation_table, normalise_by_table, pad_to_square, to_pixels, to_tensor)

BASE_SIZE = 1024
TILE_SIZE = 768
MIN_TILES, MAX_TILES = 2, 6
# Images up to this size in both sides are not tiled.
TILING_THRESHOLD = 768
# The view sizes the encoder has learned queries for.
VIEW_SIZES = (768, 1024)
# The views the original's `infer()` builds for which the encoder has queries: name → (base_size, image_size,
# crop_mode). Its README names one mode, the dynamic resolution ("Gundam" here, as the first model calls its
# own); without crop mode it builds one view of `image_size`, 1024 padded or 768 stretched, the kinds of view
# the first model's "Base" and "Small" are. Its encoder has no queries for the first model's 512 and 1280 views.
RESOLUTION_MODES = {
    "Gundam": (BASE_SIZE, TILE_SIZE, True),
    "Small": (TILE_SIZE, TILE_SIZE, False),
    "Base": (BASE_SIZE, BASE_SIZE, False),
}


def check_resolution(base_size: int, image_size: int, crop_mode: bool) -> None:
    """Refuse a (base_size, image_size, crop_mode) the model has no views for.

    Crop mode: the global view is `base_size` and the tiles are 768 (the original cuts 768-pixel tiles
    whatever `image_size` says, and counts tokens with `image_size`: they agree only at 768). No crop:
    one view of `image_size`; `base_size` is not used.
    """
    if crop_mode:
        if base_size not in VIEW_SIZES or image_size != TILE_SIZE:
            raise ValueError(f"crop mode needs base_size in {VIEW_SIZES} and image_size {TILE_SIZE}, "
                             f"not base_size {base_size} and image_size {image_size}")
    elif image_size not in VIEW_SIZES:
        raise ValueError(f"without crop mode image_size must be one of {VIEW_SIZES}, not {image_size}")


def tokens_per_view(view_size: int) -> int:
    side = math.ceil((view_size // PATCH_SIZE) / DOWNSAMPLE_RATIO)
    return side * side


def choose_tile_grid(width: int, height: int, tile_size: int = TILE_SIZE, min_tiles: int = MIN_TILES,
                     max_tiles: int = MAX_TILES) -> tuple[int, int]:
    """The (cols, rows) grid of 2 to 6 tiles whose aspect ratio is closest to the image's (ties: see the
    first model's `choose_tile_grid`, whose search and tie-break the original reuses)."""
    return first_model.choose_tile_grid(width, height, tile_size, min_tiles, max_tiles)


def image_token_count(base_size: int, image_size: int, crop_mode: bool, grid=(1, 1)) -> int:
    check_resolution(base_size, image_size, crop_mode)
    if not crop_mode:
        return tokens_per_view(image_size) + 1
    cols, rows = grid
    tiles = cols * rows if cols > 1 or rows > 1 else 0
    return tokens_per_view(base_size) + tokens_per_view(image_size) * tiles + 1


def prepare_image(image: Image.Image, base_size: int = BASE_SIZE, image_size: int = TILE_SIZE,
                  crop_mode: bool = True, raw_pixels: bool = False) -> ImageViews:
    """Build the views of an image for (base_size, image_size, crop_mode); `raw_pixels`: as uint8 pixels (see
    the first model's `prepare_image`)."""
    check_resolution(base_size, image_size, crop_mode)
    convert = to_pixels if raw_pixels else to_tensor
    image = image.convert("RGB")
    grid, tiles = (1, 1), None
    if crop_mode:
        width, height = image.size
        if width > TILING_THRESHOLD or height > TILING_THRESHOLD:
            grid = choose_tile_grid(width, height)
            tiles = torch.stack([convert(t) for t in cut_tiles(image, grid, TILE_SIZE)])
        global_view = convert(pad_to_square(image, base_size))
    else:
        if image_size <= TILING_THRESHOLD:  # the 768 view is stretched, the 1024 view padded
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        global_view = convert(pad_to_square(image, image_size))
    return ImageViews(global_view, tiles, grid, image_token_count(base_size, image_size, crop_mode, grid))


def build_prompt_inputs(tokenizer, prompt: str, images: Sequence[Image.Image], base_size: int = BASE_SIZE,
                        image_size: int = TILE_SIZE, crop_mode: bool = True, raw_pixels: bool = False) -> PromptInputs:
    """Tokenise a prompt whose `<image>` placeholders are filled by `images` (BOS first, no EOS), as the
    first model does, with this model's views and token counts."""
    return first_model.build_prompt_inputs(tokenizer, prompt, images, base_size, image_size, crop_mode,
                                           prepare=prepare_image, raw_pixels=raw_pixels)


__all__ = ["BASE_SIZE", "TILE_SIZE", "MIN_TILES", "MAX_TILES", "TILING_THRESHOLD", "VIEW_SIZES", "RESOLUTION_MODES",
           "ImageViews", "PromptInputs", "build_prompt_inputs", "check_resolution", "choose_tile_grid",
           "image_token_count", "normalisation_table", "normalise_by_table", "prepare_image", "tokens_per_view"]
