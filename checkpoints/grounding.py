"""Grounded output of DeepSeek-OCR: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`.

Coordinates are 0–999 relative to the image the model saw (pixel = v / 999 · width or height).
This module turns them into pixel boxes, an annotated image, cropped figures and clean markdown
(the figure references replaced by image links, the other references removed), as the original's
saved results do.
"""

import ast
import hashlib
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

EOS_TEXT = "<｜end▁of▁sentence｜>"
REF_PATTERN = re.compile(r"<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>", re.DOTALL)
FIGURE_LABEL = "image"
# Colours readable on white pages; a label always gets the same one.
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (128, 128, 0), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


@dataclass(frozen=True)
class Region:
    label: str
    box: tuple  # (x1, y1, x2, y2) in pixels of the original image
    box_normalized: tuple  # the model's 0–999 values
    page: int = 1


def strip_eos(text: str) -> str:
    text = text.strip()
    if text.endswith(EOS_TEXT):
        text = text[: -len(EOS_TEXT)]
    return text.strip()


def parse_boxes(det_text: str) -> list:
    """`[[x1, y1, x2, y2], ...]` → list of 4-number tuples; anything malformed is skipped."""
    try:
        value = ast.literal_eval(det_text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return []
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        value = [value]  # a single box without the outer brackets
    if not isinstance(value, (list, tuple)):
        return []
    return [
        tuple(float(v) for v in box)
        for box in value
        if isinstance(box, (list, tuple)) and len(box) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ]


def to_pixels(box: tuple, image_size: tuple) -> tuple:
    width, height = image_size
    x1, x2 = sorted(min(max(int(v / 999 * width), 0), width) for v in (box[0], box[2]))
    y1, y2 = sorted(min(max(int(v / 999 * height), 0), height) for v in (box[1], box[3]))
    return (x1, y1, x2, y2)


def parse_regions(raw_text: str, image_size: tuple, page: int = 1) -> list:
    """Every box of every grounding reference, in the order the model wrote them."""
    return [
        Region(label.strip(), to_pixels(box, image_size), tuple(box), page)
        for label, det in REF_PATTERN.findall(raw_text)
        for box in parse_boxes(det)
    ]


def to_markdown(raw_text: str, image_prefix: str = "images/", first_index: int = 0) -> str:
    """Clean markdown: figure references become `![](images/N.jpg)`, other references disappear.

    Figures are numbered per box, in order, the same numbering `crop_figures` uses; a figure
    reference with several boxes links to each of its crops. `first_index` continues a numbering
    across pages.
    """
    counter = iter(range(first_index, 1 << 62))

    def replace(match: re.Match) -> str:
        label, det = match.group(1).strip(), match.group(2)
        if label != FIGURE_LABEL:
            return ""
        return "".join(f"![]({image_prefix}{next(counter)}.jpg)\n" for _ in parse_boxes(det))

    text = REF_PATTERN.sub(replace, strip_eos(raw_text))
    return text.replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")


def label_color(label: str) -> tuple:
    return PALETTE[int(hashlib.md5(label.encode("utf-8")).hexdigest(), 16) % len(PALETTE)]


def draw_regions(image: Image.Image, regions: list) -> Image.Image:
    """A copy of the image with each region outlined, lightly filled and labelled."""
    annotated = image.convert("RGB")
    overlay = Image.new("RGBA", annotated.size, (0, 0, 0, 0))
    fill_layer, draw = ImageDraw.Draw(overlay), ImageDraw.Draw(annotated)
    font = ImageFont.load_default()
    for region in regions:
        color = label_color(region.label)
        x1, y1, x2, y2 = region.box
        draw.rectangle([x1, y1, x2, y2], outline=color, width=4 if region.label == "title" else 2)
        fill_layer.rectangle([x1, y1, x2, y2], fill=color + (20,))
        text_y = max(0, y1 - 15)
        left, top, right, bottom = draw.textbbox((x1, text_y), region.label, font=font)
        draw.rectangle([left, top, right, bottom], fill=(255, 255, 255))
        draw.text((x1, text_y), region.label, font=font, fill=color)
    annotated.paste(overlay, (0, 0), overlay)
    return annotated


def crop_figures(image: Image.Image, regions: list) -> list:
    """Crops of the figure regions, numbered as `to_markdown` links them (empty boxes give no crop but
    keep their number, so that links and files stay aligned)."""
    crops = []
    for region in regions:
        if region.label != FIGURE_LABEL:
            continue
        x1, y1, x2, y2 = region.box
        crops.append(image.crop((x1, y1, x2, y2)) if x2 > x1 and y2 > y1 else None)
    return crops
