"""Pages' outputs assembled into one result: markdown, regions per page, annotated pages, figure files."""

from PIL import Image

from ocr_service.document import PageOutput, assemble

PAGE_1 = "<|ref|>image<|/ref|><|det|>[[0, 0, 499, 499]]<|/det|>\nFirst page"
PAGE_2 = "<|ref|>title<|/ref|><|det|>[[0, 0, 999, 99]]<|/det|>\n# Second\n<|ref|>image<|/ref|><|det|>[[500, 500, 999, 999]]<|/det|>"


def pages():
    return [PageOutput(1, PAGE_1, 10, 273, True, 1.0), PageOutput(2, PAGE_2, 12, 273, False, 1.0)]


def test_markdown_document_numbers_figures_across_pages(tmp_path):
    images = [Image.new("RGB", (400, 600), "white"), Image.new("RGB", (800, 200), "grey")]
    out = assemble(pages(), images, markdown=True, out_dir=tmp_path)
    assert out.text == "![](images/0.jpg)\n\nFirst page\n\n---\n\n\n# Second\n![](images/1.jpg)\n"
    assert [f.name for f in out.figures] == ["0.jpg", "1.jpg"]
    assert Image.open(out.figures[1]).size == (800 - int(500 / 999 * 800), 200 - int(500 / 999 * 200))
    assert [r["page"] for r in out.regions] == [1, 2, 2]
    assert [p.name for p in out.annotated_images] == ["page_1_boxes.jpg", "page_2_boxes.jpg"]
    assert out.pages[1] == {"page": 2, "width": 800, "height": 200, "image_tokens": 273, "generated_tokens": 12,
                            "finished": False, "seconds": 1.0}
    assert "<|ref|>" in out.raw_output


def test_other_tasks_keep_the_model_text(tmp_path):
    images = [Image.new("RGB", (400, 600)), Image.new("RGB", (800, 200))]
    out = assemble(pages(), images, markdown=False, out_dir=tmp_path)
    assert out.text == out.raw_output and "<|det|>" in out.text
    plain = assemble([PageOutput(1, "just text", 2, 73, True, 0.1)], images[:1], markdown=True, out_dir=tmp_path)
    assert plain.text == "just text" and plain.regions == [] and plain.annotated_images == [] and plain.figures == []
