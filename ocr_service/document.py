"""Assemble the model's per-page outputs into one result: text, grounded regions and layout blocks as
data, annotated page images and cropped figures written to an output folder.

Figures are numbered across the whole document (`images/0.jpg`, `images/1.jpg`, ...), in the
order their links appear in the markdown, as the original's saved result numbers them for a page;
`checkpoints.grounding.read_page` gives each figure region its number.

Blocks are the page's content by region, in reading order across pages: one per box of a grounded
reference, with the text the model wrote for it (a reference with several boxes gives a block per box;
its text goes with the first, so that joined, the blocks never repeat it). Text written before the first
reference of a page, or after a reference whose boxes are all malformed, is a block without a box.
"""

from dataclasses import dataclass, field
from pathlib import Path

from checkpoints.grounding import (
    FIGURE_PREFIX, Block, crop_figure, draw_regions, figure_file_name, read_page, strip_eos,
)

PAGE_SEPARATOR = "\n\n---\n\n"


@dataclass
class PageOutput:
    number: int
    raw_output: str
    generated_tokens: int
    image_tokens: int
    finished: bool
    seconds: float  # from the prediction's start to this page's last token
    stop_reason: str  # "eos", "max_new_tokens" or "repetition"
    first_token_seconds: float  # from the prediction's start to this page's first token


@dataclass
class DocumentOutput:
    text: str
    raw_output: str
    regions: list = field(default_factory=list)
    annotated_images: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    pages: list = field(default_factory=list)
    blocks: list = field(default_factory=list)


def assemble(pages: list, images: list, markdown: bool, out_dir: Path) -> DocumentOutput:
    """`pages[i]` is the PageOutput of `images[i]`; files go under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts, raws, regions, annotated, figures, page_info, blocks = [], [], [], [], [], [], []
    next_figure = 0
    for page, image in zip(pages, images):
        raw = strip_eos(page.raw_output)
        layout = read_page(raw, image.size, page=page.number, first_figure=next_figure)
        next_figure += layout.figures_used
        page_text = layout.markdown if markdown else raw
        texts.append(page_text)
        raws.append(raw)
        cropped = set()  # figure numbers with a file; an empty box keeps its number but has no crop
        for region in layout.regions:
            crop = crop_figure(image, region) if region.figure is not None else None
            if crop is not None:
                path = out_dir / figure_file_name(region.figure)
                crop.convert("RGB").save(path, quality=92)
                figures.append(path)
                cropped.add(region.figure)
        if layout.regions:
            path = out_dir / f"page_{page.number}_boxes.jpg"
            draw_regions(image, layout.regions).save(path, quality=90)
            annotated.append(path)
        regions += [
            {"label": r.label, "box": list(r.box), "box_normalized": list(r.box_normalized), "page": r.page}
            for r in layout.regions
        ]
        blocks += [block_entry(block, page.number, cropped) for block in layout.blocks]
        page_info.append({
            "page": page.number, "width": image.width, "height": image.height,
            "image_tokens": page.image_tokens, "generated_tokens": page.generated_tokens,
            "finished": page.finished, "stop_reason": page.stop_reason, "seconds": round(page.seconds, 3),
            "first_token_seconds": round(page.first_token_seconds, 3), "text": page_text,
        })
    return DocumentOutput(
        text=PAGE_SEPARATOR.join(texts),
        raw_output=PAGE_SEPARATOR.join(raws),
        regions=regions,
        annotated_images=annotated,
        figures=figures,
        pages=page_info,
        blocks=blocks,
    )


def block_entry(block: Block, page: int, cropped: set) -> dict:
    """A block as output: `figure` is the crop's path as the markdown links it, when a crop was written."""
    region = block.region
    figure = region.figure if region is not None and region.figure in cropped else None
    return {
        "page": page,
        "type": block.label,
        "box": list(region.box) if region else None,
        "box_normalized": list(region.box_normalized) if region else None,
        "text": block.text,
        "figure": FIGURE_PREFIX + figure_file_name(figure) if figure is not None else None,
    }
