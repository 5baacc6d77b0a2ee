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


def send_body(handler, body: bytes, mode: str) -> None:
    """A 200 answer with `body`; mode 'cut' sends half of it under the whole length (a broken connection)."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body if mode != "cut" else body[: len(body) // 2])


def serve_on_loopback(handler_class, path: str) -> tuple:
    """(server, its URL for `path`): an HTTP server on 127.0.0.1 in a thread of its own."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/{path}"


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
                send_body(self, body, mode)

        self.httpd, self.url = serve_on_loopback(Handler, "model.tar")

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


# ---------------------------------------------------------------- choosing the model; DeepSeek-OCR 2's files


class FilesServer:
    """Serves the files of a folder by name under /<revision>/; `plan` maps a name to behaviours for its next
    GET requests ('cut', '404'), then 'ok'."""

    def __init__(self, folder: Path):
        self.folder, self.plan, self.gets = folder, {}, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def body(self):
                path = server.folder / self.path.rsplit("/", 1)[-1]
                return path.read_bytes() if path.is_file() else None

            def do_HEAD(self):
                body = self.body()
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.gets[name] = server.gets.get(name, 0) + 1
                plan = server.plan.get(name, [])
                mode = plan.pop(0) if plan else "ok"
                body = self.body()
                if body is None or mode == "404":
                    self.send_error(404)
                    return
                send_body(self, body, mode)

        self.httpd, self.url = serve_on_loopback(Handler, "0123abcd")

    def close(self):
        self.httpd.shutdown()


OCR2 = weights.OFFICIAL_WEIGHTS["deepseek-ocr-2"]
SHARD = "model-00001-of-000001.safetensors"


@pytest.fixture
def ocr2_source(tiny_ocr2_checkpoint, tmp_path):
    """The tiny OCR 2 checkpoint's official files, served as the pinned revision serves the real ones."""
    folder = tmp_path / "revision"
    folder.mkdir()
    for name in OCR2.files:
        shutil.copy(tiny_ocr2_checkpoint / name, folder / name)
    server = FilesServer(folder)
    yield server
    server.close()


@pytest.fixture
def repository(tiny_ocr2_checkpoint, tmp_path, monkeypatch):
    """A repository: our model code in checkpoints/, and the official OCR 2 tensor table (here the tiny
    checkpoint's, as scripts/data keeps the real one's)."""
    from safetensors import safe_open

    monkeypatch.setenv("PATH", f"{FAKES}:{__import__('os').environ['PATH']}")
    repo = tmp_path / "repo"
    (repo / "checkpoints").mkdir(parents=True)
    (repo / "checkpoints" / "modeling_deepseekocr2.py").write_text(OUR_CODE)
    (repo / "checkpoints" / "deepencoder2.py").write_text(OUR_CODE)
    with safe_open(str(tiny_ocr2_checkpoint / SHARD), "pt") as handle:
        rows = [f"{n}\t{'x'.join(map(str, handle.get_slice(n).get_shape()))}" for n in handle.keys()]
    table = repo / OCR2.reference_tensors
    table.parent.mkdir(parents=True)
    table.write_text("name\tshape\n" + "\n".join(rows) + "\n")
    return repo


def fetch_ocr2(repository, source, **options):
    logs = []
    folder = weights.ensure_model_weights(repository, "deepseek-ocr-2", url=source.url, log=logs.append,
                                          backoff_s=0, **options)
    return folder, logs


def test_the_official_sources():
    first, second = weights.OFFICIAL_WEIGHTS["deepseek-ocr"], OCR2
    assert (first.url, first.folder, first.files) == (weights.DEFAULT_URL, "checkpoints", ())
    assert second.folder == "checkpoints/deepseek-ocr-2" and second.tensor_dtypes == ("BF16", "F32")
    assert second.url == f"https://huggingface.co/deepseek-ai/DeepSeek-OCR-2/resolve/{weights.OCR2_REVISION}"
    assert len(weights.OCR2_REVISION) == 40 and int(weights.OCR2_REVISION, 16) >= 0
    assert {"config.json", SHARD, "model.safetensors.index.json", "tokenizer.json"} <= set(second.files)
    table = weights.reference_tensor_shapes(Path(__file__).resolve().parent.parent / second.reference_tensors)
    assert len(table) == 2707 and table["model.qwen2_model.query_768.weight"] == (144, 896)


