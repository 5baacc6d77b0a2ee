"""Run the real Cog HTTP server (pip `cog`/coglet) on 127.0.0.1 around predict.py, as Replicate calls it."""

import base64
import mimetypes
import os
import signal
import socket
import subprocess
import sys
import time
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


class CogServer:
    def __init__(self, env: dict, concurrency: int = 1, startup_timeout: float = 180):
        subprocess.run([sys.executable, str(REPO / "scripts" / "write_openapi_schema.py")], cwd=REPO, check=True,
                       capture_output=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
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
        response = requests.post(f"{self.url}/predictions", json={"input": inputs}, timeout=timeout,
                                 headers=headers or {})
        return response.status_code, response.json()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


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
