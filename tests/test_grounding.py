"""Grounding tags → pixel boxes, clean markdown, annotated image and figure crops."""

from PIL import Image

from checkpoints.grounding import (
    EOS_TEXT, crop_figures, draw_regions, parse_boxes, parse_regions, read_page, split_references, strip_eos,
    to_markdown,
)

RAW = ("<|ref|>title<|/ref|><|det|>[[0, 0, 999, 100]]<|/det|>\n# Report\n"
       "<|ref|>image<|/ref|><|det|>[[100, 200, 500, 600], [600, 200, 999, 999]]<|/det|>\n"
       "<|ref|>text<|/ref|><|det|>[[10, 700, 990, 800]]<|/det|>\nBody \\eqqcolon 2" + EOS_TEXT)


def test_boxes_in_pixels_of_the_image():
    regions = parse_regions(RAW, (2000, 1000), page=3)
    assert [r.label for r in regions] == ["title", "image", "image", "text"]
    assert regions[0].box == (0, 0, 2000, int(100 / 999 * 1000)) and regions[0].page == 3
    assert regions[2].box == (int(600 / 999 * 2000), int(200 / 999 * 1000), 2000, 1000)
    assert regions[1].box_normalized == (100.0, 200.0, 500.0, 600.0)


def test_malformed_and_hostile_boxes_are_skipped():
    assert parse_boxes("[[1, 2, 3]]") == [] and parse_boxes("__import__('os')") == []
    assert parse_boxes("[[1, 2, 3, 4], ['a', 2, 3, 4], [5, 6, 7, 8]]") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert parse_boxes("[10, 20, 30, 40]") == [(10, 20, 30, 40)]
    # Reversed corners are put in order and everything is clamped to the image.
    region = parse_regions("<|ref|>x<|/ref|><|det|>[[900, 900, 100, 1500]]<|/det|>", (100, 100))[0]
    assert region.box == (10, 90, 90, 100)


def test_markdown_links_figures_and_drops_other_references():
    assert to_markdown(RAW) == ("\n# Report\n![](images/0.jpg)\n![](images/1.jpg)\n\n\nBody =: 2")
    assert to_markdown(RAW, first_index=5).count("images/5.jpg") == 1
    assert strip_eos("  text" + EOS_TEXT + " ") == "text"


def test_figures_and_drawing():
    image = Image.new("RGB", (2000, 1000), "white")
    regions = parse_regions(RAW, image.size)
    crops = crop_figures(image, regions)
    assert [c.size for c in crops] == [(r.box[2] - r.box[0], r.box[3] - r.box[1]) for r in regions
                                       if r.label == "image"]
    first, second = draw_regions(image, regions), draw_regions(image, regions)
    assert first.tobytes() == second.tobytes()  # deterministic colours
    assert first.getpixel((5, 0)) != (255, 255, 255)  # the title's outline
    assert first.size == image.size and image.getpixel((5, 0)) == (255, 255, 255)  # the input is untouched


def test_one_walk_splits_references_and_the_text_after_each():
    before, references = split_references("Header\n" + RAW)
    assert before == "Header\n"
    assert [(r.label, len(r.boxes)) for r in references] == [("title", 1), ("image", 2), ("text", 1)]
    assert references[0].text == "\n# Report\n" and references[1].text == "\n"
    assert references[2].text.startswith("\nBody") and references[2].boxes == ((10.0, 700.0, 990.0, 800.0),)


def test_page_layout_blocks_regions_and_markdown_agree():
    layout = read_page(RAW, (2000, 1000), page=2, first_figure=4)
    assert layout.markdown == to_markdown(RAW, first_index=4)
    assert layout.regions == parse_regions(RAW, (2000, 1000), page=2, first_figure=4)
    assert [r.figure for r in layout.regions] == [None, 4, 5, None] and layout.figures_used == 2
    # A reference with two boxes: a block per box, the text (here none) with the first.
    assert [(b.label, b.region.figure, b.text) for b in layout.blocks] == [
        ("title", None, "# Report"), ("image", 4, ""), ("image", 5, ""), ("text", None, "Body =: 2")]
    assert [b.region for b in layout.blocks] == layout.regions
    assert [c is not None for c in crop_figures(Image.new("RGB", (2000, 1000)), layout.regions)] == [True, True]


def test_several_boxes_of_a_text_reference_share_one_text_without_repeating_it():
    raw = "<|ref|>text<|/ref|><|det|>[[0, 0, 499, 999], [500, 0, 999, 999]]<|/det|>\n  indented code\n\n"
    blocks = read_page(raw, (100, 100)).blocks
    assert [(b.region.box, b.text) for b in blocks] == [((0, 0, 49, 100), "  indented code"), ((50, 0, 100, 100), "")]
