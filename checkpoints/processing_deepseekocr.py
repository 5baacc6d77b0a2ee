"""Image preprocessing and prompt tokenisation for DeepSeek-OCR.

Each image becomes one or two kinds of view:
- a global view: the whole image padded (aspect kept, centred, mean-grey border) to a square, or
  for small no-crop presets stretched to the square;
- in crop mode, when the image is larger than one tile, local views: the image stretched onto a
  grid of square tiles (2 to 9 tiles, the grid whose aspect ratio best fits the image) and cut
  row-major.

A view of S pixels yields a (S/64)×(S/64) feature grid (16-pixel patches, then 4× downsampling).
The prompt reserves one `<image>` token per feature, one per grid row for the row-end newline
embedding and one for the view separator, in this layout:
    global:  (q + 1)·q + 1           with q = ceil(base/16/4)
    tiles:   (q·cols + 1)·(q·rows)   with q = ceil(tile/16/4)
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from PIL import Image, ImageOps

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 128815
BOS_ID = 0
PATCH_SIZE = 16
DOWNSAMPLE_RATIO = 4
MIN_TILES, MAX_TILES = 2, 9
NORM_MEAN = (0.5, 0.5, 0.5)
NORM_STD = (0.5, 0.5, 0.5)
PAD_COLOR = tuple(int(m * 255) for m in NORM_MEAN)  # (127, 127, 127)
# Images up to this size in both sides are not tiled, whatever the preset.
TILING_THRESHOLD = 640
# The original's resolution modes (its README's "Support-Modes"): name → (base_size, image_size, crop_mode).
RESOLUTION_MODES = {
    "Gundam": (1024, 640, True),
    "Tiny": (512, 512, False),
    "Small": (640, 640, False),
    "Base": (1024, 1024, False),
    "Large": (1280, 1280, False),
}


def queries_per_side(view_size: int) -> int:
    return math.ceil((view_size // PATCH_SIZE) / DOWNSAMPLE_RATIO)


def candidate_grids(min_tiles: int = MIN_TILES, max_tiles: int = MAX_TILES) -> list[tuple[int, int]]:
    """(cols, rows) grids with min..max tiles, fewest tiles first.

    Ties in tile count keep the order in which this set iterates when built in this insertion
    order; the original's tie-break depends on that order, so it is reproduced as is.
    """
    grids = set()
    for n in range(min_tiles, max_tiles + 1):
        for cols in range(1, n + 1):
            for rows in range(1, n + 1):
                if min_tiles <= cols * rows <= max_tiles:
                    grids.add((cols, rows))
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_tile_grid(width: int, height: int, tile_size: int, min_tiles=MIN_TILES, max_tiles=MAX_TILES):
    """The (cols, rows) grid whose aspect ratio is closest to the image's.

    On an exact tie the later (larger) grid wins when the image covers more than half of it.
    """
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → its uint8 pixels [3, H, W]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).contiguous()


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] → float32 in [-1, 1], channel by channel."""
    mean = torch.tensor(NORM_MEAN).view(3, 1, 1)
    std = torch.tensor(NORM_STD).view(3, 1, 1)
    return (pixels.float().div(255) - mean) / std


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → normalised float32 tensor [3, H, W] in [-1, 1]."""
    return normalise(to_pixels(image))


def normalisation_table() -> torch.Tensor:
    """float32 [3, 256]: what `normalise` makes of each value of each channel, computed by `normalise` itself.
    A view kept as uint8 pixels is normalised later by looking its values up here (`normalise_by_table`):
    the same numbers, bit for bit, wherever the lookup runs."""
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)
    return normalise(values)[:, 0, :]


def normalise_by_table(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [N, 3, H, W] → `table`'s values [N, 3, H, W] in its dtype and on its device (the pixels
    must be there too): `normalise` without its arithmetic, for views normalised on the GPU."""
    out = torch.empty(pixels.shape, dtype=table.dtype, device=table.device)
    for channel in range(3):
        indices = pixels[:, channel].reshape(-1).int()
        out[:, channel] = table[channel].index_select(0, indices).view(out[:, channel].shape)
    return out


