"""Start the real Cog HTTP server around predict.py on 127.0.0.1, without Docker or the Cog CLI.

Run it through scripts/serve-local.sh, which sets up .venv first. Steps:
  1. weights: --weights DIR (verified first), or a tiny random checkpoint built once into
     .cog/tiny-checkpoint (git-ignored) and built again when the model's tensors no longer match it;
  2. the input schema .cog/openapi_schema.json, which `cog build` would write inside the image;
  3. the server, in the foreground; once it is ready, a curl line that reads the sample page. Ctrl-C stops it.

The tiny checkpoint has random weights: the server answers with the real output format, but the
text is noise. Pass --weights with a folder of the official weights to read documents.
"""

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_CHECKPOINT = REPO / ".cog" / "tiny-checkpoint"
SAMPLE_PAGE = REPO / "samples" / "page.png"
HOST = "127.0.0.1"


def tiny_checkpoint() -> Path:
    """Built on first use, and again when the model's tensors no longer match it (the model code changed)."""
    from ocr_service.engine import checkpoint_tensor_shapes
    from ocr_service.weights import verify_weights
    from scripts.make_random_checkpoint import write_checkpoint

    if not verify_weights(TINY_CHECKPOINT, checkpoint_tensor_shapes):
        return TINY_CHECKPOINT
    print(f"building a tiny random checkpoint in {TINY_CHECKPOINT.relative_to(REPO)}", flush=True)
    shutil.rmtree(TINY_CHECKPOINT, ignore_errors=True)
    return write_checkpoint(TINY_CHECKPOINT, size="tiny", seed=0)


def checked_weights(folder: Path) -> Path:
    from ocr_service.engine import checkpoint_tensor_shapes
    from ocr_service.weights import verify_weights

    problems = verify_weights(folder, checkpoint_tensor_shapes)
    if problems:
        sys.exit(f"serve-local: --weights {folder} is not a complete set of DeepSeek-OCR weights: "
                 + "; ".join(problems))
    return folder.resolve()


def declared_concurrency() -> int:
    """The concurrency predict.py declares with @cog.concurrent: what the image gets from `cog build`."""
    from predict import Predictor

    return getattr(Predictor.run, "__cog_concurrent_max__", 1)


def smallest_preset(weights: Path) -> str:
    """The one-view resolution_size of the smallest view the model in `weights` has: Tiny, or Small for
    DeepSeek-OCR 2 (which has no Tiny)."""
    from ocr_service.engine import model_class
    from ocr_service.presets import model_presets

    presets = model_presets(model_class(weights).processing)
    return min((name for name, preset in presets.items() if not preset.crop_mode),
               key=lambda name: presets[name].image_size)


def curl_example(url: str, page: Path = SAMPLE_PAGE, preset: str = "Tiny") -> str:
    """A request that answers in seconds on a CPU: the smallest preset and 64 tokens (the defaults, Gundam and
    up to 8,192 tokens, take minutes there)."""
    # The page goes in the JSON body as a data URI, piped into curl: a page is often larger than the
    # longest single argument Linux allows (128 KiB). `base64 | tr -d '\n'` works on Linux and macOS.
    return ("( printf '{\"input\": {\"image\": \"data:image/png;base64,'; "
            f"base64 < {shlex.quote(str(page))} | tr -d '\\n';\n"
            f"  printf '\", \"task_type\": \"Free OCR\", \"resolution_size\": \"{preset}\", \"max_new_tokens\": 64}}}}' ) |\n"
            f"  curl -s {url}/predictions -H 'Content-Type: application/json' -d @-")


def health(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/health-check", timeout=5) as response:
            return json.load(response).get("status", "")
    except (OSError, ValueError):  # not listening yet
        return ""


def wait_ready(url: str, server: subprocess.Popen) -> bool:
    """Until the server is READY (True), or its setup failed or it stopped (False)."""
    while server.poll() is None:
        status = health(url)
        if status == "READY":
            return True
        if status in ("SETUP_FAILED", "DEFUNCT"):
            return False
        time.sleep(0.5)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    parser.add_argument("--weights", type=Path,
                        help="a folder holding the weights of DeepSeek-OCR or DeepSeek-OCR 2 (default: a tiny random "
                             "checkpoint of DeepSeek-OCR)")
    parser.add_argument("--concurrency", type=int,
                        help="predictions served at once (default: what predict.py declares)")
    args = parser.parse_args()
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is not a TCP port (1-65535)")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error(f"--concurrency {args.concurrency} must be at least 1")

    sys.path.insert(0, str(REPO))
    weights = checked_weights(args.weights) if args.weights else tiny_checkpoint()
    concurrency = args.concurrency or declared_concurrency()
    subprocess.run([sys.executable, str(REPO / "scripts" / "write_openapi_schema.py")], cwd=REPO, check=True)

    url = f"http://{HOST}:{args.port}"
    print(f"\nStarting DeepSeek-OCR on {url}: weights {weights}, {concurrency} prediction(s) at once.\n",
          flush=True)

    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, DEEPSEEK_OCR_WEIGHTS_DIR=str(weights), DEEPSEEK_OCR_OFFLINE="1", PORT=str(args.port),
               COG_PREDICT_TYPE_STUB="predict.py:Predictor", COG_MAX_CONCURRENCY=str(concurrency),
               PYTHONUNBUFFERED="1",
               # The server starts its worker as a plain `python`: it must be this environment's.
               PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    server = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", HOST], cwd=REPO, env=env)
    # Ctrl-C reaches the server too (one process group); a SIGTERM sent to this process alone is passed on.
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        if wait_ready(url, server):
            random_note = ("The tiny model has random weights: the text is random tokens, the format is real "
                           "(pass --weights for real text).\n" if not args.weights else "")
            preset = smallest_preset(weights)
            print(f"\nDeepSeek-OCR is ready on {url}. Read the sample page ({preset} preset, 64 tokens):\n\n"
                  f"{curl_example(url, preset=preset)}\n\n{random_note}Ctrl-C stops the server.\n", flush=True)
        elif server.poll() is None:
            print(f"\nThe server's setup failed (the log above says why; {url}/health-check has it too). "
                  "Stopping it.", file=sys.stderr, flush=True)
            server.terminate()
            server.wait()
            sys.exit(1)
        sys.exit(server.wait())
    except KeyboardInterrupt:  # Ctrl-C in a terminal reached the server too; a SIGINT sent here alone did not
        try:
            sys.exit(server.wait(timeout=10))
        except subprocess.TimeoutExpired:
            server.terminate()
            sys.exit(server.wait())


if __name__ == "__main__":
    main()
