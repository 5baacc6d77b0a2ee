"""Shared fixtures: a tiny random checkpoint of the official format, built once per test session."""

import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.make_random_checkpoint import DATA, write_checkpoint  # noqa: E402

# Facts about the official checkpoint (config, added tokens, tensor shapes), kept in the repository.
REFERENCE = DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Weights, config and tokenizer of a tiny model, plus our model code beside them, so the folder
    loads both directly and through `AutoModel.from_pretrained(..., trust_remote_code=True)`."""
    folder = write_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), size="tiny", seed=0)
    for source in (REPO / "checkpoints").glob("*.py"):
        shutil.copy(source, folder / source.name)
    return folder


@pytest.fixture(scope="session")
def tiny_ocr2_checkpoint(tmp_path_factory) -> Path:
    """A tiny DeepSeek-OCR 2 checkpoint of the official format (its SAM and encoder small, the same tokenizer
    and decoder sizes as `tiny_checkpoint`), with our model code beside it."""
    folder = write_checkpoint(tmp_path_factory.mktemp("tiny-ocr2-checkpoint"), size="tiny", seed=0, model="ocr2")
    for source in (REPO / "checkpoints").glob("*.py"):
        shutil.copy(source, folder / source.name)
    return folder


@pytest.fixture(scope="session")
def tiny_ocr2_model(tiny_ocr2_checkpoint):
    from checkpoints import DeepseekOCR2ForCausalLM

    return DeepseekOCR2ForCausalLM.from_pretrained(tiny_ocr2_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint, trust_remote_code=True)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from checkpoints import DeepseekOCRForCausalLM

    model = DeepseekOCRForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory):
    """The real Cog HTTP server on 127.0.0.1 around predict.py, loading the tiny checkpoint."""
    from cog_server import CogServer

    log = tmp_path_factory.mktemp("server") / "server.log"
    running = CogServer({"DEEPSEEK_OCR_WEIGHTS_DIR": str(tiny_checkpoint), "DEEPSEEK_OCR_OFFLINE": "1",
                         "COG_TEST_LOG": str(log)}, concurrency=4)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def ocr2_server(tiny_ocr2_checkpoint, tmp_path_factory):
    """The real Cog HTTP server around predict.py serving the tiny DeepSeek-OCR 2 checkpoint (one for every
    OCR 2 HTTP test)."""
    from cog_server import CogServer

    log = tmp_path_factory.mktemp("ocr2-server") / "server.log"
    running = CogServer({"DEEPSEEK_OCR_WEIGHTS_DIR": str(tiny_ocr2_checkpoint), "DEEPSEEK_OCR_OFFLINE": "1",
                         "DEEPSEEK_OCR_MODEL": "deepseek-ocr-2", "COG_TEST_LOG": str(log)}, concurrency=4)
    yield running
    running.stop()


def reference_tensor_shapes(folder: Path = REFERENCE) -> dict:
    """name → shape of every tensor in the official checkpoint (`REFERENCE / "deepseek-ocr-2"`: OCR 2's)."""
    rows = (folder / "checkpoint-tensors.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return {name: tuple(int(d) for d in shape.split("x")) for name, shape in (r.split("\t") for r in rows)}


def document_image(width: int, height: int, seed: int = 0):
    """A page-like RGB image: white background, dark text lines and a grey figure block, with some noise
    so that no view is flat."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    line_height = max(4, height // 40)
    for y in range(line_height, height - line_height, line_height * 2):
        x_end = int(width * rng.uniform(0.4, 0.95))
        draw.rectangle([width // 20, y, x_end, y + line_height // 2], fill=(rng.randint(0, 60),) * 3)
    draw.rectangle([width // 4, height // 3, width // 2, height // 2], fill=(120, 140, 160))
    for _ in range(200):
        draw.point((rng.randrange(width), rng.randrange(height)), fill=(rng.randrange(256),) * 3)
    return image
