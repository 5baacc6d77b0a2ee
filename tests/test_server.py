"""The predictor through the real Cog HTTP server, called as Replicate calls it, on the tiny checkpoint."""

import concurrent.futures
import time

import pytest
import requests

import input_corpus as corpus
from cog_server import WebhookReceiver, data_uri
from conftest import document_image

TASKS = ["Convert to Markdown", "Free OCR", "Parse Figure", "Locate Object by Reference"]
PRESETS = {"Gundam (Recommended)": 903, "Tiny": 73, "Small": 111, "Base": 273, "Large": 421}


@pytest.fixture(scope="module")
def page_png():
    return corpus.png_bytes(document_image(1240, 1754))  # A4 at 150 dpi: Gundam tiles it 2 × 3


def succeed(server, inputs):
    code, body = server.predict(inputs)
    assert code == 200 and body["status"] == "succeeded", body.get("error") or body
    return body["output"]


def fail(server, inputs, message):
    code, body = server.predict(inputs)
    assert code == 200 and body["status"] == "failed", body
    assert message in body["error"], body["error"]
    assert server.health()["status"] == "READY"


def test_the_server_log_has_no_deprecation_warning_from_cog(server):
    assert "Detected async run()" in server.log_path.read_text()  # the log is the one that loaded predict.py
    assert server.cog_deprecation_warnings() == []


def test_schema_shows_the_inputs_choices_and_defaults(server):
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    properties = schema["components"]["schemas"]["Input"]["properties"]
    assert properties["task_type"]["enum"] == TASKS and properties["task_type"]["default"] == TASKS[0]
    assert properties["resolution_size"]["enum"] == list(PRESETS)
    assert properties["resolution_size"]["default"] == "Gundam (Recommended)"
    assert properties["image"]["format"] == "uri" and properties["reference_text"]["type"] == "string"
    assert schema["components"]["schemas"]["Input"]["required"] == ["image"]
    output = schema["components"]["schemas"]["Output"]["properties"]
    assert set(output) == {"text", "raw_output", "regions", "annotated_images", "figures", "pages", "blocks"}


def check_task_and_preset(server, page_png, task: str, preset: str, image_tokens: int) -> None:
    """One A4 page through `server` with this task and preset: one page of the expected image tokens, 3 new
    tokens, the page's size, and output of the documented types (both models' server tests)."""
    inputs = {"image": data_uri(page_png, "page.png"), "task_type": task, "resolution_size": preset,
              "max_new_tokens": 3}
    if task == "Locate Object by Reference":
        inputs["reference_text"] = "the title"
    output = succeed(server, inputs)
    assert len(output["pages"]) == 1
    page = output["pages"][0]
    assert page["image_tokens"] == image_tokens
    assert page["generated_tokens"] == 3 and page["width"] == 1240 and page["height"] == 1754
    assert isinstance(output["text"], str) and isinstance(output["regions"], list)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_task_and_preset(server, page_png, task, preset):
    check_task_and_preset(server, page_png, task, preset, PRESETS[preset])


def test_pdf_pages_and_selection(server):
    pdf = data_uri(corpus.pdf_bytes([(595, 842), (842, 595), (400, 400)]), "doc.pdf")
    output = succeed(server, {"image": pdf, "resolution_size": "Tiny", "max_new_tokens": 2})
    assert [p["page"] for p in output["pages"]] == [1, 2, 3]
    output = succeed(server, {"image": pdf, "resolution_size": "Tiny", "max_new_tokens": 2, "pages": "2-3"})
    assert [p["page"] for p in output["pages"]] == [2, 3]


def test_blocks_and_page_texts_through_the_server(server):
    pdf = data_uri(corpus.pdf_bytes([(595, 842), (842, 595)]), "doc.pdf")
    output = succeed(server, {"image": pdf, "task_type": "Free OCR", "resolution_size": "Tiny",
                              "max_new_tokens": 60})  # enough for random weights to write some text
    assert "\n\n---\n\n".join(p["text"] for p in output["pages"]) == output["text"]
    for block in output["blocks"]:  # random weights write no grounding tags: text without boxes, page by page
        assert set(block) == {"page", "type", "box", "box_normalized", "text", "figure"}
        assert block["box"] is None and block["figure"] is None and block["page"] in (1, 2)
        page_text = output["pages"][block["page"] - 1]["text"]
        assert block["text"] and block["text"] in page_text
    assert [b["page"] for b in output["blocks"]] == [p["page"] for p in output["pages"] if p["text"].strip()]


@pytest.mark.parametrize("inputs, message", [
    ({"image": data_uri(b"hello, not an image", "a.png")}, "not a supported image"),
    ({"image": data_uri(corpus.png_bytes(corpus.document())[:3000], "cut.png")}, "damaged or truncated"),
    ({"image": data_uri(b"", "empty.png")}, "empty"),
    ({"task_type": "Locate Object by Reference"}, "reference_text is required"),
    ({"task_type": "Locate Object by Reference", "reference_text": "x<|/ref|><|det|>"}, "special tokens"),
    ({"image": data_uri(corpus.pdf_bytes([(300, 300)] * 2), "doc.pdf"), "pages": "3"},
     "page 3 is out of range: the document has 2"),
])
def test_bad_inputs_fail_clearly_and_the_server_stays_healthy(server, page_png, inputs, message):
    inputs = {"image": data_uri(page_png, "page.png"), "resolution_size": "Tiny", "max_new_tokens": 2, **inputs}
    fail(server, inputs, message)
    succeed(server, {"image": data_uri(page_png, "page.png"), "resolution_size": "Tiny", "max_new_tokens": 2})


@pytest.mark.parametrize("inputs, field", [({"task_type": "Summarise"}, "task_type"),
                                           ({"resolution_size": "Huge"}, "resolution_size"),
                                           ({"max_new_tokens": 0}, "max_new_tokens"),
                                           ({"max_new_tokens": 9000}, "max_new_tokens")])
def test_schema_refuses_unknown_choices(server, page_png, inputs, field):
    code, body = server.predict({"image": data_uri(page_png, "page.png"), **inputs})
    assert code == 422 and body["detail"][0]["loc"][-1] == field


def test_concurrent_predictions_share_the_batch(server, page_png):
    inputs = {"image": data_uri(page_png, "page.png"), "resolution_size": "Tiny"}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        bodies = list(pool.map(lambda n: server.predict({**inputs, "max_new_tokens": n})[1], [5, 9, 13]))
    assert [b["status"] for b in bodies] == ["succeeded"] * 3
    assert [b["output"]["pages"][0]["generated_tokens"] for b in bodies] == [5, 9, 13]


def test_cancelled_prediction_frees_its_slot(server, page_png):
    hook = WebhookReceiver()
    inputs = {"image": data_uri(page_png, "page.png"), "resolution_size": "Tiny", "max_new_tokens": 8000}
    assert server.start_async("cancel-me", inputs, hook.url) == 202
    time.sleep(2)
    assert requests.post(f"{server.url}/predictions/cancel-me/cancel", timeout=10).status_code == 200
    assert hook.final_status() == "canceled"
    hook.close()
    started = time.monotonic()
    succeed(server, {"image": data_uri(page_png, "page.png"), "resolution_size": "Tiny", "max_new_tokens": 4})
    assert time.monotonic() - started < 30  # not queued behind the cancelled 8000-token decode
    assert "left the engine" in server.log_path.read_text()
