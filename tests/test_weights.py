"""Weights download against a real HTTP server on 127.0.0.1 serving tars of a checkpoint folder."""

import http.server
import io
import json
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ocr_service import weights
from ocr_service.weights import WeightsError, ensure_weights, verify_weights

FAKES = Path(__file__).parent / "fakes"
OUR_CODE = "# our model code: never overwritten\n"
TENSORS = {"model.embed_tokens.weight": torch.ones(8, 4), "lm_head.weight": torch.zeros(8, 4)}
EXPECTED = {name: tuple(t.shape) for name, t in TENSORS.items()}


def checkpoint_files(folder: Path, drop=()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(TENSORS, str(folder / "model-00001-of-000001.safetensors"))
    index = {"weight_map": {name: "model-00001-of-000001.safetensors" for name in TENSORS}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text(json.dumps({"name": name}))
    (folder / "modeling_deepseekocr.py").write_text("# the original's code, must not replace ours\n")
    for name in drop:
        (folder / name).unlink()
    return folder


def tar_of(folder: Path, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=prefix + path.name)
    return buffer.getvalue()


class Server:
    """Serves `payload`; `plan` is a list of behaviours for the next GET requests, then 'ok'."""

    def __init__(self):
        self.payload, self.plan, self.gets = b"", [], 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.payload)))
                self.end_headers()

            def do_GET(self):
                server.gets += 1
                mode = server.plan.pop(0) if server.plan else "ok"
                if mode == "404":
                    self.send_error(404)
                    return
                body = server.payload if mode != "corrupt" else b"\x00garbage" * 1000
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if mode != "cut" else body[: len(body) // 2])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/model.tar"

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def target(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKES}:{__import__('os').environ['PATH']}")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "modeling_deepseekocr.py").write_text(OUR_CODE)
    return folder


def fetch(target, server, **options):
    logs = []
    options.setdefault("expected_tensors", lambda folder: EXPECTED)
    folder = ensure_weights(target, url=server.url, log=logs.append, backoff_s=0, **options)
    return folder, logs


def leftovers(target):
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".weights-"))


@pytest.mark.parametrize("prefix", ["", "DeepSeek-OCR/"])
def test_download_verifies_and_installs_without_touching_our_code(tmp_path, target, server, prefix):
    server.payload = tar_of(checkpoint_files(tmp_path / "src"), prefix)
    folder, logs = fetch(target, server)
    assert folder == target and verify_weights(target, lambda f: EXPECTED) == []
    assert (target / "modeling_deepseekocr.py").read_text() == OUR_CODE
    assert leftovers(target) == [] and server.gets == 1
    assert any("installed" in line for line in logs)
    fetch(target, server)  # complete already: no second download
    assert server.gets == 1


def test_cut_off_transfer_is_retried_and_recovers(tmp_path, target, server):
    server.payload = tar_of(checkpoint_files(tmp_path / "src"))
    server.plan = ["cut", "404"]
    folder, logs = fetch(target, server, retries=3)
    assert server.gets == 3 and verify_weights(folder) == []
    assert sum("failed" in line for line in logs) == 2


def test_failures_that_persist_leave_nothing_usable(tmp_path, target, server):
    server.payload = tar_of(checkpoint_files(tmp_path / "src"))
    server.plan = ["cut"] * 3
    with pytest.raises(WeightsError, match="after 3 tries: pget failed"):
        fetch(target, server, retries=3)
    assert verify_weights(target) != [] and leftovers(target) == []
    assert sorted(p.name for p in target.iterdir()) == ["modeling_deepseekocr.py"]


def test_corrupt_archive(tmp_path, target, server):
    server.payload = tar_of(checkpoint_files(tmp_path / "src"))
    server.plan = ["corrupt"] * 2
    with pytest.raises(WeightsError, match="extract failed"):
        fetch(target, server, retries=2)
    assert leftovers(target) == []


def test_truncated_weights_inside_a_valid_tar_are_refused(tmp_path, target, server):
    source = checkpoint_files(tmp_path / "src")
    shard = source / "model-00001-of-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    server.payload = tar_of(source)
    with pytest.raises(WeightsError, match="truncated"):
        fetch(target, server, retries=1)
    assert not (target / "model-00001-of-000001.safetensors").exists()


def test_missing_file_is_named(tmp_path, target, server):
    server.payload = tar_of(checkpoint_files(tmp_path / "src", drop=["tokenizer.json"]))
    with pytest.raises(WeightsError, match="missing file tokenizer.json"):
        fetch(target, server, retries=1)


def test_tensor_mismatch_is_reported(tmp_path, target, server):
    server.payload = tar_of(checkpoint_files(tmp_path / "src"))
    expected = dict(EXPECTED, **{"model.norm.weight": (4,), "lm_head.weight": (9, 4)})
    with pytest.raises(WeightsError, match=r"missing, e.g. model.norm.weight.*shape mismatch: lm_head.weight"):
        fetch(target, server, retries=1, expected_tensors=lambda folder: expected)


def test_pget_missing(target, server, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(WeightsError, match="pget is not on PATH"):
        fetch(target, server)


def test_offline_mode(target, server):
    with pytest.raises(WeightsError, match="offline"):
        fetch(target, server, offline=True)
    assert server.gets == 0


def test_local_weights_dir_is_used_in_place(tmp_path, target, server):
    prepared = checkpoint_files(tmp_path / "prepared")
    folder, _ = fetch(target, server, local_dir=str(prepared))
    assert folder == prepared and server.gets == 0
    (prepared / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="config.json is not valid JSON"):
        fetch(target, server, local_dir=str(prepared))


def test_not_enough_disk(tmp_path, target, server, monkeypatch):
    server.payload = tar_of(checkpoint_files(tmp_path / "src"))
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 99, 1))
    with pytest.raises(WeightsError, match="not enough disk space"):
        fetch(target, server)
    assert server.gets == 0


def test_archive_that_escapes_its_folder_writes_nothing_outside(tmp_path, target, server):
    source = checkpoint_files(tmp_path / "src")
    with tarfile.open(fileobj=io.BytesIO(tar_of(source)), mode="r") as original:
        members = [(m, original.extractfile(m).read()) for m in original.getmembers()]
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
        for name in ("../escaped.txt", "/tmp/absolute-escape.txt"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        link = tarfile.TarInfo("tokenizer_link.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    server.payload = evil.getvalue()
    with pytest.raises(WeightsError):
        fetch(target, server, retries=1)
    assert not (target.parent / "escaped.txt").exists() and not Path("/tmp/absolute-escape.txt").exists()
    assert not (target / "tokenizer_link.json").exists()


def test_only_plain_files_of_the_archive_are_installed(tmp_path):
    """Whatever a real pget left behind, links and folders are never moved into checkpoints/."""
    root = checkpoint_files(tmp_path / "extracted")
    (root / "tokenizer.json").unlink()
    (root / "tokenizer.json").symlink_to("/etc/passwd")
    (root / "assets").mkdir()
    (root / "assets" / "config.json").write_text("{}")
    target = tmp_path / "checkpoints"
    target.mkdir()
    (target / "modeling_deepseekocr.py").write_text(OUR_CODE)
    moved = weights._install_data_files(root, target)
    assert not (target / "tokenizer.json").exists() and not (target / "assets").exists()
    assert (target / "modeling_deepseekocr.py").read_text() == OUR_CODE
    assert moved == 4  # the shard, its index, config.json, tokenizer_config.json