def test_a_folder_says_which_model_it_holds(tiny_checkpoint, tiny_ocr2_checkpoint, tmp_path):
    assert weights.model_in(tiny_checkpoint).model == "deepseek-ocr"
    assert weights.model_in(tiny_ocr2_checkpoint).model == "deepseek-ocr-2"
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {
        "AutoModel": "modeling_deepseekocr2.DeepseekOCR2ForCausalLM"}}))
    assert weights.model_in(tmp_path).model == "deepseek-ocr-2"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekOcr2ForConditionalGeneration"]}))
    with pytest.raises(WeightsError, match="DeepseekOcr2ForConditionalGeneration, none of the models.*converted"):
        weights.model_in(tmp_path)


def test_ocr2_files_are_fetched_verified_and_installed_beside_our_code(repository, ocr2_source):
    folder, logs = fetch_ocr2(repository, ocr2_source)
    assert folder == repository / "checkpoints" / "deepseek-ocr-2"
    assert sorted(p.name for p in folder.iterdir()) == sorted(OCR2.files + ("deepencoder2.py",
                                                                           "modeling_deepseekocr2.py"))
    assert (folder / "modeling_deepseekocr2.py").read_text() == OUR_CODE  # our code, for trust_remote_code
    assert ocr2_source.gets == {name: 1 for name in OCR2.files}
    assert leftovers(folder) == [] and any("installed 7 verified file(s)" in line for line in logs)
    (repository / "checkpoints" / "deepencoder2.py").write_text(OUR_CODE + "# changed\n")
    fetch_ocr2(repository, ocr2_source)  # complete already: no second download; the code beside it refreshed
    assert ocr2_source.gets == {name: 1 for name in OCR2.files}
    assert (folder / "deepencoder2.py").read_text().endswith("# changed\n")


def test_ocr2_cut_transfer_is_retried(repository, ocr2_source):
    ocr2_source.plan = {SHARD: ["cut"], "tokenizer.json": ["404"]}
    folder, logs = fetch_ocr2(repository, ocr2_source, retries=3)
    assert verify_weights(folder) == [] and sum("failed" in line for line in logs) == 2


def test_ocr2_file_missing_at_the_revision_fails_clearly(repository, ocr2_source):
    (ocr2_source.folder / "tokenizer_config.json").unlink()
    with pytest.raises(WeightsError, match="after 2 tries: pget failed.*tokenizer_config.json: HTTP 404"):
        fetch_ocr2(repository, ocr2_source, retries=2)
    assert not (repository / "checkpoints" / "deepseek-ocr-2" / "config.json").exists()


def test_ocr2_tensors_are_checked_against_the_official_table(repository, ocr2_source):
    table = repository / OCR2.reference_tensors
    table.write_text(table.read_text().replace("model.qwen2_model.query_768.weight\t", "model.query_768\t"))
    with pytest.raises(WeightsError, match="missing, e.g. model.query_768.*unexpected.*query_768.weight"):
        fetch_ocr2(repository, ocr2_source, retries=1)


def test_ocr2_tensors_must_be_bf16_or_f32(repository, ocr2_source):
    from safetensors.torch import load_file

    shard = ocr2_source.folder / SHARD
    tensors = load_file(str(shard))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].half()
    save_file(tensors, str(shard))
    with pytest.raises(WeightsError, match=r"1 tensor\(s\) of a dtype other than BF16 or F32, e.g. lm_head.weight"):
        fetch_ocr2(repository, ocr2_source, retries=1)
    tensors["lm_head.weight"] = tensors["lm_head.weight"].float()  # F32 beside BF16 is fine
    save_file(tensors, str(shard))
    assert fetch_ocr2(repository, ocr2_source)[0].name == "deepseek-ocr-2"


def test_the_other_models_weights_are_not_installed_as_ocr2(repository, ocr2_source, tiny_checkpoint):
    shutil.copy(tiny_checkpoint / "config.json", ocr2_source.folder / "config.json")
    with pytest.raises(WeightsError, match="holds DeepSeek-OCR weights, not DeepSeek-OCR 2's"):
        fetch_ocr2(repository, ocr2_source, retries=1)


def test_a_weights_dir_of_either_model_is_used_in_place(repository, ocr2_source, tiny_checkpoint):
    from ocr_service.engine import checkpoint_tensor_shapes

    folder, _ = fetch_ocr2(repository, ocr2_source, local_dir=str(tiny_checkpoint),
                           expected_tensors=checkpoint_tensor_shapes)
    assert folder == tiny_checkpoint and ocr2_source.gets == {}
