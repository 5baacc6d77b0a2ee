"""Every kind of upload ends in RGB pages or an InputError that says what is wrong."""

from pathlib import Path

import pytest
from PIL import Image

import input_corpus as corpus
from ocr_service.errors import InputError
from ocr_service.inputs import is_pdf, load_pages, parse_page_selection


def load(tmp_path, name, data, **options):
    return load_pages(corpus.write(tmp_path, name, data), **options)


def test_png_and_jpeg(tmp_path):
    for name, data in [("a.png", corpus.png_bytes(corpus.document())), ("b.jpg", corpus.jpeg_bytes(corpus.document()))]:
        pages = load(tmp_path, name, data)
        assert len(pages) == 1 and pages[0].number == 1
        assert pages[0].image.mode == "RGB" and pages[0].image.size == (800, 1000)


@pytest.mark.parametrize("name, data, message", [
    ("empty.png", b"", "the file given as image is empty"),
    ("notes.png", b"just some text, not an image\n" * 10, "the file given as image is not a supported image"),
    ("cut.png", corpus.png_bytes(corpus.document())[:2000], "image is damaged or truncated"),
    ("cut.jpg", corpus.jpeg_bytes(corpus.document())[:1500], "image is damaged or truncated"),
])
def test_broken_files_are_refused_clearly(tmp_path, name, data, message):
    with pytest.raises(InputError, match=message):
        load(tmp_path, name, data)


def test_no_file_given_names_the_image_input(tmp_path):
    for nothing in ("", Path(""), None):  # Cog turns `"image": ""` into Path(""), which is "."
        with pytest.raises(InputError, match="^no file was given for image: upload an image"):
            load_pages(nothing)
    with pytest.raises(InputError, match="^image is a folder"):
        load_pages(tmp_path)
    with pytest.raises(InputError, match="^the file given as image could not be read: No such file"):
        load_pages(tmp_path / "missing.png")


def test_decompression_bomb_refused_before_decoding_with_its_size_and_the_setting(tmp_path):
    bomb = corpus.decompression_bomb_png()
    assert len(bomb) < 100_000
    with pytest.raises(InputError, match="^image is too large: 30000×30000 = 900,000,000 pixels, more than the "
                                         "64,000,000 that DEEPSEEK_OCR_MAX_PIXELS allows$"):
        load(tmp_path, "bomb.png", bomb)


def test_pixel_limit_is_configurable(tmp_path):
    data = corpus.png_bytes(corpus.document(1000, 1000))
    with pytest.raises(InputError, match="1000×1000 = 1,000,000 pixels, more than the 999,999 that "
                                         "DEEPSEEK_OCR_MAX_PIXELS allows"):
        load(tmp_path, "big.png", data, max_pixels=999_999)


def test_modes_become_rgb_as_viewed(tmp_path):
    cmyk = Image.new("CMYK", (50, 40), (0, 255, 255, 0))  # red in CMYK
    assert load(tmp_path, "c.jpg", corpus.jpeg_bytes(cmyk))[0].image.getpixel((25, 20))[0] > 200
    sixteen = Image.new("I;16", (50, 40), 65535)
    assert load(tmp_path, "16.png", corpus.png_bytes(sixteen))[0].image.getpixel((5, 5)) == (255, 255, 255)
    mid = Image.new("I;16", (50, 40), 32768)
    assert load(tmp_path, "16m.png", corpus.png_bytes(mid))[0].image.getpixel((5, 5))[0] in (127, 128)
    palette = Image.new("P", (50, 40), 0)
    palette.putpalette([0, 0, 0] * 256)
    transparent = load(tmp_path, "p.png", corpus.png_bytes(palette, transparency=0))[0].image
    assert transparent.getpixel((5, 5)) == (255, 255, 255)  # transparent shows as white, not black
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert load(tmp_path, "a.png", corpus.png_bytes(rgba))[0].image.getpixel((1, 1)) == (255, 255, 255)
    grey = Image.new("L", (10, 10), 100)
    assert load(tmp_path, "g.png", corpus.png_bytes(grey))[0].image.getpixel((1, 1)) == (100, 100, 100)


def test_exif_orientation_is_applied(tmp_path):
    image = load(tmp_path, "rot.jpg", corpus.exif_rotated_jpeg())[0].image
    assert image.size == (200, 400)
    red, green, blue = image.getpixel((190, 10))  # the stored top-left block is now top-right
    assert red > 200 and green < 60 and blue < 60


