"""Grounded output of DeepSeek-OCR: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`.

Coordinates are 0–999 relative to the image the model saw (pixel = v / 999 · width or height).
In grounded markdown a reference opens a region: what the model wrote after its tags, up to the next
reference, is that region's content. `read_page` walks a page's text once and derives everything from
that walk: pixel boxes, blocks (a region with its content), and clean markdown (the figure references
replaced by image links, the other references removed), as the original's saved results do. An
annotated image and cropped figures are drawn from the regions.

Figures are numbered per box that has pixels, in the order written, continuing across pages: the
markdown links `images/N.jpg` and the region's `figure` is that N, so crops, links and blocks agree. A
figure box that is empty in pixels has no crop, so it takes no number and the markdown links nothing.

The model's output may be cut (`max_new_tokens`) or malformed anywhere; the walk never fails and never
lets a grounding tag through into markdown or blocks:
- a box list is well-formed when it holds boxes of 4 finite numbers; values outside 0–999 are clamped and
  corners put in order; a box of anything else is skipped, and a reference left with no box keeps its text
  in a block without a box;
- a label or box list whose closing tag never comes ends at the end of its line (what follows is the
  reference's text; an unclosed box list gives no box), so a reference cut inside its tags leaves nothing;
- a box list outside any reference is dropped, stray closing tags are removed, and consecutive box lists of
  one reference add up.
"""

import ast
import hashlib
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Optional

from PIL import Image, ImageDraw, ImageFont

EOS_TEXT = "<｜end▁of▁sentence｜>"
REF_OPEN, REF_CLOSE, DET_OPEN, DET_CLOSE = "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>"
REFERENCE_TAGS = (REF_OPEN, REF_CLOSE, DET_OPEN, DET_CLOSE)
GROUNDING_PROMPT_TAG = "<|grounding|>"  # the prompt's switch to grounded output; never content
REFERENCE_TAG = re.compile("(" + "|".join(map(re.escape, REFERENCE_TAGS)) + ")")
GROUNDING_TAG = re.compile("|".join(map(re.escape, (*REFERENCE_TAGS, GROUNDING_PROMPT_TAG))))
# Added tokens that are content: the model writes tables with them.
TABLE_TOKENS = ("<td>", "</td>", "<tr>", "</tr>")
FIGURE_LABEL = "image"
FIGURE_PREFIX = "images/"  # where the markdown links figure crops
UNLOCATED_LABEL = "text"  # the label of a block for text written before any reference
MODEL_MAX = 999  # the model's coordinates run from 0 to this
MODEL_SPACE = (MODEL_MAX, MODEL_MAX)  # for what does not depend on the image size
# Colours readable on white pages; a label always gets the same one.
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (128, 128, 0), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


@dataclass(frozen=True)
class Region:
    label: str
    box: tuple  # (x1, y1, x2, y2) in pixels of the original image
    box_normalized: tuple  # the model's values, corners in order, within 0–999
    page: int = 1
    figure: Optional[int] = None  # N of the crop `images/N.jpg`, for a figure box that has pixels


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


def non_content_tokens(added_tokens: Iterable[str]) -> frozenset:
    """Of a tokenizer's added tokens, those that are never a page's content (BOS, EOS, padding,
    placeholders, `<image>`, chat and tool markers, `<|grounding|>`): all but the table tokens and the
    reference tags, which the grounding walk reads."""
    return frozenset(added_tokens) - set(TABLE_TOKENS) - set(REFERENCE_TAGS)


@lru_cache(maxsize=8)
def _token_pattern(tokens: frozenset) -> Optional[re.Pattern]:
    # Longest first, so that a token that contains another is removed whole.
    ordered = sorted((t for t in tokens if t), key=lambda t: (-len(t), t))
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def remove_all(pattern: re.Pattern, text: str) -> str:
    """`text` without matches of `pattern`: removing one can join its neighbours into a new one
    (`<` + a tag + `|ref|>`), so until none is left."""
    text, removed = pattern.subn("", text)
    while removed:
        text, removed = pattern.subn("", text)
    return text


