"""Turn an uploaded file into page images, or a clear error saying what is wrong with it.

The type comes from the content, not the name: from the file's leading bytes. A file that starts with
a known image signature is an image, even if its header later quotes "%PDF-" (a PNG text chunk, a JPEG
comment); otherwise a "%PDF-" marker in the first KiB (PDF readers allow junk before it) makes it a
PDF, rendered page by page with pypdfium2; anything else goes through Pillow (a multi-page TIFF gives a
page per frame, an animated GIF or WebP its first frame). Pages come back in RGB, in the orientation a
viewer shows (EXIF applied).

Numbers are read as ASCII digits only: `str.isdigit()` and `int()` also take '²', '①', '٣' or '1_000'.

Limits protect the service (settings.py reads them from the environment): pages per request, pixels
of one image or rendered page, and the PDF rendering resolution (pages that would exceed the pixel
limit are rendered at a lower resolution instead).

Errors name the input they are about (`image`, `pages`) and, for a limit, the setting that sets it.
"""

import math
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

PDF_MAGIC = b"%PDF-"
HEADER_BYTES = 1024  # where a PDF's marker may be found, as PDF readers look for it
# Leading bytes of the image formats Pillow reads that people upload: PNG, JPEG, GIF, TIFF and BigTIFF,
# BMP, JPEG 2000 (file and codestream), ICO, Photoshop. WebP (RIFF....WEBP) is checked apart.
IMAGE_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*", b"II+\x00",
    b"MM\x00+", b"BM", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xffO\xffQ", b"\x00\x00\x01\x00", b"8BPS",
)
# What Pillow raises on damaged image data, besides OSError (its plugins use all of these).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError, struct.error,
                 Image.DecompressionBombError)
# A page range: ASCII digits, optionally "-" and more digits (spaces allowed around the hyphen).
PAGE_RANGE = re.compile(r"([0-9]+)(?:\s*-\s*([0-9]+))?")
SHOWN_CHARS = 40  # how much of a long input an error message quotes
IMAGE_TYPES = "PNG, JPEG, WebP, GIF, TIFF, BMP, ..."
# Opening an image reads its header only; Pillow's own decompression-bomb guard is lifted meanwhile, so
# that our check, which says the image's size and the setting, refuses it before any pixel is decoded.
_OPEN_WITHOUT_PILLOWS_GUARD = threading.Lock()


@dataclass(frozen=True)
class Limits:
    max_pages: int = 50
    max_pixels: int = 64_000_000
    pdf_dpi: int = 144

    def as_kwargs(self) -> dict:
        return {"max_pages": self.max_pages, "max_pixels": self.max_pixels, "pdf_dpi": self.pdf_dpi}


def shorten(text: str) -> str:
    """At most SHOWN_CHARS characters of a user's input, for an error message."""
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


@dataclass
class Page:
    image: Image.Image  # RGB, orientation applied
    number: int  # 1-based page (PDF) or frame (TIFF)


def parse_page_selection(selection: Optional[str], count: int) -> list:
    """'1-3,5' → [1, 2, 3, 5] (1-based, in the order given, no repeats); empty → every page."""
    if selection is None or not selection.strip():
        return list(range(1, count + 1))
    chosen = {}  # an ordered set
    for part in selection.split(","):
        match = PAGE_RANGE.fullmatch(part.strip())
        if match is None:
            raise InputError(f"pages {shorten(selection)!r} is not a page selection like '1-3,5' "
                             f"(digits 0-9, commas and hyphens)")
        first_digits, last_digits = _significant(match.group(1)), _significant(match.group(2) or match.group(1))
        if (len(last_digits), last_digits) < (len(first_digits), first_digits):  # compared without int()
            raise InputError(f"pages {shorten(part.strip())!r} is a reversed range: write "
                             f"'{shorten(last_digits)}-{shorten(first_digits)}'")
        first, last = _page_number(first_digits, count), _page_number(last_digits, count)
        if first < 1:
            raise InputError(f"pages {shorten(part.strip())!r} is not a valid range (pages count from 1)")
        chosen.update(dict.fromkeys(range(first, last + 1)))
    return list(chosen)


def _significant(digits: str) -> str:
    return digits.lstrip("0") or "0"


def _page_number(significant: str, count: int) -> int:
    """ASCII digits without leading zeros → a page number of a `count`-page document; a longer number is
    out of range before it is converted (int() refuses more than 4,300 digits)."""
    if len(significant) > len(str(count)) or int(significant) > count:
        raise InputError(f"page {shorten(significant)} is out of range: the document has {count} page(s)")
    return int(significant)


