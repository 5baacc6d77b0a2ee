"""DeepSeek-OCR 2 through the real Cog HTTP server, called as Replicate calls it, on the tiny OCR 2 checkpoint: every
task with each preset it has, the presets it has not refused with an error that names the choices, PDFs."""

import pytest

import input_corpus as corpus
from cog_server import data_uri
from conftest import document_image
from test_server import TASKS, check_task_and_preset, fail, succeed

# Image tokens of an A4 page at 150 dpi: a 1024 global view (256) + 2 × 3 tiles of 768 (144 each) + the separator;
# one 768 view (stretched) + the separator; one 1024 view (padded) + the separator.
PRESETS = {"Gundam (Recommended)": 256 + 6 * 144 + 1, "Small": 145, "Base": 257}
REFUSED = ["Tiny", "Large"]


@pytest.fixture(scope="module")
def page_png():
    return corpus.png_bytes(document_image(1240, 1754))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_task_and_preset(ocr2_server, page_png, task, preset):
    check_task_and_preset(ocr2_server, page_png, task, preset, PRESETS[preset])


@pytest.mark.parametrize("preset", REFUSED)
def test_presets_without_an_equivalent_are_refused_naming_the_choices(ocr2_server, page_png, preset):
    fail(ocr2_server, {"image": data_uri(page_png, "page.png"), "resolution_size": preset, "max_new_tokens": 2},
         f"resolution_size '{preset}' has no equivalent in DeepSeek-OCR 2, the model this service runs; "
         "choose one of Gundam (Recommended), Small, Base")
    succeed(ocr2_server, {"image": data_uri(page_png, "page.png"), "resolution_size": "Small", "max_new_tokens": 2})


def test_pdf_pages_and_selection(ocr2_server):
    pdf = data_uri(corpus.pdf_bytes([(595, 842), (842, 595), (400, 400)]), "doc.pdf")
    output = succeed(ocr2_server, {"image": pdf, "max_new_tokens": 2})  # Gundam: each page its own tiles
    assert [p["page"] for p in output["pages"]] == [1, 2, 3]
    # at 144 dpi: 1190×1684 (2×3 tiles), 1684×1190 (3×2), 800×800 (2×2: both sides above 768)
    assert [p["image_tokens"] for p in output["pages"]] == [1121, 1121, 257 + 4 * 144]
    output = succeed(ocr2_server, {"image": pdf, "resolution_size": "Base", "max_new_tokens": 2, "pages": "2-3"})
    assert [(p["page"], p["image_tokens"]) for p in output["pages"]] == [(2, 257), (3, 257)]


def test_blocks_and_page_texts(ocr2_server):
    pdf = data_uri(corpus.pdf_bytes([(595, 842), (842, 595)]), "doc.pdf")
    output = succeed(ocr2_server, {"image": pdf, "task_type": "Free OCR", "resolution_size": "Small",
                                   "max_new_tokens": 60})
    assert "\n\n---\n\n".join(p["text"] for p in output["pages"]) == output["text"]
    for block in output["blocks"]:
        assert block["box"] is None and block["page"] in (1, 2)
        assert block["text"] and block["text"] in output["pages"][block["page"] - 1]["text"]