def remove_tokens(text: str, tokens: frozenset) -> str:
    """`text` without any occurrence of `tokens` (see `non_content_tokens`)."""
    pattern = _token_pattern(frozenset(tokens))
    return remove_all(pattern, text) if pattern is not None else text


def without_tags(text: str) -> str:
    """Text the walk left, without the grounding tags that joining its pieces may have formed."""
    return remove_all(GROUNDING_TAG, text)


def model_coordinate(value) -> Optional[float]:
    """A number the model wrote → a 0–999 coordinate, or None when it is no finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)  # an int of hundreds of digits does not fit
    except OverflowError:
        return None
    if not math.isfinite(number):
        return None
    return min(max(number, 0.0), float(MODEL_MAX))


def parse_boxes(det_text: str) -> list:
    """`[[x1, y1, x2, y2], ...]` → list of 4-number tuples, corners in order, within 0–999; a box of
    anything else (not 4 finite numbers) is skipped, as is a list that does not parse."""
    try:
        value = ast.literal_eval(det_text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, OverflowError):
        return []
    if isinstance(value, (list, tuple)) and len(value) == 4 and not any(isinstance(v, (list, tuple)) for v in value):
        value = [value]  # a single box without the outer brackets
    if not isinstance(value, (list, tuple)):
        return []
    boxes = []
    for box in value:
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            continue
        x1, y1, x2, y2 = (model_coordinate(v) for v in box)
        if None in (x1, y1, x2, y2):
            continue
        boxes.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return boxes


def to_pixels(box: tuple, image_size: tuple) -> tuple:
    """A 0–999 box (as `parse_boxes` returns it) → pixels of an image of `image_size`, within the image."""
    width, height = image_size
    x1, x2 = sorted(min(max(int(v / MODEL_MAX * width), 0), width) for v in (box[0], box[2]))
    y1, y2 = sorted(min(max(int(v / MODEL_MAX * height), 0), height) for v in (box[1], box[3]))
    return (x1, y1, x2, y2)


@dataclass
class _OpenReference:
    label: str = ""
    boxes: list = field(default_factory=list)
    text: list = field(default_factory=list)


def split_references(text: str) -> tuple:
    """(the text before the first reference, [Reference, ...]): the one walk over the grounding tags,
    tolerant of any cut or malformed tag (see the module's docstring)."""
    pieces = REFERENCE_TAG.split(text.replace(GROUNDING_PROMPT_TAG, ""))  # [text, tag, text, tag, ...]
    before, references = [pieces[0]], []
    current = None  # the reference being read
    mode = "text"  # where the next piece goes: "text", or "label" / "boxes" until their closing tag
    pending = ""  # the label or box list being read
    owner = None  # the reference a box list being read belongs to (None: outside any reference)

    def text_sink() -> list:
        return current.text if current is not None else before

    def end_unclosed() -> None:
        """A label or box list whose closing tag did not come ends at its line's end."""
        nonlocal mode
        line, newline, rest = pending.partition("\n")
        if mode == "label":
            current.label = line.strip()
        text_sink().append(newline + rest)  # an unclosed box list gives no box
        mode = "text"

    def finish() -> None:
        if current is not None:
            references.append(Reference(current.label, tuple(current.boxes), "".join(current.text)))

    for tag, piece in zip(pieces[1::2], pieces[2::2]):
        if tag == REF_OPEN:
            if mode != "text":
                end_unclosed()
            finish()
            current, mode, pending = _OpenReference(), "label", ""
        elif tag == REF_CLOSE:
            if mode == "label":
                current.label, mode = pending.strip(), "text"
            elif mode == "boxes":
                end_unclosed()
            # otherwise a stray closing tag: removed
        elif tag == DET_OPEN:
            if mode == "label":  # the label's closing tag is missing: the box list closes it
                current.label = pending.strip()
            elif mode == "boxes":
                end_unclosed()
            # Boxes belong to the open reference while nothing but blank space follows its tags.
            if mode == "label" or (current is not None and not "".join(current.text).strip()):
                owner = current
                current.text.clear()
            else:
                owner = None
            mode, pending = "boxes", ""
        elif tag == DET_CLOSE:
            if mode == "boxes":
                if owner is not None:
                    owner.boxes += parse_boxes(pending)
                mode = "text"
            elif mode == "label":
                end_unclosed()
        if mode == "text":
            text_sink().append(piece)
        else:
            pending += piece
    if mode != "text":
        end_unclosed()
    finish()
    return "".join(before), references


def figure_file_name(number: int) -> str:
    return f"{number}.jpg"


def clean_markdown(text: str) -> str:
    """What the original's saved markdown rewrites: two mathtools symbols most renderers lack."""
    return text.replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")


def block_text(text: str) -> str:
    """A region's content without the blank lines around it (a first line's indentation is kept)."""
    return clean_markdown(re.sub(r"\A\s*\n", "", without_tags(text)).rstrip())


def read_page(raw_text: str, image_size: tuple, page: int = 1, first_figure: int = 0,
              image_prefix: str = FIGURE_PREFIX) -> PageLayout:
    """Regions in pixels of `image_size`, blocks and markdown of one page, from one walk of its text.

    A figure reference takes a number per box that has pixels, from `first_figure` on, and links each
    crop in the markdown; other references, and figure boxes without pixels, disappear from the markdown
    and keep their text.
    """
    before, references = split_references(strip_eos(raw_text))
    regions, blocks, markdown = [], [], [before]
    if before.strip():
        blocks.append(Block(UNLOCATED_LABEL, None, block_text(before)))
    next_figure = first_figure
    for reference in references:
        own = []
        for box in reference.boxes:
            pixels, figure = to_pixels(box, image_size), None
            if reference.label == FIGURE_LABEL and has_pixels(pixels):
                figure, next_figure = next_figure, next_figure + 1
            own.append(Region(reference.label, pixels, box, page, figure))
        regions += own
        content = block_text(reference.text)
        if own:  # the content belongs to the reference, not to one box: joined, blocks never repeat it
            blocks += [Block(reference.label, region, content if i == 0 else "") for i, region in enumerate(own)]
        elif content:  # no well-formed box: the text stays, without a position
            blocks.append(Block(reference.label, None, content))
        markdown += [f"![]({image_prefix}{figure_file_name(r.figure)})\n" for r in own if r.figure is not None]
        markdown.append(reference.text)
    return PageLayout(regions, blocks, clean_markdown(without_tags("".join(markdown))), next_figure - first_figure)


def parse_regions(raw_text: str, image_size: tuple, page: int = 1, first_figure: int = 0) -> list:
    """Every box of every grounding reference, in the order the model wrote them."""
    return read_page(raw_text, image_size, page, first_figure).regions


def to_markdown(raw_text: str, image_prefix: str = FIGURE_PREFIX, first_index: int = 0) -> str:
    """Clean markdown: figure references become `![](images/N.jpg)`, other references disappear.

    Figures are numbered per box, in order, as `read_page` numbers the regions of a 999×999 image; a
    figure reference with several boxes links to each of its crops. `first_index` continues a numbering
    across pages.
    """
    return read_page(raw_text, MODEL_SPACE, first_figure=first_index, image_prefix=image_prefix).markdown


def label_color(label: str) -> tuple:
    return PALETTE[int(hashlib.md5(label.encode("utf-8", "surrogatepass")).hexdigest(), 16) % len(PALETTE)]


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


def has_pixels(box: tuple) -> bool:
    x1, y1, x2, y2 = box
    return x2 > x1 and y2 > y1


def crop_figure(image: Image.Image, region: Region) -> Optional[Image.Image]:
    """The crop of a region, or None when its box is empty in pixels."""
    return image.crop(region.box) if has_pixels(region.box) else None


def crop_figures(image: Image.Image, regions: list) -> list:
    """Crops of the figure regions in the order of their numbers (`Region.figure`), as the markdown links
    them (a figure box without pixels has no number, so every crop is an image)."""
    return [crop_figure(image, region) for region in regions if region.figure is not None]
