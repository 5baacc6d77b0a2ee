"""Turn an uploaded file into page images, or a clear error saying what is wrong with it.

The type comes from the content, not the name: a PDF is rendered page by page with pypdfium2,
anything else goes through Pillow (a multi-page TIFF gives a page per frame, an animated GIF or
WebP its first frame). Pages come back in RGB, in the orientation a viewer shows (EXIF applied).

Limits protect the service and can be changed by environment variables:
  DEEPSEEK_OCR_MAX_PAGES   pages per request (default 50)
  DEEPSEEK_OCR_MAX_PIXELS  pixels of one image or rendered page (default 64,000,000)
  DEEPSEEK_OCR_PDF_DPI     PDF rendering resolution (default 144); pages that would exceed the pixel
                           limit are rendered at a lower resolution instead
"""

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

PDF_MAGIC = b"%PDF-"


@dataclass(frozen=True)
class Limits:
    max_pages: int = 50
    max_pixels: int = 64_000_000
    pdf_dpi: int = 144

    def as_kwargs(self) -> dict:
        return {"max_pages": self.max_pages, "max_pixels": self.max_pixels, "pdf_dpi": self.pdf_dpi}


def limits_from_env() -> Limits:
    defaults = Limits()
    return Limits(
        max_pages=int(os.environ.get("DEEPSEEK_OCR_MAX_PAGES") or defaults.max_pages),
        max_pixels=int(os.environ.get("DEEPSEEK_OCR_MAX_PIXELS") or defaults.max_pixels),
        pdf_dpi=int(os.environ.get("DEEPSEEK_OCR_PDF_DPI") or defaults.pdf_dpi),
    )


@dataclass
class Page:
    image: Image.Image  # RGB, orientation applied
    number: int  # 1-based page (PDF) or frame (TIFF)


def parse_page_selection(selection: Optional[str], count: int) -> list:
    """'1-3,5' → [1, 2, 3, 5] (1-based, in the order given, no repeats); empty → every page."""
    if selection is None or not selection.strip():
        return list(range(1, count + 1))
    chosen = []
    for part in selection.split(","):
        part = part.strip()
        bounds = [b.strip() for b in part.split("-")]
        if not part or len(bounds) > 2 or not all(b.isdigit() for b in bounds):
            raise InputError(f"pages {selection!r} is not a page selection like '1-3,5'")
        first, last = int(bounds[0]), int(bounds[-1])
        if first < 1 or last < first:
            raise InputError(f"pages {part!r} is not a valid range (pages count from 1)")
        if last > count:
            raise InputError(f"page {last} is out of range: the document has {count} page(s)")
        chosen += [n for n in range(first, last + 1) if n not in chosen]
    return chosen


def load_pages(path: Path, *, pages: Optional[str] = None, max_pages: int = Limits.max_pages,
               max_pixels: int = Limits.max_pixels, pdf_dpi: int = Limits.pdf_dpi) -> list:
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(1024)
    except OSError as error:
        raise InputError(f"the input file could not be read: {error.strerror or error}") from None
    if not head:
        raise InputError("the input file is empty")
    if PDF_MAGIC in head:  # the header may follow some junk bytes, as PDF readers allow
        return _pdf_pages(path, pages, max_pages, max_pixels, pdf_dpi)
    return _image_pages(path, pages, max_pages, max_pixels)


def _check_page_count(numbers: list, max_pages: int) -> None:
    if len(numbers) > max_pages:
        raise InputError(f"{len(numbers)} pages selected; the limit is {max_pages} per request "
                         f"(choose pages with the 'pages' input, e.g. '1-{max_pages}')")


def _pdf_pages(path: Path, selection, max_pages: int, max_pixels: int, dpi: int) -> list:
    import pypdfium2 as pdfium

    try:
        document = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as error:
        # PDFium's error code can be stale (left over from an earlier document in this process), so the
        # reason is read from the file itself: an encryption dictionary, or a page tree that counts 0.
        data = path.read_bytes()
        if b"/Encrypt" in data:
            raise InputError("the PDF is password-protected; upload an unencrypted copy") from None
        if re.search(rb"/Count\s+0\b", data) and not re.search(rb"/Count\s+[1-9]", data):
            raise InputError("the PDF has no pages") from None
        raise InputError(f"the PDF could not be read ({error}); it may be damaged or truncated") from None
    try:
        count = len(document)
        if count == 0:
            raise InputError("the PDF has no pages")
        numbers = parse_page_selection(selection, count)
        _check_page_count(numbers, max_pages)
        result = []
        for number in numbers:
            page = document[number - 1]
            width_pt, height_pt = page.get_size()
            scale = dpi / 72
            if width_pt * height_pt * scale * scale > max_pixels:  # huge page: render smaller, not bigger
                scale = math.sqrt(max_pixels / (width_pt * height_pt))
            try:
                image = page.render(scale=scale).to_pil().convert("RGB")
            except pdfium.PdfiumError as error:
                raise InputError(f"page {number} of the PDF could not be rendered ({error})") from None
            result.append(Page(image, number))
        return result
    finally:
        document.close()


def _image_pages(path: Path, selection, max_pages: int, max_pixels: int) -> list:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError:
        raise InputError("the file is not a supported image (PNG, JPEG, WebP, GIF, TIFF, BMP, ...) or PDF") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"the image is too large: more than {max_pixels:,} pixels") from None
    except OSError as error:
        raise InputError(f"the image could not be read ({error})") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:  # checked before any pixel is decoded
            raise InputError(f"the image is {width}×{height} = {width * height:,} pixels; "
                             f"the limit is {max_pixels:,}")
        # Multi-page TIFFs are documents; animated GIF/WebP frames are not pages.
        frames = getattr(image, "n_frames", 1) if image.format == "TIFF" else 1
        numbers = parse_page_selection(selection, frames)
        _check_page_count(numbers, max_pages)
        result = []
        for number in numbers:
            try:
                image.seek(number - 1)
                if image.size[0] * image.size[1] > max_pixels:
                    raise InputError(f"frame {number} is larger than {max_pixels:,} pixels")
                image.load()
                frame = ImageOps.exif_transpose(image.copy())
            except (OSError, SyntaxError, ValueError, EOFError) as error:
                if isinstance(error, InputError):
                    raise
                raise InputError(f"the image is damaged or truncated ({error})") from None
            result.append(Page(to_rgb(frame), number))
        return result


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB as a viewer would show it: 16-bit scaled (not clipped), transparency on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        high = image.convert("I").getextrema()[1] or 0
        factor = 1 / 257 if high > 255 else 1  # 16-bit samples use the whole 0–65535 range
        image = image.convert("I").point(lambda v: v * factor).convert("L")
    elif image.mode == "F":
        image = image.point(lambda v: max(0.0, min(255.0, v))).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
