"""Pages' outputs assembled into one result: markdown, regions and blocks per page, annotated pages, figure
files."""

import re

from PIL import Image

from checkpoints.grounding import REFERENCE_TAGS, TABLE_TOKENS
from ocr_service.document import PAGE_SEPARATOR, PageOutput, assemble

PAGE_1 = "<|ref|>image<|/ref|><|det|>[[0, 0, 499, 499]]<|/det|>\nFirst page"
PAGE_2 = ("<|ref|>title<|/ref|><|det|>[[0, 0, 999, 99]]<|/det|>\n# Second\n"
          "<|ref|>image<|/ref|><|det|>[[500, 500, 999, 999]]<|/det|>")


def pages():
    return [PageOutput(1, PAGE_1, 10, 273, True, 1.0, "eos", 0.25),
            PageOutput(2, PAGE_2, 12, 273, False, 1.5, "max_new_tokens", 0.5)]


def test_markdown_document_numbers_figures_across_pages(tmp_path):
    images = [Image.new("RGB", (400, 600), "white"), Image.new("RGB", (800, 200), "grey")]
    out = assemble(pages(), images, markdown=True, out_dir=tmp_path)
    assert out.text == "![](images/0.jpg)\n\nFirst page\n\n---\n\n\n# Second\n![](images/1.jpg)\n"
    assert [f.name for f in out.figures] == ["0.jpg", "1.jpg"]
    assert Image.open(out.figures[1]).size == (800 - int(500 / 999 * 800), 200 - int(500 / 999 * 200))
    assert [r["page"] for r in out.regions] == [1, 2, 2]
    assert [p.name for p in out.annotated_images] == ["page_1_boxes.jpg", "page_2_boxes.jpg"]
    assert out.pages[1] == {"page": 2, "width": 800, "height": 200, "image_tokens": 273, "generated_tokens": 12,
                            "finished": False, "stop_reason": "max_new_tokens", "seconds": 1.5,
                            "first_token_seconds": 0.5, "text": "\n# Second\n![](images/1.jpg)\n"}
    assert "<|ref|>" in out.raw_output


def test_blocks_carry_each_regions_text_in_reading_order_across_pages(tmp_path):
    images = [Image.new("RGB", (400, 600), "white"), Image.new("RGB", (800, 200), "grey")]
    out = assemble(pages(), images, markdown=True, out_dir=tmp_path)
    assert out.blocks == [
        {"page": 1, "type": "image", "box": [0, 0, 199, 299], "box_normalized": [0.0, 0.0, 499.0, 499.0],
         "text": "First page", "figure": "images/0.jpg"},
        {"page": 2, "type": "title", "box": [0, 0, 800, 19], "box_normalized": [0.0, 0.0, 999.0, 99.0],
         "text": "# Second", "figure": None},
        {"page": 2, "type": "image", "box": [400, 100, 800, 200], "box_normalized": [500.0, 500.0, 999.0, 999.0],
         "text": "", "figure": "images/1.jpg"},
    ]
    # Every block with a box is the region at the same place in `regions`.
    located = [b for b in out.blocks if b["box"] is not None]
    assert [(b["type"], b["box"], b["page"]) for b in located] == [(r["label"], r["box"], r["page"])
                                                                    for r in out.regions]
    # A block's figure is the markdown's link, and the figure files come in the blocks' order.
    assert [b["figure"] for b in out.blocks if b["figure"]] == re.findall(r"\]\((images/\d+\.jpg)\)", out.text)
    assert [f"images/{f.name}" for f in out.figures] == [b["figure"] for b in out.blocks if b["figure"]]


def test_pages_carry_their_own_text(tmp_path):
    images = [Image.new("RGB", (400, 600)), Image.new("RGB", (800, 200))]
    for markdown in (True, False):
        out = assemble(pages(), images, markdown=markdown, out_dir=tmp_path / str(markdown))
        assert PAGE_SEPARATOR.join(p["text"] for p in out.pages) == out.text


def test_text_outside_any_region_is_a_block_without_a_box(tmp_path):
    raw = ("Scanned by ACME\n\n<|ref|>text<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\nBody\n\n"
           "<|ref|>table<|/ref|><|det|>not a box<|/det|>\n<table><tr><td>1</td></tr></table>")
    out = assemble([PageOutput(3, raw, 9, 73, True, 0.1, "eos", 0.05)], [Image.new("RGB", (100, 100))], markdown=True,
                   out_dir=tmp_path)
    assert [(b["type"], b["box"], b["text"]) for b in out.blocks] == [
        ("text", None, "Scanned by ACME"),
        ("text", [0, 0, 100, 100], "Body"),
        ("table", None, "<table><tr><td>1</td></tr></table>"),  # its box was malformed: the text stays
    ]
    assert {b["page"] for b in out.blocks} == {3}


