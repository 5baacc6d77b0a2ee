"""scripts/serve-local.sh for real: the Cog HTTP server it starts answers a page, the curl line it prints once
the server is ready reads the sample page, and Ctrl-C stops it. The samples are what make_samples.py writes.

The script runs with this test's interpreter (`--python`, so it does not set up .venv) and the
session's tiny checkpoint (`--weights`), on a free port.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import input_corpus as corpus
from cog_server import data_uri, free_port
from conftest import document_image

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "serve-local.sh"
SAMPLES = REPO / "samples"
CURL_EXAMPLE_START = "Read the sample page (Tiny preset, 64 tokens):"
CURL_EXAMPLE_END = "Ctrl-C stops the server."


class LocalServer:
    def __init__(self, weights: Path, log_path: Path, startup_timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            ["bash", str(SCRIPT), "--python", sys.executable, "--port", str(self.port), "--weights", str(weights)],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(startup_timeout)

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                status = requests.get(f"{self.url}/health-check", timeout=5).json().get("status")
            except requests.RequestException:
                status = None
            if status == "READY":
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"serve-local.sh not ready (health {status}); output:\n{self.output()[-5000:]}")

    def ctrl_c(self, timeout: float = 30) -> int:
        """Send what Ctrl-C in a terminal sends (SIGINT to the foreground process group); the exit status."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def local_server(tiny_checkpoint, tmp_path_factory):
    server = LocalServer(tiny_checkpoint, tmp_path_factory.mktemp("serve-local") / "output.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_png() -> bytes:
    return corpus.png_bytes(document_image(320, 240))


def printed_example(server: LocalServer) -> str:
    """The curl line, printed once the server is ready (shortly after health says READY)."""
    deadline = time.monotonic() + 10
    output = server.output()
    while CURL_EXAMPLE_END not in output.partition(CURL_EXAMPLE_START)[2]:
        assert time.monotonic() < deadline, output[-3000:]
        time.sleep(0.1)
        output = server.output()
    return output[output.index(CURL_EXAMPLE_START) + len(CURL_EXAMPLE_START):output.rindex(CURL_EXAMPLE_END)]


def test_prints_a_curl_example_once_ready(local_server):
    example = printed_example(local_server)
    assert f"curl -s {local_server.url}/predictions" in example
    assert str(SAMPLES / "page.png") in example
    output = local_server.output()
    assert output.index(f"is ready on {local_server.url}") > output.index("Setup complete")  # after the server's


def test_answers_a_png_posted_as_json(local_server, small_png):
    response = requests.post(f"{local_server.url}/predictions", timeout=300, json={"input": {
        "image": data_uri(small_png, "page.png"), "task_type": "Free OCR", "max_new_tokens": 8}})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "succeeded", body.get("error") or body
    (page,) = body["output"]["pages"]
    assert (page["width"], page["height"]) == (320, 240)
    assert 1 <= page["generated_tokens"] <= 8


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("base64") is None,
                    reason="the printed example needs curl and base64")
def test_the_printed_curl_example_reads_the_sample_page(local_server, tmp_path):
    example = printed_example(local_server).strip().split("\n\n")[0]  # the note about random weights follows it
    result = subprocess.run(["bash", "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["status"] == "succeeded", body.get("error") or body
    (page,) = body["output"]["pages"]
    assert (page["width"], page["height"], page["image_tokens"]) == (1000, 1414, 73)  # the Tiny preset
    assert page["generated_tokens"] <= 64


def test_the_samples_are_what_make_samples_writes(tmp_path):
    from PIL import Image, ImageChops

    from ocr_service.inputs import load_pages

    subprocess.run([sys.executable, str(REPO / "scripts" / "make_samples.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    with Image.open(SAMPLES / "page.png") as committed, Image.open(tmp_path / "page.png") as made:
        assert ImageChops.difference(committed.convert("RGB"), made.convert("RGB")).getbbox() is None
    committed, made = load_pages(SAMPLES / "document.pdf"), load_pages(tmp_path / "document.pdf")
    assert len(committed) == len(made) == 2
    for old, new in zip(committed, made):  # JPEG inside the PDF: libjpeg builds may round differently
        difference = ImageChops.difference(old.image, new.image).convert("L")
        assert old.image.size == new.image.size and difference.getextrema()[1] <= 8


def test_ctrl_c_stops_the_server(local_server):
    local_server.ctrl_c()  # raises subprocess.TimeoutExpired if the server is still up 30 s later
    assert local_server.process.poll() is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{local_server.url}/health-check", timeout=5)


def test_weights_that_are_not_a_checkpoint_are_refused_naming_the_option(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, "--weights", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"--weights {tmp_path} is not a complete set of DeepSeek-OCR weights" in result.stderr
    assert "missing file tokenizer.json" in result.stderr
