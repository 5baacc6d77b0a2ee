"""Assemble the model's per-page outputs into one result: text, grounded regions as data, annotated
page images and cropped figures written to an output folder.

Figures are numbered across the whole document (`images/0.jpg`, `images/1.jpg`, ...), in the
order their links appear in the markdown, as the original's saved result numbers them for a page.
"""

from dataclasses import dataclass, field
from pathlib import Path

from checkpoints.grounding import crop_figures, draw_regions, parse_regions, strip_eos, to_markdown

PAGE_SEPARATOR = "\n\n---\n\n"


@dataclass
class PageOutput:
    number: int
    raw_output: str
    generated_tokens: int
    image_tokens: int
    finished: bool
    seconds: float


@dataclass
class DocumentOutput:
    text: str
    raw_output: str
    regions: list = field(default_factory=list)
    annotated_images: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    pages: list = field(default_factory=list)


def assemble(pages: list, images: list, markdown: bool, out_dir: Path) -> DocumentOutput:
    """`pages[i]` is the PageOutput of `images[i]`; files go under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts, raws, regions, annotated, figures, page_info = [], [], [], [], [], []
    for page, image in zip(pages, images):
        raw = strip_eos(page.raw_output)
        page_regions = parse_regions(raw, image.size, page=page.number)
        first_figure = len(figures)
        if markdown:
            texts.append(to_markdown(raw, first_index=first_figure))
        else:
            texts.append(raw)
        raws.append(raw)
        for crop in crop_figures(image, page_regions):
            path = out_dir / f"{len(figures)}.jpg"
            if crop is not None:
                crop.convert("RGB").save(path, quality=92)
                figures.append(path)
            else:  # keep the numbering aligned with the markdown links
                figures.append(None)
        if page_regions:
            path = out_dir / f"page_{page.number}_boxes.jpg"
            draw_regions(image, page_regions).save(path, quality=90)
            annotated.append(path)
        regions += [
            {"label": r.label, "box": list(r.box), "box_normalized": list(r.box_normalized), "page": r.page}
            for r in page_regions
        ]
        page_info.append({
            "page": page.number, "width": image.width, "height": image.height,
            "image_tokens": page.image_tokens, "generated_tokens": page.generated_tokens,
            "finished": page.finished, "seconds": round(page.seconds, 3),
        })
    return DocumentOutput(
        text=PAGE_SEPARATOR.join(texts),
        raw_output=PAGE_SEPARATOR.join(raws),
        regions=regions,
        annotated_images=annotated,
        figures=[f for f in figures if f is not None],
        pages=page_info,
    )