def test_a_figure_box_empty_in_pixels_takes_no_number_and_links_nothing(tmp_path):
    raw = ("<|ref|>image<|/ref|><|det|>[[500, 500, 500, 900]]<|/det|>\n"
           "<|ref|>image<|/ref|><|det|>[[0, 0, 499, 499]]<|/det|>")
    out = assemble([PageOutput(1, raw, 9, 73, True, 0.1, "eos", 0.05)], [Image.new("RGB", (100, 100))], markdown=True,
                   out_dir=tmp_path)
    assert out.text == "\n![](images/0.jpg)\n"  # the empty box shows nothing; the next figure is 0
    assert [f.name for f in out.figures] == ["0.jpg"] and (tmp_path / "0.jpg").is_file()
    assert [(b["box"], b["figure"]) for b in out.blocks] == [([50, 50, 50, 90], None), ([0, 0, 49, 49], "images/0.jpg")]
    assert len(out.regions) == 2  # the empty box is still a region


def test_other_tasks_keep_the_model_text(tmp_path):
    images = [Image.new("RGB", (400, 600)), Image.new("RGB", (800, 200))]
    out = assemble(pages(), images, markdown=False, out_dir=tmp_path)
    assert out.text == out.raw_output and "<|det|>" in out.text
    assert [b["text"] for b in out.blocks] == ["First page", "# Second", ""]  # blocks never hold tags
    plain = assemble([PageOutput(1, "just text", 2, 73, True, 0.1, "eos", 0.05)], images[:1], markdown=True,
                     out_dir=tmp_path)
    assert plain.text == "just text" and plain.regions == [] and plain.annotated_images == [] and plain.figures == []
    assert plain.blocks == [{"page": 1, "type": "text", "box": None, "box_normalized": None, "text": "just text",
                             "figure": None}]


def test_text_leaves_out_the_tokenizers_non_content_tokens_and_raw_output_keeps_them(tmp_path, tiny_tokenizer):
    """Every added token of the checkpoint's tokenizer, decoded as the engine decodes a page: only the table
    cells (and, outside markdown, the reference tags) reach the text."""
    added = tiny_tokenizer.get_added_vocab()  # token → id
    content = {token for token in added if token in TABLE_TOKENS or token in REFERENCE_TAGS}
    not_content = set(added) - content
    assert {"<｜place▁holder▁no▁12｜>", "<image>", tiny_tokenizer.eos_token, tiny_tokenizer.pad_token} <= not_content
    words = tiny_tokenizer.encode(" Item 4.20", add_special_tokens=False)
    grounded = tiny_tokenizer.encode("<|ref|>table<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\n",
                                     add_special_tokens=False)
    ids = list(grounded)
    for token_id in sorted(added.values()):
        if token_id not in grounded:
            ids += [token_id, *words]
    raw = tiny_tokenizer.decode(ids, skip_special_tokens=False)  # what the engine's decode_text keeps
    expected = tiny_tokenizer.decode([i for i in ids if tiny_tokenizer.convert_ids_to_tokens(i) not in not_content],
                                     skip_special_tokens=False)
    page = PageOutput(1, raw, len(ids), 73, False, 1.0, "max_new_tokens", 0.5)
    image = [Image.new("RGB", (64, 64))]
    plain = assemble([page], image, markdown=False, out_dir=tmp_path / "plain", added_tokens=list(added))
    markdown = assemble([page], image, markdown=True, out_dir=tmp_path / "md", added_tokens=list(added))
    assert plain.raw_output == markdown.raw_output == raw.strip()  # exactly what the model wrote
    assert plain.text == expected.strip()
    assert markdown.text == expected.replace(tiny_tokenizer.decode(grounded, skip_special_tokens=False), "\n")
    for text in (plain.text, markdown.text, *(b["text"] for b in markdown.blocks + plain.blocks)):
        assert not [token for token in not_content if token in text]
        assert text.count("<td>") == text.count("</td>") == text.count("<tr>") == text.count("</tr>") == 1
    assert [b["type"] for b in markdown.blocks] == ["table"] and markdown.blocks[0]["box"] == [0, 0, 64, 64]
