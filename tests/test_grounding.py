"""Grounding tags → pixel boxes, clean markdown, annotated image and figure crops."""

from PIL import Image

import pytest

from checkpoints.grounding import (
    EOS_TEXT, REFERENCE_TAGS, TABLE_TOKENS, crop_figures, draw_regions, non_content_tokens, parse_boxes,
    parse_regions, read_page, remove_tokens, split_references, strip_eos, to_markdown,
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
    # Reversed corners are put in order and everything is clamped to 0–999, so to the image.
    region = parse_regions("<|ref|>x<|/ref|><|det|>[[900, 900, 100, 1500]]<|/det|>", (100, 100))[0]
    assert region.box == (10, 90, 90, 100) and region.box_normalized == (100.0, 900.0, 900.0, 999.0)
    assert parse_boxes("[[-5, -1e300, 2000, 1e300]]") == [(0.0, 0.0, 999.0, 999.0)]


# Numbers with which the whole box list fails to parse.
NOT_LITERALS = ["1e400 - 1e400", "float('nan')", "nan", "inf", "9" * 5000, "[" * 500 + "1" + "]" * 500]


@pytest.mark.parametrize("number", ["9" * 400, "1e999", "-1e999", "1j", "True", "'12'", "None",
                                    *NOT_LITERALS])
def test_a_number_that_is_not_finite_makes_its_box_malformed(number):
    det = f"[[10, 20, {number}, 40], [1, 2, 3, 4]]"
    assert parse_boxes(det) == ([] if number in NOT_LITERALS else [(1.0, 2.0, 3.0, 4.0)])
    raw = f"<|ref|>table<|/ref|><|det|>[[10, 20, {number}, 40]]<|/det|>\n<table></table>"
    layout = read_page(raw, (600, 800))
    assert layout.regions == [] and [(b.label, b.region, b.text) for b in layout.blocks] == [
        ("table", None, "<table></table>")]  # the text stays, in a block without a box


def test_a_page_cut_inside_a_reference_leaves_no_tag_and_no_fragment():
    done = "<|ref|>title<|/ref|><|det|>[[0, 0, 999, 99]]<|/det|>\n# Title\n\n"
    for cut in ["<|ref|>text<|/ref|><|det|>[[120, 240", "<|ref|>text<|/ref|><|det|>", "<|ref|>text<|/ref|>",
                "<|ref|>te", "<|ref|>"]:
        layout = read_page(done + cut, (100, 100))
        assert layout.markdown == "\n# Title\n\n", cut
        assert [(b.label, b.text) for b in layout.blocks] == [("title", "# Title")], cut
        assert len(layout.regions) == 1


def test_missing_and_stray_tags_lose_no_content_and_leak_no_tag():
    def walk(raw):
        layout = read_page(raw, (999, 999))
        return layout.markdown, [(b.label, b.region.box if b.region else None, b.text) for b in layout.blocks]

    # A label whose closing tag is missing ends at its box list, or at its line's end.
    assert walk("<|ref|>title<|det|>[[1, 2, 3, 4]]<|/det|>\n# T") == (
        "\n# T", [("title", (1, 2, 3, 4), "# T")])
    assert walk("<|ref|>title\n# T\n<|ref|>text<|/ref|><|det|>[[5, 5, 9, 9]]<|/det|>body") == (
        "\n# T\nbody", [("title", None, "# T"), ("text", (5, 5, 9, 9), "body")])
    # A box list whose closing tag is missing ends at its line's end and gives no box.
    assert walk("<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]\nBody") == ("\nBody", [("text", None, "Body")])
    # Box lists outside any reference are dropped; stray closing tags and the prompt's tag are removed.
    assert walk("<|grounding|>intro <|det|>[[1, 2, 3, 4]]<|/det|> tail <|/ref|><|/det|> end") == (
        "intro  tail  end", [("text", None, "intro  tail  end")])
    # Consecutive box lists of one reference add up; a box list after its text belongs to no reference.
    markdown, blocks = walk("<|ref|>image<|/ref|><|det|>[[0, 0, 9, 9]]<|/det|>\n<|det|>[[10, 10, 19, 19]]<|/det|>"
                            "cap<|det|>[[20, 20, 29, 29]]<|/det|>")
    assert markdown == "![](images/0.jpg)\n![](images/1.jpg)\ncap"
    assert blocks == [("image", (0, 0, 9, 9), "cap"), ("image", (10, 10, 19, 19), "")]
    # A reference that has neither a box nor text leaves nothing.
    assert walk("A<|ref|>image<|/ref|><|det|>[[oops]]<|/det|>\n\nB") == (
        "A\n\nB", [("text", None, "A"), ("image", None, "B")])
    assert walk("A\n<|ref|>image<|/ref|><|det|>[[oops]]<|/det|>\n<|ref|>") == ("A\n\n", [("text", None, "A")])


def test_non_content_tokens_are_the_added_vocabulary_less_tables_and_references():
    vocabulary = ["<｜begin▁of▁sentence｜>", "<｜place▁holder▁no▁12｜>", "<image>", "<|grounding|>", *TABLE_TOKENS,
                  *REFERENCE_TAGS]
    hidden = non_content_tokens(vocabulary)
    assert hidden == {"<｜begin▁of▁sentence｜>", "<｜place▁holder▁no▁12｜>", "<image>", "<|grounding|>"}
    assert remove_tokens("a<image>b<td>c<｜place▁holder▁no▁12｜><|ref|>", hidden) == "ab<td>c<|ref|>"
    assert remove_tokens("unchanged", frozenset()) == remove_tokens("unchanged", frozenset({""})) == "unchanged"


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