def pad_to_square(image: Image.Image, size: int) -> Image.Image:
    return ImageOps.pad(image, (size, size), method=Image.Resampling.BICUBIC, color=PAD_COLOR)


def cut_tiles(image: Image.Image, grid: tuple[int, int], tile_size: int) -> list[Image.Image]:
    cols, rows = grid
    stretched = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    return [
        stretched.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]


@dataclass
class ImageViews:
    """The views of one image, ready for the vision tower: normalised float32, or uint8 pixels that the
    caller normalises (`prepare_image(..., raw_pixels=True)`)."""

    global_view: torch.Tensor  # [3, S, S]
    tiles: Optional[torch.Tensor]  # [cols·rows, 3, t, t] or None
    grid: tuple[int, int]  # (cols, rows); (1, 1) without tiles
    num_tokens: int  # `<image>` tokens this image takes in the prompt

    @property
    def has_tiles(self) -> bool:
        return self.tiles is not None


def image_token_count(base_size: int, image_size: int, crop_mode: bool, grid=(1, 1)) -> int:
    if not crop_mode:
        q = queries_per_side(image_size)
        return (q + 1) * q + 1
    q_base = queries_per_side(base_size)
    count = (q_base + 1) * q_base + 1
    cols, rows = grid
    if cols > 1 or rows > 1:
        q = queries_per_side(image_size)
        count += (q * cols + 1) * (q * rows)
    return count


def prepare_image(image: Image.Image, base_size: int, image_size: int, crop_mode: bool,
                  raw_pixels: bool = False) -> ImageViews:
    """Build the views of an RGB image for a preset (base_size, image_size, crop_mode); `raw_pixels`: as uint8
    pixels, for the caller to normalise (`normalise_by_table`)."""
    convert = to_pixels if raw_pixels else to_tensor
    image = image.convert("RGB")
    if crop_mode:
        width, height = image.size
        tiled = width > TILING_THRESHOLD or height > TILING_THRESHOLD
        grid = choose_tile_grid(width, height, image_size) if tiled else (1, 1)
        tiles = torch.stack([convert(t) for t in cut_tiles(image, grid, image_size)]) if tiled else None
        global_view = convert(pad_to_square(image, base_size))
    else:
        grid, tiles = (1, 1), None
        if image_size <= TILING_THRESHOLD:  # small views are stretched, not padded
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        global_view = convert(pad_to_square(image, image_size))
    return ImageViews(global_view, tiles, grid, image_token_count(base_size, image_size, crop_mode, grid))


@dataclass
class PromptInputs:
    input_ids: torch.Tensor  # [T] long, BOS first
    image_mask: torch.Tensor  # [T] bool, True at `<image>` positions
    images: list  # ImageViews, in prompt order


def build_prompt_inputs(tokenizer, prompt: str, images: Sequence[Image.Image], base_size: int,
                        image_size: int, crop_mode: bool, prepare: Optional[Callable] = None,
                        raw_pixels: bool = False) -> PromptInputs:
    """Tokenise a prompt whose `<image>` placeholders are filled by `images`, in order.

    Text pieces are encoded without special tokens added; BOS goes first and no EOS is added.
    `prepare(image, base_size, image_size, crop_mode, raw_pixels)` builds an image's views (this model's
    `prepare_image` by default; DeepSeek-OCR 2 passes its own); `raw_pixels`: views as uint8 pixels.
    """
    prepare = prepare or prepare_image
    pieces = prompt.strip().split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(images):
        raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s)")
    ids, mask, views = [BOS_ID], [False], []
    for i, piece in enumerate(pieces):
        text_ids = tokenizer.encode(piece, add_special_tokens=False) if piece else []
        ids += text_ids
        mask += [False] * len(text_ids)
        if i < len(images):
            view = prepare(images[i], base_size, image_size, crop_mode, raw_pixels)
            views.append(view)
            ids += [IMAGE_TOKEN_ID] * view.num_tokens
            mask += [True] * view.num_tokens
    return PromptInputs(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), views)