def load_pages(path: Path, *, pages: Optional[str] = None, max_pages: int = Limits.max_pages,
               max_pixels: int = Limits.max_pixels, pdf_dpi: int = Limits.pdf_dpi) -> list:
    if path is None or str(path) in ("", "."):  # Cog passes an empty `image` as Path(""), which is "."
        raise InputError(f"no file was given for image: upload an image ({IMAGE_TYPES}) or a PDF")
    path = Path(path)
    if path.is_dir():
        raise InputError(f"image is a folder ({path.name}), not a file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_BYTES)
    except OSError as error:
        raise InputError(f"the file given as image could not be read: {error.strerror or error}") from None
    if not head:
        raise InputError("the file given as image is empty (0 bytes)")
    if is_pdf(head):
        return _pdf_pages(path, pages, max_pages, max_pixels, pdf_dpi)
    return _image_pages(path, pages, max_pages, max_pixels)


def is_pdf(head: bytes) -> bool:
    """Whether a file whose first HEADER_BYTES are `head` is a PDF: a known image signature at the start
    wins over a "%PDF-" found later in the header."""
    if head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return False
    return PDF_MAGIC in head


def _check_page_count(numbers: list, selection, max_pages: int) -> None:
    if len(numbers) <= max_pages:
        return
    limit = f"the limit is {max_pages} per request (DEEPSEEK_OCR_MAX_PAGES)"
    if selection is None or not selection.strip():
        raise InputError(f"image has {len(numbers)} pages; {limit}: choose some with the pages input, "
                         f"e.g. '1-{max_pages}'")
    raise InputError(f"pages {shorten(selection)!r} selects {len(numbers)} pages; {limit}")


def _pixel_limit_error(what: str, size: tuple, max_pixels: int) -> InputError:
    width, height = size
    return InputError(f"{what} is too large: {width}×{height} = {width * height:,} pixels, more than the "
                      f"{max_pixels:,} that DEEPSEEK_OCR_MAX_PIXELS allows")


# PDFium (pypdfium2) must never be called from two threads at once, not even for different documents: a
# concurrent call can crash the process. Concurrent predictions and the bulk command's readers all read
# PDFs through here, one at a time per process.
PDFIUM_LOCK = threading.Lock()


def _pdf_pages(path: Path, selection, max_pages: int, max_pixels: int, dpi: int) -> list:
    with PDFIUM_LOCK:
        return _pdf_pages_locked(path, selection, max_pages, max_pixels, dpi)


def _pdf_pages_locked(path: Path, selection, max_pages: int, max_pixels: int, dpi: int) -> list:
    import pypdfium2 as pdfium

    try:
        document = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as error:
        # PDFium's error code can be stale (left over from an earlier document in this process), so the
        # reason is read from the file itself: an encryption dictionary, or a page tree that counts 0.
        data = path.read_bytes()
        if b"/Encrypt" in data:
            raise InputError("image is a password-protected PDF; upload an unencrypted copy") from None
        if re.search(rb"/Count\s+0\b", data) and not re.search(rb"/Count\s+[1-9]", data):
            raise InputError("image is a PDF that has no pages") from None
        raise InputError(f"image is a PDF that could not be read ({error}); it may be damaged or truncated") from None
    try:
        count = len(document)
        if count == 0:
            raise InputError("image is a PDF that has no pages")
        numbers = parse_page_selection(selection, count)
        _check_page_count(numbers, selection, max_pages)
        result = []
        for number in numbers:
            try:
                page = document[number - 1]
            except pdfium.PdfiumError as error:
                raise InputError(f"page {number} of the PDF could not be read ({error}); the PDF may be "
                                 f"damaged") from None
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
    # Pillow checks sizes again as frames are read: what the configured limit allows must pass; the
    # limit only ever goes up.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with _OPEN_WITHOUT_PILLOWS_GUARD:
            pillows_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = pillows_limit
    except UnidentifiedImageError:
        raise InputError(f"the file given as image is not a supported image ({IMAGE_TYPES}) or PDF") from None
    except DECODE_ERRORS as error:
        raise InputError(f"image could not be read as an image ({error}); it may be damaged or truncated") from None
    with image:
        if image.size[0] * image.size[1] > max_pixels:  # checked before any pixel is decoded
            raise _pixel_limit_error("image", image.size, max_pixels)
        # Multi-page TIFFs are documents; animated GIF/WebP frames are not pages.
        try:
            frames = getattr(image, "n_frames", 1) if image.format == "TIFF" else 1
        except DECODE_ERRORS as error:  # counting frames reads every frame's header
            raise InputError(f"image is damaged or truncated ({error})") from None
        numbers = parse_page_selection(selection, frames)
        _check_page_count(numbers, selection, max_pages)
        result = []
        for number in numbers:
            try:
                image.seek(number - 1)
                if image.size[0] * image.size[1] > max_pixels:
                    raise _pixel_limit_error(f"frame {number} of image", image.size, max_pixels)
                image.load()
                frame = ImageOps.exif_transpose(image.copy())
            except DECODE_ERRORS as error:
                if isinstance(error, InputError):
                    raise
                raise InputError(f"image is damaged or truncated ({error})") from None
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