def test_small_odd_and_extreme_images(tmp_path):
    assert load(tmp_path, "one.png", corpus.png_bytes(Image.new("RGB", (1, 1))))[0].image.size == (1, 1)
    assert load(tmp_path, "wide.png", corpus.png_bytes(Image.new("RGB", (20000, 20))))[0].image.size == (20000, 20)
    assert load(tmp_path, "tall.png", corpus.png_bytes(Image.new("RGB", (20, 20000))))[0].image.size == (20, 20000)
    assert len(load(tmp_path, "anim.gif", corpus.animated_gif())) == 1  # first frame only
    assert load(tmp_path, "p.webp", corpus.webp_bytes())[0].image.size == (300, 200)


def test_multipage_tiff_gives_pages(tmp_path):
    pages = load(tmp_path, "doc.tiff", corpus.multipage_tiff(3))
    assert [p.number for p in pages] == [1, 2, 3]
    assert [p.number for p in load(tmp_path, "doc2.tiff", corpus.multipage_tiff(3), pages="2-3")] == [2, 3]


def test_pdf_pages_selection_and_limits(tmp_path):
    data = corpus.pdf_bytes([(595, 842), (842, 595), (300, 300)])
    pages = load(tmp_path, "doc.pdf", data, pdf_dpi=72)
    assert [p.number for p in pages] == [1, 2, 3]
    assert pages[0].image.size == (595, 842) and pages[1].image.size == (842, 595)
    assert load(tmp_path, "doc.pdf", data, pdf_dpi=144)[0].image.size == (1190, 1684)
    assert [p.number for p in load(tmp_path, "doc.pdf", data, pages="3, 1")] == [3, 1]
    with pytest.raises(InputError, match="page 4 is out of range: the document has 3"):
        load(tmp_path, "doc.pdf", data, pages="2-4")
    with pytest.raises(InputError, match=r"^image has 3 pages; the limit is 2 per request \(DEEPSEEK_OCR_MAX_PAGES\)"):
        load(tmp_path, "doc.pdf", data, max_pages=2)
    with pytest.raises(InputError, match=r"^pages '1-3' selects 3 pages; the limit is 2 per request "
                                         r"\(DEEPSEEK_OCR_MAX_PAGES\)"):
        load(tmp_path, "doc.pdf", data, max_pages=2, pages="1-3")
    # Named .png, but a PDF: the content decides.
    assert len(load(tmp_path, "disguised.png", data)) == 3


def test_bad_pdfs(tmp_path):
    with pytest.raises(InputError, match="image is a PDF that has no pages"):
        load(tmp_path, "zero.pdf", corpus.pdf_bytes([]))
    with pytest.raises(InputError, match="image is a password-protected PDF"):
        load(tmp_path, "locked.pdf", corpus.encrypted_pdf_bytes())
    with pytest.raises(InputError, match="image is a PDF that could not be read"):
        load(tmp_path, "cut.pdf", corpus.pdf_bytes([(595, 842)])[:200])


def test_huge_pdf_page_is_rendered_within_the_pixel_limit(tmp_path):
    page = load(tmp_path, "huge.pdf", corpus.pdf_bytes([(14400, 14400)]), max_pixels=4_000_000)[0]
    assert page.image.width * page.image.height <= 4_000_000
    assert page.image.width > 1900


