"""Injected faults: out-of-memory during a prediction (encode and decode), disk full while extracting."""

import os
from pathlib import Path

import pytest

import input_corpus as corpus
from cog_server import CogServer, data_uri
from ocr_service.weights import WeightsError, ensure_weights

FAULTS = Path(__file__).parent / "faults"
FAKES = Path(__file__).parent / "fakes"


@pytest.fixture(scope="module")
def faulty_server(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    flag = folder / "oom-flag"
    server = CogServer({"DEEPSEEK_OCR_WEIGHTS_DIR": str(tiny_checkpoint), "DEEPSEEK_OCR_OFFLINE": "1",
                        "PYTHONPATH": str(FAULTS), "DEEPSEEK_OCR_TEST_OOM_FLAG": str(flag),
                        "DEEPSEEK_OCR_REQUEST_TIMEOUT": "15",
                        "COG_TEST_LOG": str(folder / "server.log")}, concurrency=2)
    yield server, flag
    server.stop()


@pytest.mark.parametrize("where", ["encode", "decode"])
def test_out_of_memory_fails_the_prediction_cleanly_and_the_next_works(faulty_server, where):
    server, flag = faulty_server
    inputs = {"image": data_uri(corpus.png_bytes(corpus.document()), "doc.png"), "resolution_size": "Tiny",
              "max_new_tokens": 3}
    flag.write_text(where)
    code, body = server.predict(inputs)
    assert code == 200 and body["status"] == "failed"
    assert "ran out of memory" in body["error"] and "Traceback" not in body["error"]
    assert not flag.exists()  # the fault fired
    assert server.health()["status"] == "READY"
    code, body = server.predict(inputs)
    assert body["status"] == "succeeded" and body["output"]["pages"][0]["generated_tokens"] == 3


def test_request_time_limit(faulty_server):
    server, _ = faulty_server
    inputs = {"image": data_uri(corpus.png_bytes(corpus.document()), "doc.png"), "resolution_size": "Tiny"}
    code, body = server.predict({**inputs, "max_new_tokens": 8000})
    assert body["status"] == "failed" and "longer than its 15 s limit" in body["error"]
    code, body = server.predict({**inputs, "max_new_tokens": 3})
    assert body["status"] == "succeeded"


def test_disk_full_while_extracting(tmp_path, monkeypatch):
    import http.server
    import threading

    payload = b"x" * 1000
    monkeypatch.setenv("PATH", f"{FAKES}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_PGET_DISK_FULL", "1")

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_HEAD = do_GET

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    target = tmp_path / "checkpoints"
    target.mkdir()
    try:
        with pytest.raises(WeightsError, match="No space left on device"):
            ensure_weights(target, url=f"http://127.0.0.1:{httpd.server_address[1]}/m.tar", log=lambda m: None,
                           retries=2, backoff_s=0)
    finally:
        httpd.shutdown()
    assert list(target.iterdir()) == [] and not list(tmp_path.glob(".weights-*"))
