"""Grounded output of DeepSeek-OCR: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`.

Coordinates are 0–999 relative to the image the model saw (pixel = v / 999 · width or height).
In grounded markdown a reference opens a region: what the model wrote after its tags, up to the next
reference, is that region's content. `read_page` walks a page's text once and derives everything from
that walk: pixel boxes, blocks (a region with its content), and clean markdown (the figure references
replaced by image links, the other references removed), as the original's saved results do. An
annotated image and cropped figures are drawn from the regions.

Figures are numbered per box, in the order written, continuing across pages: the markdown links
`images/N.jpg` and the region's `figure` is that N, so crops, links and blocks agree.
"""

import ast
import hashlib
import re
from dataclasses import dataclass
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

EOS_TEXT = "<｜end▁of▁sentence｜>"
REF_PATTERN = re.compile(r"<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>", re.DOTALL)
FIGURE_LABEL = "image"
FIGURE_PREFIX = "images/"  # where the markdown links figure crops
UNLOCATED_LABEL = "text"  # the label of a block for text written before any reference
MODEL_SPACE = (999, 999)  # the model's own coordinates, for what does not depend on the image size
# Colours readable on white pages; a label always gets the same one.
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (128, 128, 0), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


@dataclass(frozen=True)
class Region:
    label: str
    box: tuple  # (x1, y1, x2, y2) in pixels of the original image
    box_normalized: tuple  # the model's 0–999 values
    page: int = 1
    figure: Optional[int] = None  # N of the crop `images/N.jpg`, for a box of a figure reference


@dataclass(frozen=True)
class Reference:
    """One `<|ref|>…<|/det|>` pair as written, with the text after it up to the next pair."""
    label: str
    boxes: tuple  # the well-formed 0–999 boxes
    text: str


@dataclass(frozen=True)
class Block:
    """A region and the content the model wrote for it (region None: text written before any reference,
    or a reference whose boxes were all malformed)."""
    label: str
    region: Optional[Region]
    text: str  # grounding tags removed, surrounding blank lines dropped


@dataclass(frozen=True)
class PageLayout:
    regions: list  # every box, in the order written
    blocks: list  # reading order; a reference with several boxes gives a block per box, its text on the first
    markdown: str
    figures_used: int  # figure numbers this page took; the next page starts after them


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


def split_references(text: str) -> tuple:
    """(the text before the first reference, [Reference, ...]): the one walk over the grounding tags."""
    pieces = REF_PATTERN.split(text)  # [before, label, det, after, label, det, after, ...]
    references = [Reference(label.strip(), tuple(parse_boxes(det)), after)
                  for label, det, after in zip(pieces[1::3], pieces[2::3], pieces[3::3])]
    return pieces[0], references


def figure_file_name(number: int) -> str:
    return f"{number}.jpg"


def clean_markdown(text: str) -> str:
    """What the original's saved markdown rewrites: two mathtools symbols most renderers lack."""
    return text.replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")


def block_text(text: str) -> str:
    """A region's content without the blank lines around it (a first line's indentation is kept)."""
    return clean_markdown(re.sub(r"\A\s*\n", "", text).rstrip())


def read_page(raw_text: str, image_size: tuple, page: int = 1, first_figure: int = 0,
              image_prefix: str = FIGURE_PREFIX) -> PageLayout:
    """Regions in pixels of `image_size`, blocks and markdown of one page, from one walk of its text.

    A figure reference takes a number per box, from `first_figure` on, and links each crop in the
    markdown; other references disappear from the markdown and keep their text.
    """
    before, references = split_references(strip_eos(raw_text))
    regions, blocks, markdown = [], [], [before]
    if before.strip():
        blocks.append(Block(UNLOCATED_LABEL, None, block_text(before)))
    next_figure = first_figure
    for reference in references:
        own = []
        for box in reference.boxes:
            figure = None
            if reference.label == FIGURE_LABEL:
                figure, next_figure = next_figure, next_figure + 1
            own.append(Region(reference.label, to_pixels(box, image_size), box, page, figure))
        regions += own
        content = block_text(reference.text)
        if own:  # the content belongs to the reference, not to one box: joined, blocks never repeat it
            blocks += [Block(reference.label, region, content if i == 0 else "") for i, region in enumerate(own)]
        else:  # no well-formed box: the text stays, without a position
            blocks.append(Block(reference.label, None, content))
        markdown += [f"![]({image_prefix}{figure_file_name(r.figure)})\n" for r in own if r.figure is not None]
        markdown.append(reference.text)
    return PageLayout(regions, blocks, clean_markdown("".join(markdown)), next_figure - first_figure)


def parse_regions(raw_text: str, image_size: tuple, page: int = 1, first_figure: int = 0) -> list:
    """Every box of every grounding reference, in the order the model wrote them."""
    return read_page(raw_text, image_size, page, first_figure).regions


def to_markdown(raw_text: str, image_prefix: str = FIGURE_PREFIX, first_index: int = 0) -> str:
    """Clean markdown: figure references become `![](images/N.jpg)`, other references disappear.

    Figures are numbered per box, in order, as `read_page` numbers the regions; a figure reference
    with several boxes links to each of its crops. `first_index` continues a numbering across pages.
    """
    return read_page(raw_text, MODEL_SPACE, first_figure=first_index, image_prefix=image_prefix).markdown


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


def crop_figure(image: Image.Image, region: Region) -> Optional[Image.Image]:
    """The crop of a region, or None when its box is empty in pixels."""
    x1, y1, x2, y2 = region.box
    return image.crop((x1, y1, x2, y2)) if x2 > x1 and y2 > y1 else None


def crop_figures(image: Image.Image, regions: list) -> list:
    """Crops of the figure regions in the order of their numbers (`Region.figure`), as the markdown links
    them; an empty box gives None but keeps its place, so that links and files stay aligned."""
    return [crop_figure(image, region) for region in regions if region.figure is not None]
