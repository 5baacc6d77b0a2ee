"""Run the real Cog HTTP server (pip `cog`/coglet) on 127.0.0.1 around predict.py, as Replicate calls it."""

import base64
import json
import mimetypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_uri(data: bytes, name: str = "input.bin") -> str:
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


# A Python warning or a print of Cog's about its own API (`cog:` is the prefix of Cog's printed warnings).
COG_API = re.compile(r"BasePredictor|BaseRunner|\bpredict\(\)|\brun\(\)|^cog:|ExperimentalFeatureWarning|emit_metric")


class SpuriousCapacityRefusals(UserWarning):
    """Cog's server refused predictions with 409 "At capacity" while it had free slots; they were retried."""


class CogServer:
    # Cog 0.23.1's server sometimes refuses a prediction with 409 "At capacity" although slots are free (two
    # requests arriving together: README, Troubleshooting). Such a refusal is retried, at most this many times
    # and only while the server's health says it has a free slot and this client has no more predictions
    # waiting than the server has slots; a real capacity bug still shows as a 409. Retries are counted
    # (`capacity_retries`) and reported as a warning when the server stops.
    CAPACITY_RETRIES = 3

    def __init__(self, env: dict, concurrency: int = 1, startup_timeout: float = 180):
        subprocess.run([sys.executable, str(REPO / "scripts" / "write_openapi_schema.py")], cwd=REPO, check=True,
                       capture_output=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.concurrency = concurrency
        self.capacity_retries: list = []  # (method, path) of each 409 retried
        self._waiting = 0  # synchronous predictions this client has sent and not yet had answered
        self._lock = threading.Lock()
        venv_bin = str(Path(sys.executable).parent)
        full_env = dict(os.environ, **env, PORT=str(self.port), COG_PREDICT_TYPE_STUB="predict.py:Predictor",
                        COG_MAX_CONCURRENCY=str(concurrency), PYTHONUNBUFFERED="1",
                        PATH=f"{venv_bin}:{os.environ.get('PATH', '')}")
        self.log_path = Path(env.get("COG_TEST_LOG", "/tmp/cog-server-test.log"))
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=REPO,
                                        env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.wait_ready(startup_timeout)

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=5).json()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                status = self.health()
                if status.get("status") == "READY":
                    return
                if status.get("status") in ("SETUP_FAILED", "DEFUNCT"):
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready ({status}); log:\n{self.log_path.read_text()[-5000:]}")

    def predict(self, inputs: dict, timeout: float = 300, headers=None) -> tuple:
        """POST /predictions and wait for the answer: (status code, body)."""
        with self._lock:
            self._waiting += 1
        try:
            response = self._send("POST", "/predictions", {"input": inputs}, timeout, headers or {})
        finally:
            with self._lock:
                self._waiting -= 1
        return response.status_code, response.json()

    def start_async(self, prediction_id: str, inputs: dict, webhook: str) -> int:
        """PUT /predictions/{id} with `Prefer: respond-async`, as Replicate starts predictions: the status code."""
        return self._send("PUT", f"/predictions/{prediction_id}", {"input": inputs, "webhook": webhook}, 10,
                          {"Prefer": "respond-async"}).status_code

    def _send(self, method: str, path: str, body: dict, timeout: float, headers: dict) -> requests.Response:
        for attempt in range(self.CAPACITY_RETRIES + 1):
            response = requests.request(method, f"{self.url}{path}", json=body, timeout=timeout, headers=headers)
            if response.status_code != 409 or attempt == self.CAPACITY_RETRIES or not self._has_free_slots():
                return response
            self.capacity_retries.append((method, path))
            time.sleep(0.05 * 2 ** attempt)
        return response

    def _has_free_slots(self) -> bool:
        """The server's own count (health is BUSY when no slot is free) and this client's agree on a free slot."""
        with self._lock:
            waiting = self._waiting
        return waiting <= self.concurrency and self.health().get("status") == "READY"

    def cog_deprecation_warnings(self) -> list:
        """Lines of the server log in which Cog warns that something it was given is deprecated: coglet's own
        log events, and Python warnings or prints that name Cog's API."""
        found = []
        for line in self.log_path.read_text().splitlines():
            try:
                event = json.loads(line)
                fields = event.get("fields", {})
                message, from_coglet = str(fields.get("message", "")), "source" not in fields
            except (ValueError, AttributeError):
                message, from_coglet = line, False
            if re.search("deprecat", message, re.IGNORECASE) and (from_coglet or COG_API.search(message)):
                found.append(message)
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()
        if self.capacity_retries:
            warnings.warn(SpuriousCapacityRefusals(
                f"Cog's server answered 409 'At capacity' with slots free {len(self.capacity_retries)} time(s) "
                f"(retried: {self.capacity_retries}); log: {self.log_path}"))


class WebhookReceiver:
    """Collects the prediction updates the server posts to a webhook on 127.0.0.1."""

    def __init__(self):
        import http.server
        import json
        import threading

        self.events = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.events.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def final_status(self, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [e for e in self.events if e.get("status") in ("succeeded", "failed", "canceled")]
            if done:
                return done[-1]["status"]
            time.sleep(0.2)
        return None

    def close(self):
        self.httpd.shutdown()
