"""Assemble the model's per-page outputs into one result: text, grounded regions and layout blocks as
data, annotated page images and cropped figures written to an output folder.

Figures are numbered across the whole document (`images/0.jpg`, `images/1.jpg`, ...), in the
order their links appear in the markdown, as the original's saved result numbers them for a page;
`checkpoints.grounding.read_page` gives each figure region its number.

Blocks are the page's content by region, in reading order across pages: one per box of a grounded
reference, with the text the model wrote for it (a reference with several boxes gives a block per box;
its text goes with the first, so that joined, the blocks never repeat it). Text written before the first
reference of a page, or after a reference whose boxes are all malformed, is a block without a box.

`raw_output` is what the model wrote. `text`, `pages[].text` and the blocks leave out the tokenizer's added
tokens that are not content (placeholders, BOS/EOS, padding, `<image>`, ...: the tokenizer's added
vocabulary less the table and reference tokens, `checkpoints.grounding.non_content_tokens`); for
`Convert to Markdown` they hold no grounding tag either, whatever the model wrote or where it was cut.
"""

from dataclasses import dataclass, field
from pathlib import Path

from checkpoints.grounding import (
    FIGURE_PREFIX, Block, crop_figure, draw_regions, figure_file_name, non_content_tokens, read_page,
    remove_tokens, strip_eos,
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


def assemble(pages: list, images: list, markdown: bool, out_dir: Path, added_tokens=()) -> DocumentOutput:
    """`pages[i]` is the PageOutput of `images[i]`; files go under `out_dir`. `added_tokens`: the
    tokenizer's added vocabulary (`OCREngine.special_token_texts`), whose non-content tokens are kept out
    of the text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    non_content = non_content_tokens(added_tokens)
    texts, raws, regions, annotated, figures, page_info, blocks = [], [], [], [], [], [], []
    next_figure = 0
    for page, image in zip(pages, images):
        raw = strip_eos(page.raw_output)
        visible = remove_tokens(raw, non_content).strip()
        layout = read_page(visible, image.size, page=page.number, first_figure=next_figure)
        next_figure += layout.figures_used
        page_text = layout.markdown if markdown else visible
        texts.append(page_text)
        raws.append(raw)
        for region in layout.regions:
            if region.figure is not None:  # a figure number is given only to a box that has pixels
                path = out_dir / figure_file_name(region.figure)
                crop_figure(image, region).convert("RGB").save(path, quality=92)
                figures.append(path)
        if layout.regions:
            path = out_dir / f"page_{page.number}_boxes.jpg"
            draw_regions(image, layout.regions).save(path, quality=90)
            annotated.append(path)
        regions += [
            {"label": r.label, "box": list(r.box), "box_normalized": list(r.box_normalized), "page": r.page}
            for r in layout.regions
        ]
        blocks += [block_entry(block, page.number) for block in layout.blocks]
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


def block_entry(block: Block, page: int) -> dict:
    """A block as output: `figure` is the crop's path as the markdown links it, for a figure with a crop."""
    region = block.region
    figure = region.figure if region is not None else None
    return {
        "page": page,
        "type": block.label,
        "box": list(region.box) if region else None,
        "box_normalized": list(region.box_normalized) if region else None,
        "text": block.text,
        "figure": FIGURE_PREFIX + figure_file_name(figure) if figure is not None else None,
    }
