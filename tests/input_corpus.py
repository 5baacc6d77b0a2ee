"""Odd and hostile input files, generated on the fly (no binaries in git), for the input and server tests."""

import io
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw


def document(width=800, height=1000, color="white") -> Image.Image:
    image = Image.new("RGB", (width, height), color)
    draw = ImageDraw.Draw(image)
    for y in range(40, height - 40, 40):
        draw.rectangle([40, y, width - 80, y + 12], fill="black")
    return image


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored landscape 400×200 with a red block at the stored top-left, EXIF orientation 6 (rotate 90° cw
    to view): a viewer shows 200×400 with the red block at the top-right."""
    image = Image.new("RGB", (400, 200), "white")
    image.paste((255, 0, 0), (0, 0, 60, 60))
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(image, exif=exif.tobytes())


def decompression_bomb_png(width=30000, height=30000) -> bytes:
    """A valid PNG header and a tiny compressed stream that would decode to width×height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def pdf_bytes(page_sizes, draw_text=True) -> bytes:
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument.new()
    for width, height in page_sizes:
        page = pdf.new_page(width, height)
        page.close()
    buffer = io.BytesIO()
    pdf.save(buffer)
    pdf.close()
    return buffer.getvalue()


def encrypted_pdf_bytes() -> bytes:
    import pikepdf

    source = io.BytesIO(pdf_bytes([(595, 842)]))
    with pikepdf.open(source) as pdf:
        out = io.BytesIO()
        pdf.save(out, encryption=pikepdf.Encryption(user="secret", owner="owner"))
        return out.getvalue()


def animated_gif() -> bytes:
    frames = [document(200, 100, color) for color in ("white", "red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def multipage_tiff(pages=3) -> bytes:
    frames = [document(300, 400) for _ in range(pages)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def webp_bytes() -> bytes:
    buffer = io.BytesIO()
    document(300, 200).save(buffer, format="WEBP")
    return buffer.getvalue()


def png_quoting_pdf_marker() -> bytes:
    """A valid PNG whose text chunk, within the first KiB, says "%PDF-1.7": an image, not a PDF."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "converted from %PDF-1.7 by a scanner")
    return png_bytes(document(300, 200), pnginfo=info)


def pdf_with_junk_before_header() -> bytes:
    """A PDF preceded by a few bytes that are no image signature, as PDF readers allow."""
    return b"\r\n\x00junk\r\n" + pdf_bytes([(300, 300)])


def pdf_with_missing_page() -> bytes:
    """A two-page PDF whose second page object is missing: it opens, counts 2 pages, page 2 fails to load."""
    data = pdf_bytes([(200, 200), (300, 300)])
    kids = b"Kids[ 4 0 R  5 0 R ]"
    assert kids in data, "pypdfium2 writes its page tree differently: update this fixture"
    return data.replace(kids, b"Kids[ 4 0 R  9 0 R ]")


def tiff_with_broken_second_frame() -> bytes:
    """A two-page TIFF whose second frame has no width tag: Pillow fails while counting the frames."""
    data = bytearray(multipage_tiff(2))
    assert data[:4] == b"II*\x00", "Pillow writes big-endian TIFFs here: update this fixture"
    first = struct.unpack_from("<I", data, 4)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * struct.unpack_from("<H", data, first)[0])[0]
    for entry in range(struct.unpack_from("<H", data, second)[0]):
        at = second + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == 256:  # ImageWidth → a private tag nobody reads
            struct.pack_into("<H", data, at, 0xFFF0)
    return bytes(data)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(data)
    return path
