"""Injected faults: out-of-memory during a prediction (encode and decode), disk full while extracting, and
cancellations and time limits arriving while a prediction is still reading its file, being sized or being
handed to the serving thread."""

import concurrent.futures
import json
import os
import time
from pathlib import Path

import pytest
import requests

import input_corpus as corpus
from cog_server import CogServer, WebhookReceiver, data_uri
from conftest import document_image
from ocr_service.engine import JobCancelled, OCREngine
from ocr_service.presets import resolution
from ocr_service.settings import Settings
from ocr_service.weights import WeightsError, ensure_weights

FAULTS = Path(__file__).parent / "faults"
FAKES = Path(__file__).parent / "fakes"
TIME_LIMIT_S = 15
IDLE = {"rows": 0, "blocks": 0, "waiting": 0, "predictions": 0}


class Files:
    def __init__(self, folder: Path):
        self.oom = folder / "oom-flag"  # names the part that runs out of memory next
        self.hold = folder / "hold-flag"  # names the step held while it exists
        self.hold_events = folder / "hold-flag.events"
        self.state = folder / "state.json"  # what the engine holds, every 0.1 s

    def events(self) -> list:
        return self.hold_events.read_text().splitlines() if self.hold_events.exists() else []

    def engine_state(self) -> list:
        return json.loads(self.state.read_text()) if self.state.exists() else []


