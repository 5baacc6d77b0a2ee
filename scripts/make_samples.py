"""Write the sample documents the README's commands read: samples/page.png (one page) and samples/document.pdf
(two pages, each an image, as a scanner writes a PDF). Made with Pillow alone (10.1 or newer, for its
built-in scalable font); the committed files are this script's output.

    python scripts/make_samples.py [--out samples]
"""

import argparse
import calendar
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
PAGE_SIZE = (1000, 1414)  # A4 at 120 dpi
DPI = 120
MARGIN = 90
INK = (20, 20, 20)
# Fixed, so that running the script again writes the same PDF.
PDF_DATE = time.gmtime(calendar.timegm((2026, 11, 29, 0, 0, 0)))


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def paragraph(draw: ImageDraw.ImageDraw, top: int, text: str, size: int = 24, width: int = 820) -> int:
    """Draws `text` wrapped to `width` pixels from `top`; returns the y below it."""
    words, line, lines = text.split(), "", []
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font(size)) > width and line:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    for text_line in lines:
        draw.text((MARGIN, top), text_line, fill=INK, font=font(size))
        top += int(size * 1.45)
    return top + size // 2


def table(draw: ImageDraw.ImageDraw, top: int, rows: list, widths: list, size: int = 22) -> int:
    """A ruled table, the first row a header; returns the y below it."""
    height = int(size * 2)
    right = MARGIN + sum(widths)
    for index, row in enumerate(rows):
        y = top + index * height
        if index == 0:
            draw.rectangle([MARGIN, y, right, y + height], fill=(228, 232, 238))
        x = MARGIN
        for cell, width in zip(row, widths):
            draw.text((x + 12, y + size // 2), cell, fill=INK, font=font(size))
            x += width
    bottom = top + len(rows) * height
    for index in range(len(rows) + 1):
        draw.line([MARGIN, top + index * height, right, top + index * height], fill=INK, width=2)
    x = MARGIN
    for width in [0] + widths:
        x += width
        draw.line([x, top, x, bottom], fill=INK, width=2)
    return bottom + 40


def bar_chart(draw: ImageDraw.ImageDraw, top: int, values: list, labels: list) -> int:
    """A small bar chart with a frame, the kind of figure the model crops; returns the y below it."""
    left, width, height = MARGIN + 40, 520, 260
    draw.rectangle([left, top, left + width, top + height], outline=INK, width=2)
    bar = width // (2 * len(values) + 1)
    for index, (value, label) in enumerate(zip(values, labels)):
        x = left + bar * (2 * index + 1)
        draw.rectangle([x, top + height - int(value * (height - 40)), x + bar, top + height],
                       fill=(70, 110, 170))
        draw.text((x, top + height + 8), label, fill=INK, font=font(18))
    return top + height + 50


def invoice_page() -> Image.Image:
    page = Image.new("RGB", PAGE_SIZE, "white")
    draw = ImageDraw.Draw(page)
    draw.text((MARGIN, 80), "Invoice", fill=INK, font=font(56))
    y = paragraph(draw, 170, "Invoice no. 2026-117, issued 29 November 2026. Northwind Paper Supplies, "
                             "12 Harbour Road, Leith. Payment is due within 30 days of the invoice date.")
    y = table(draw, y + 10, [["Item", "Quantity", "Unit price", "Total"],
                             ["Paper, A4, 500 sheets", "10", "4.20", "42.00"],
                             ["Toner cartridge", "2", "39.90", "79.80"],
                             ["Delivery", "1", "6.50", "6.50"],
                             ["Total due", "", "", "128.30"]], [380, 140, 160, 140])
    y = bar_chart(draw, y, [0.35, 0.8, 0.55, 0.95], ["Jan", "Feb", "Mar", "Apr"])
    draw.text((MARGIN + 40, y - 10), "Figure 1: orders per month", fill=INK, font=font(20))
    paragraph(draw, y + 40, "Thank you for your order. Questions about this invoice: accounts@northwind.example.")
    return page


def notes_page() -> Image.Image:
    page = Image.new("RGB", PAGE_SIZE, "white")
    draw = ImageDraw.Draw(page)
    draw.text((MARGIN, 80), "Delivery notes", fill=INK, font=font(44))
    y = paragraph(draw, 160, "The toner was delivered on 2 December 2026 and signed for at the front desk. "
                             "One ream of paper arrived damaged and will be replaced with the next order.")
    y = table(draw, y + 10, [["Date", "Event"],
                             ["2026-12-01", "Order packed"],
                             ["2026-12-02", "Delivered, signed by R. Okafor"],
                             ["2026-12-09", "Replacement ream sent"]], [220, 600])
    paragraph(draw, y, "Page 2 of 2.")
    return page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "samples")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    first, second = invoice_page(), notes_page()
    first.save(args.out / "page.png", dpi=(DPI, DPI), optimize=True)
    first.save(args.out / "document.pdf", save_all=True, append_images=[second], resolution=DPI,
               title="Sample invoice", creationDate=PDF_DATE, modDate=PDF_DATE)
    for name in ("page.png", "document.pdf"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