def test_type_comes_from_the_leading_signature(tmp_path):
    quoting = corpus.png_quoting_pdf_marker()
    assert b"%PDF-" in quoting[:1024]  # the case: a PDF marker inside an image's header
    pages = load(tmp_path, "scan.png", quoting)
    assert len(pages) == 1 and pages[0].image.size == (300, 200)
    assert [p.number for p in load(tmp_path, "junk.pdf", corpus.pdf_with_junk_before_header())] == [1]
    jpeg_comment = corpus.jpeg_bytes(corpus.document(300, 200), comment=b"%PDF-1.4 export")
    assert load(tmp_path, "c.jpg", jpeg_comment)[0].image.size == (300, 200)
    for signature in [b"GIF89a", b"II*\x00", b"MM\x00*", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 "]:
        assert not is_pdf(signature + b"\x00" * 20 + b"%PDF-1.7"), signature
    assert is_pdf(b"%PDF-1.7\n") and is_pdf(b"\x00\x00junk %PDF-1.7") and not is_pdf(b"hello")


@pytest.mark.parametrize("selection, expected", [(None, [1, 2, 3, 4]), ("", [1, 2, 3, 4]), ("2", [2]),
                                                 (" 1 - 2 , 4 ", [1, 2, 4]), ("1,1,2", [1, 2]),
                                                 ("004", [4]), ("1\u00a0-\u00a02", [1, 2])])
def test_page_selection(selection, expected):
    assert parse_page_selection(selection, 4) == expected


@pytest.mark.parametrize("selection", ["a", "1-", "3-1", "0", "1-2-3", ",", "-1", "+1", "1.0", "1–3"])
def test_bad_page_selection(selection):
    with pytest.raises(InputError, match="pages"):
        parse_page_selection(selection, 4)


@pytest.mark.parametrize("count", [1, 3, 5, 10, 300])
@pytest.mark.parametrize("selection, written", [("5-2", "2-5"), ("0005 - 02", "2-5"), ("1,4-3", "3-4")])
def test_a_reversed_range_says_so_whatever_the_documents_length(selection, written, count):
    with pytest.raises(InputError, match=f"is a reversed range: write '{written}'"):
        parse_page_selection(selection, count)


def test_a_reversed_range_of_huge_numbers_is_compared_without_converting_them():
    with pytest.raises(InputError, match="is a reversed range") as caught:
        parse_page_selection("9" * 5000 + "-" + "8" * 5000, 4)
    assert len(str(caught.value)) < 200


# str.isdigit() takes all of these and int() some ('٣' → 3, '１' → 1); a page is written in ASCII digits.
@pytest.mark.parametrize("selection", ["²", "①", "٣", "１", "1-٣", "1_000", "৪"])
def test_non_ascii_digits_are_an_input_error_naming_pages(selection):
    with pytest.raises(InputError, match="pages .* is not a page selection like '1-3,5'"):
        parse_page_selection(selection, 4)


def test_huge_page_numbers_are_out_of_range_without_converting_them():
    with pytest.raises(InputError, match="out of range: the document has 4") as caught:
        parse_page_selection("1-" + "9" * 5000, 4)  # int() alone refuses more than 4,300 digits
    assert len(str(caught.value)) < 200  # the message quotes a shortened number
    with pytest.raises(InputError, match=r"page 5 is out of range"):
        parse_page_selection("0005", 4)
    with pytest.raises(InputError, match="not a page selection") as caught:
        parse_page_selection("x" * 10_000, 4)
    assert len(str(caught.value)) < 200
    assert parse_page_selection("1-3000", 3000)[-1] == 3000  # a long range stays cheap (no quadratic repeats)


def test_damaged_frames_and_pages_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="damaged or truncated"):
        load(tmp_path, "frames.tiff", corpus.tiff_with_broken_second_frame())
    data = corpus.pdf_with_missing_page()
    assert [p.number for p in load(tmp_path, "gap.pdf", data, pages="1")] == [1]
    with pytest.raises(InputError, match="page 2 of the PDF could not be read"):
        load(tmp_path, "gap.pdf", data)


def test_a_pixel_limit_above_pillows_own_is_honoured(tmp_path, monkeypatch):
    # Pillow's guard (89 M pixels by default) scaled down, so that the image stays small.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    data = corpus.png_bytes(corpus.document(1500, 1000))
    assert load(tmp_path, "big.png", data, max_pixels=2_000_000)[0].image.size == (1500, 1000)
    with pytest.raises(InputError, match="1500×1000 = 1,500,000 pixels, more than the 1,200,000"):
        load(tmp_path, "big.png", data, max_pixels=1_200_000)


def test_an_image_beyond_pillows_own_guard_is_refused_with_its_size(tmp_path, monkeypatch):
    # Pillow refuses more than twice its limit without saying the size; our check says it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    data = corpus.png_bytes(corpus.document(500, 500))
    with pytest.raises(InputError, match="^image is too large: 500×500 = 250,000 pixels, more than the 100,000"):
        load(tmp_path, "big.png", data, max_pixels=100_000)
    assert Image.MAX_IMAGE_PIXELS == 100_000  # Pillow's guard is back