@pytest.fixture(scope="module")
def faulty_server(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    files = Files(folder)
    server = CogServer({"DEEPSEEK_OCR_WEIGHTS_DIR": str(tiny_checkpoint), "DEEPSEEK_OCR_OFFLINE": "1",
                        "PYTHONPATH": str(FAULTS), "DEEPSEEK_OCR_TEST_OOM_FLAG": str(files.oom),
                        "DEEPSEEK_OCR_TEST_HOLD_FLAG": str(files.hold),
                        "DEEPSEEK_OCR_TEST_STATE_FILE": str(files.state),
                        "DEEPSEEK_OCR_REQUEST_TIMEOUT": str(TIME_LIMIT_S),
                        "COG_TEST_LOG": str(folder / "server.log")}, concurrency=2)
    yield server, files
    server.stop()


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def held(files: Files, step: str, count: int = 1):
    return lambda: files.events().count(f"held {step}") >= count


def release(files: Files, step: str, count: int = 1) -> None:
    files.hold.unlink(missing_ok=True)
    wait_until(lambda: files.events().count(f"released {step}") >= count, 10, f"the held {step} went on")


def assert_engine_stays_idle(files: Files, seconds: float = 1.5) -> None:
    """Idle once the serving thread has had a round to take what was handed to it, and still idle after."""
    wait_until(lambda: files.engine_state() == [IDLE], 5, "the engine holds nothing")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert files.engine_state() == [IDLE]
        time.sleep(0.1)


def small_page(**inputs) -> dict:
    return {"image": data_uri(corpus.png_bytes(corpus.document()), "doc.png"), "resolution_size": "Tiny", **inputs}


@pytest.mark.parametrize("where", ["encode", "decode"])
def test_out_of_memory_fails_the_prediction_cleanly_and_the_next_works(faulty_server, where):
    server, files = faulty_server
    flag = files.oom
    inputs = small_page(max_new_tokens=3)
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
    inputs = small_page()
    code, body = server.predict({**inputs, "max_new_tokens": 8000})
    assert body["status"] == "failed" and f"longer than its {TIME_LIMIT_S} s limit" in body["error"]
    code, body = server.predict({**inputs, "max_new_tokens": 3})
    assert body["status"] == "succeeded"


@pytest.mark.parametrize("step", ["load", "prepare", "submit"])
def test_a_cancellation_reaches_the_prediction_however_early_it_comes(faulty_server, step):
    """Cancelled while its file is read, while the engine sizes the job, or while the job is handed to the
    serving thread: the prediction ends at once, and what the held step goes on to do never runs."""
    server, files = faulty_server
    files.hold_events.unlink(missing_ok=True)
    files.hold.write_text(step)
    hook = WebhookReceiver()
    try:
        assert server.start_async(f"cancel-in-{step}", small_page(max_new_tokens=3000), hook.url) == 202
        wait_until(held(files, step), 60, f"the prediction reached {step}")
        assert requests.post(f"{server.url}/predictions/cancel-in-{step}/cancel", timeout=10).status_code == 200
        assert hook.final_status(timeout=10) == "canceled"  # while the step is still held
        assert held(files, step)() and files.events().count(f"released {step}") == 0
    finally:
        release(files, step)
        hook.close()
    assert_engine_stays_idle(files)  # not decoding the 3000 tokens until the time limit
    log = server.log_path.read_text()
    if step == "submit":  # the job reached the serving thread after its cancellation, which dropped it
        assert "cancelled before it started: 1 page(s) never joined the engine" in log
    code, body = server.predict(small_page(max_new_tokens=3))
    assert body["status"] == "succeeded", body.get("error")


def test_the_time_limit_counts_from_the_start_of_the_prediction(faulty_server):
    """Past the limit while the file is still being read: the prediction fails at the limit, not after."""
    server, files = faulty_server
    files.hold_events.unlink(missing_ok=True)
    files.hold.write_text("load")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(server.predict, small_page(max_new_tokens=3), 120)
        try:
            wait_until(held(files, "load"), 60, "the prediction reads its file")
            code, body = answer.result(timeout=TIME_LIMIT_S + 20)
        finally:
            release(files, "load")
    assert body["status"] == "failed" and f"longer than its {TIME_LIMIT_S} s limit" in body["error"], body
    assert time.monotonic() - started < TIME_LIMIT_S + 15
    assert_engine_stays_idle(files)


def test_a_full_server_still_answers_409(faulty_server):
    """Both slots really taken: the client's retry of Cog's spurious 409s (CogServer) must not hide this one."""
    server, files = faulty_server
    files.hold_events.unlink(missing_ok=True)
    files.hold.write_text("load")
    hooks = [WebhookReceiver(), WebhookReceiver()]
    retries_before = len(server.capacity_retries)
    try:
        for n, hook in enumerate(hooks):
            assert server.start_async(f"fill-{n}", small_page(max_new_tokens=3), hook.url) == 202
        wait_until(held(files, "load", 2), 60, "both predictions read their files")
        assert server.health()["status"] == "BUSY"
        code, body = server.predict(small_page(max_new_tokens=3))
        assert code == 409 and len(server.capacity_retries) == retries_before
        for n in range(2):
            assert requests.post(f"{server.url}/predictions/fill-{n}/cancel", timeout=10).status_code == 200
        assert [hook.final_status(timeout=10) for hook in hooks] == ["canceled", "canceled"]
    finally:
        release(files, "load", 2)
        for hook in hooks:
            hook.close()
    assert_engine_stays_idle(files)


def test_an_engine_job_cancelled_before_the_serving_thread_takes_it_never_starts(tiny_checkpoint):
    cpu = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cpu"})
    logs = []
    engine = OCREngine(tiny_checkpoint, cpu, logs.append)
    job = engine.prepare([document_image(400, 300)], "<image>\nFree OCR.", resolution("Tiny"), 3000)
    job.cancel()  # before `start`: nothing has been handed over yet
    engine.start(job)
    with pytest.raises(JobCancelled):
        job.wait(10)
    assert engine.server.holdings() == IDLE
    assert any("never joined the engine" in line for line in logs)
    assert len(engine.run_pages([document_image(400, 300)], "<image>\nFree OCR.", resolution("Tiny"), 3)[0]
               .token_ids) == 3


def test_the_reference_path_stops_at_the_next_token_when_cancelled(tiny_checkpoint):
    cpu = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cpu", "DEEPSEEK_OCR_ENGINE": "reference",
                             "DEEPSEEK_OCR_STOP_LOOPS": "0"})
    engine = OCREngine(tiny_checkpoint, cpu, lambda _: None)
    job = engine.prepare([document_image(400, 300)], "<image>\nFree OCR.", resolution("Tiny"), 3000)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(engine.start, job)  # the reference path decodes in the caller's thread
        time.sleep(1)
        job.cancel()
        with pytest.raises(JobCancelled):
            running.result(timeout=10)
    with pytest.raises(JobCancelled):
        job.wait(1)


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
