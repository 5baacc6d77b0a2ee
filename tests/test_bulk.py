"""The bulk command on the CPU with the tiny checkpoint: a folder of documents (PDFs, images, a multi-page
TIFF, a duplicate, damaged files, one over the page limit) gives the predictor's output for each document
and a manifest; runs stopped by SIGTERM and SIGKILL resume to every document exactly once; Ray Data in local
mode gives the same; listing, the output folder's commit and the options are checked without the model."""

import asyncio
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, document_image
from ocr_service import bulk
from ocr_service.bulk_io import (
    MANIFEST, OK, REFUSED, STAGING, OutputFolder, PageBudget, Source, fetched, fingerprint, list_sources, record,
)
from ocr_service.engine import OCREngine, PageResult
from ocr_service.errors import InputError
from ocr_service.pipeline import FILES_FOLDER, Options, assemble_document, run_document, write_document
from ocr_service.inputs import Page
from ocr_service.settings import Settings

ENVIRONMENT = {"DEEPSEEK_OCR_DEVICE": "cpu", "DEEPSEEK_OCR_MAX_PAGES": "4", "DEEPSEEK_OCR_OFFLINE": "1"}
TASK = {"task_type": "Free OCR", "resolution_size": "Tiny", "max_new_tokens": 40}
ARGUMENTS = ["--task-type", TASK["task_type"], "--resolution-size", TASK["resolution_size"],
             "--max-new-tokens", str(TASK["max_new_tokens"]), "--no-progress-bar"]
REFUSALS = {  # document → what its error says
    "broken/empty.png": "the file given as image is empty",
    "broken/truncated.pdf": "may be damaged or truncated",
    "reports/too-long.pdf": "image has 5 pages; the limit is 4 per request (DEEPSEEK_OCR_MAX_PAGES)",
}
TIMINGS = ("seconds", "first_token_seconds")


def _save(image: Image.Image, path: Path, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.copy().save(path, **options)  # a copy: Pillow keeps one save's options on the image


def make_corpus(folder: Path) -> Path:
    """Eleven documents (thirteen pages to read), and files a folder listing must leave out."""
    page = [document_image(260 + 40 * i, 360 - 20 * (i % 3), seed=i) for i in range(8)]
    _save(page[0], folder / "reports/a.pdf", save_all=True, append_images=[page[1].copy()])
    _save(page[2], folder / "reports/b.pdf", save_all=True, append_images=[page[3].copy(), page[4].copy()])
    _save(page[5], folder / "reports/too-long.pdf", save_all=True, append_images=[p.copy() for p in page[:4]])
    _save(page[5], folder / "scans/c.png")
    shutil.copy(folder / "scans/c.png", folder / "scans/copy of c.png")  # a duplicate: its own document
    _save(page[6], folder / "scans/d.jpg", quality=90)
    _save(page[7], folder / "scans/e.tif", save_all=True, append_images=[page[0].copy(), page[2].copy()])
    _save(page[1], folder / "f.webp")
    _save(page[3], folder / "g.bmp")
    (folder / "broken").mkdir()
    (folder / "broken/empty.png").write_bytes(b"")
    (folder / "broken/truncated.pdf").write_bytes((folder / "reports/b.pdf").read_bytes()[:400])
    (folder / "notes.txt").write_text("not a document")  # not listed: not a document's extension
    _save(page[0], folder / ".hidden/x.png")  # not listed: hidden
    return folder


DOCUMENTS = ["broken/empty.png", "broken/truncated.pdf", "f.webp", "g.bmp", "reports/a.pdf", "reports/b.pdf",
             "reports/too-long.pdf", "scans/c.png", "scans/copy of c.png", "scans/d.jpg", "scans/e.tif"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings.from_env(ENVIRONMENT)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, settings):
    return SubmitSpy(OCREngine(tiny_checkpoint, settings, log=lambda _: None))


class SubmitSpy:
    """The engine, with every submission recorded: the pages, prompt, preset and token limit it got, and
    its job (whose results hold the generated token ids)."""

    def __init__(self, engine: OCREngine):
        self.engine, self.calls = engine, []
        original = engine.prepare

        # Every job is made by `prepare` (`submit` is prepare + start; the predictor calls the two apart).
        def prepare(images, prompt, preset, max_new_tokens, background=False):
            job = original(images, prompt, preset, max_new_tokens, background)
            self.calls.append({"pages": pages_digest(images), "prompt": prompt, "preset": preset,
                               "max_new_tokens": max_new_tokens, "job": job})
            return job
        engine.prepare = prepare

    def take(self) -> dict:
        """Pages digest → (prompt, preset, max_new_tokens, token ids per page) of the calls so far."""
        calls, self.calls = self.calls, []
        return {c["pages"]: (c["prompt"], c["preset"], c["max_new_tokens"],
                             [r.token_ids for r in c["job"].wait(60)]) for c in calls}


def pages_digest(images) -> str:
    digest = hashlib.sha256()
    for image in images:
        digest.update(repr(image.size).encode() + image.tobytes())
    return digest.hexdigest()


def manifest_lines(folder: Path) -> list:
    text = (folder / MANIFEST).read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def comparable(output: dict) -> dict:
    """An output without its timings (each run's own)."""
    return dict(output, pages=[{k: v for k, v in page.items() if k not in TIMINGS} for page in output["pages"]])


def document_output(out: Path, name: str) -> dict:
    return comparable(json.loads((out / name / "output.json").read_text(encoding="utf-8")))


def run_in_process(monkeypatch, engine, *arguments) -> int:
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(bulk, "load_engine", lambda *args, **kwargs: engine.engine)
    return bulk.main([*map(str, arguments), *ARGUMENTS])


@pytest.fixture(scope="module")
def first_run(corpus, engine, tmp_path_factory):
    """The corpus through the bulk command in this process, on the shared engine."""
    out = tmp_path_factory.mktemp("bulk-out")
    with pytest.MonkeyPatch.context() as monkeypatch:
        code = run_in_process(monkeypatch, engine, corpus, out)
    backgrounds = {call["job"].background for call in engine.calls}
    return {"out": out, "code": code, "backgrounds": backgrounds, "calls": engine.take()}


def test_the_command_loads_its_engine_for_the_runs_resolution_alone(monkeypatch, engine, tmp_path):
    """The engine compiles the vision towers for the preset's view sizes only (OCREngine's `resolutions`)."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (64, 48), "white").save(folder / "page.png")
    asked = []
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(bulk, "load_engine", lambda *args, **kwargs: asked.append(kwargs) or engine.engine)
    try:
        assert bulk.main([str(folder), str(tmp_path / "out"), *ARGUMENTS]) == 0
    finally:
        engine.take()
    assert [call["resolutions"] for call in asked] == [[TASK["resolution_size"]]]


def test_progress_counts_its_rate_and_time_left_from_when_an_engine_has_work(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(bulk.time, "time", lambda: clock[0])
    lines = []
    progress = bulk.Progress(total=4, log=lines.append, bar=False, every=0)
    clock[0] = 1100.0  # the model loads for 100 s
    progress.work_started()
    clock[0] = 1110.0
    progress.update(bulk.Summary(listed=4, ok=1, pages=8))
    assert lines[-1] == "1/4 documents, 8 pages, 0.80 pages/s, 0 failed, 30 s left"  # not 5 min 30 s
    # Ray's engines report when each first had a document: the earliest counts, never before the run's start.
    clock[0] = 1000.0
    ray_progress = bulk.Progress(total=4, log=lines.append, bar=False, every=0)
    clock[0] = 1110.0
    ray_progress.work_started(1105.0)
    ray_progress.work_started(1102.0)
    ray_progress.work_started(1108.0)
    ray_progress.update(bulk.Summary(listed=4, ok=2, pages=16))
    assert lines[-1] == "2/4 documents, 16 pages, 2.00 pages/s, 0 failed, 8 s left"
    ray_progress.work_started(900.0)
    ray_progress.update(bulk.Summary(listed=4, ok=2, refused=1, pages=16))
    assert lines[-1] == "3/4 documents, 16 pages, 0.15 pages/s, 1 failed, 36 s left"
    # an engine on a node whose clock runs ahead: counted from now at the latest, never a negative time
    ahead = bulk.Progress(total=2, log=lines.append, bar=False, every=0)
    ahead.work_started(clock[0] + 60)
    clock[0] += 4
    ahead.update(bulk.Summary(listed=2, ok=1, pages=8))
    assert lines[-1] == "1/2 documents, 8 pages, 2.00 pages/s, 0 failed, 4 s left"


def test_the_summary_gives_the_rate_from_the_start_and_once_the_model_was_loaded():
    line = bulk.Summary(listed=3, ok=3, pages=40, tokens=900, seconds=50.0, work_seconds=10.0).line()
    assert line.endswith("40 pages, 900 tokens in 50.0 s (0.80 pages/s; 4.00 once the model was loaded)")
    assert bulk.Summary(listed=1, skipped=1).line().endswith("0 pages, 0 tokens in 0.0 s (0.00 pages/s)")


def test_progress_before_any_engine_counts_from_the_start(monkeypatch):
    clock = [50.0]
    monkeypatch.setattr(bulk.time, "time", lambda: clock[0])
    lines = []
    progress = bulk.Progress(total=3, log=lines.append, bar=False, every=0)
    progress.update(bulk.Summary(listed=3))
    assert lines[-1] == "0/3 documents, 0 pages, 0.00 pages/s, 0 failed, time left unknown"
    clock[0] = 60.0
    progress.update(bulk.Summary(listed=3, refused=1))  # refused before the engine was needed
    assert lines[-1] == "1/3 documents, 0 pages, 0.00 pages/s, 1 failed, 20 s left"


def test_every_document_is_in_the_manifest_once_with_clear_errors(first_run):
    out = first_run["out"]
    assert first_run["code"] == bulk.EXIT_FAILED  # three documents were refused
    lines = manifest_lines(out)
    assert sorted(line["document"] for line in lines) == DOCUMENTS
    by_name = {line["document"]: line for line in lines}
    for name, line in by_name.items():
        if name in REFUSALS:
            assert line["status"] == REFUSED and REFUSALS[name] in line["error"], line
            assert line["output_json"] is None and not (out / name).exists()
        else:
            assert line["status"] == OK and line["error"] is None
            assert (out / line["output_json"]).is_file() and (out / line["output_markdown"]).is_file()
            output = json.loads((out / line["output_json"]).read_text())
            assert line["pages"] == len(output["pages"]) and line["stop_reasons"] == [
                p["stop_reason"] for p in output["pages"]]
            assert line["tokens"] == sum(p["generated_tokens"] for p in output["pages"])
            assert (out / line["output_markdown"]).read_text() == output["text"]
    assert [by_name[n]["pages"] for n in ("reports/a.pdf", "reports/b.pdf", "scans/e.tif")] == [2, 3, 3]
    assert by_name["scans/c.png"]["content_hash"] == by_name["scans/copy of c.png"]["content_hash"]
    assert by_name["scans/c.png"]["options"] == dict(TASK, pages="", reference_text="", max_pages=4,
                                                     max_pixels=64_000_000, pdf_dpi=144, repetition_rule="serving",
                                                     stop_loops=True)
    assert not (out / STAGING).exists()


def test_bulk_documents_run_in_the_background_and_predictions_do_not(first_run, corpus, engine, settings,
                                                                      monkeypatch):
    # Nobody waits on a bulk document's first token: its first page must not cut the encoder's passes short.
    assert first_run["backgrounds"] == {True}
    predict_directly(engine.engine, settings, monkeypatch, corpus / "scans" / "c.png", **TASK)
    assert [call["job"].background for call in engine.calls] == [False]
    engine.take()


def predict_directly(engine, settings, monkeypatch, path: Path, **inputs):
    """Predictor.run on a file, on the given engine, with every input given (as Cog would)."""
    import predict
    from cog import Path as CogPath

    monkeypatch.setattr(predict, "SETTINGS", settings)
    predictor = predict.Predictor()
    predictor.engine = engine
    return asyncio.run(predictor.run(image=CogPath(path), reference_text="", pages="", **inputs))


def test_outputs_equal_the_predictors(first_run, corpus, engine, settings, monkeypatch):
    out = first_run["out"]
    for name in DOCUMENTS:
        if name in REFUSALS:
            with pytest.raises(InputError) as refused:
                predict_directly(engine.engine, settings, monkeypatch, corpus / name, **TASK)
            assert manifest_by_name(out)[name]["error"] == str(refused.value)
            continue
        predicted = predict_directly(engine.engine, settings, monkeypatch, corpus / name, **TASK)
        expected = comparable({
            "text": predicted.text, "raw_output": predicted.raw_output, "regions": predicted.regions,
            "annotated_images": [f"{FILES_FOLDER}/{Path(p).name}" for p in predicted.annotated_images],
            "figures": [f"{FILES_FOLDER}/{Path(p).name}" for p in predicted.figures],
            "pages": predicted.pages, "blocks": predicted.blocks})
        assert document_output(out, name) == expected, name
        for path in [*predicted.annotated_images, *predicted.figures]:
            assert (out / name / FILES_FOLDER / Path(path).name).read_bytes() == Path(path).read_bytes()
    # The engine got the same pages, prompt, preset and limit from both, and wrote the same tokens.
    predicted_calls = engine.take()
    assert predicted_calls == first_run["calls"]
    assert any(tokens for *_, pages in predicted_calls.values() for tokens in pages)
    # The pipeline's own one-call form, for the predictor to use, gives the same.
    files = out.parent / "run-document"
    pages, results, merged = run_document(engine.engine, corpus / "scans/e.tif", Options(**TASK), settings.limits,
                                          files / FILES_FOLDER, timeout=60)
    write_document(merged, files, "output.json", "output.md")
    assert document_output(files.parent, files.name) == document_output(out, "scans/e.tif") and len(pages) == 3
    engine.take()


def manifest_by_name(out: Path) -> dict:
    return {line["document"]: line for line in manifest_lines(out)}


def test_a_rerun_skips_what_is_done_and_redoes_what_changed(first_run, corpus, engine, monkeypatch, tmp_path):
    archive = shutil.copytree(corpus, tmp_path / "archive")
    out = shutil.copytree(first_run["out"], tmp_path / "out")
    _save(document_image(300, 300, seed=42), archive / "scans/d.jpg", quality=90)  # new content
    shutil.rmtree(out / "g.bmp")  # its output was lost
    before = manifest_lines(out)
    assert run_in_process(monkeypatch, engine, archive, out) == bulk.EXIT_FAILED  # the refused stay refused
    after = manifest_lines(out)
    assert after[:len(before)] == before
    assert sorted(line["document"] for line in after[len(before):]) == ["g.bmp", "scans/d.jpg"]
    assert len(engine.calls) == 2
    engine.take()
    assert document_output(out, "g.bmp") == document_output(first_run["out"], "g.bmp")
    # Other options: everything is redone, and the latest line of each document says which options made it.
    assert run_in_process(monkeypatch, engine, archive, out, "--pages", "1") == bulk.EXIT_FAILED
    assert len(engine.calls) == 9  # "too-long.pdf" is read now (its first page), the damaged ones are not
    engine.take()
    latest = manifest_by_name(out)
    assert {line["status"] for line in latest.values()} == {OK, REFUSED}
    assert latest["reports/too-long.pdf"]["status"] == OK and latest["reports/b.pdf"]["pages"] == 1
    assert all(line["options"]["pages"] == "1" for line in latest.values())


def start_process(corpus: Path, out: Path, checkpoint: Path, *extra) -> subprocess.Popen:
    environment = dict(os.environ, **ENVIRONMENT, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "ocr_service.bulk", str(corpus), str(out), "--weights-dir", str(checkpoint),
               *ARGUMENTS, "--pages-in-flight", "1", "--readers", "1", "--log-every", "1", *extra]
    return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_lines(out: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        manifest = out / MANIFEST
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= count:
            return
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.02)
    raise AssertionError(f"no {count} manifest lines in {timeout} s")


def visible_files(out: Path) -> list:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                  and STAGING not in p.relative_to(out).parts)


def test_runs_killed_with_sigterm_then_sigkill_resume_to_every_document_once(corpus, first_run, tiny_checkpoint,
                                                                              tmp_path):
    out = tmp_path / "out"
    # SIGTERM: the document in flight finishes (within the grace period), no new one starts.
    process = start_process(corpus, out, tiny_checkpoint)
    wait_for_lines(out, 3, process)
    process.send_signal(signal.SIGTERM)
    log = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, log
    assert "stopping: no new document" in log and "interrupted" in log
    first = manifest_lines(out)
    assert 3 <= len(first) < len(DOCUMENTS)
    assert not (out / STAGING).exists()
    # SIGKILL, at once after a document is committed: wherever the next one was, nothing visible is partial.
    process = start_process(corpus, out, tiny_checkpoint)
    wait_for_lines(out, len(first) + 1, process)
    process.kill()
    process.communicate(timeout=60)
    second = manifest_lines(out)
    assert second[:len(first)] == first and len(second) < len(DOCUMENTS)
    for path in visible_files(out):
        if path.endswith(".json"):
            json.loads((out / path).read_text())  # whole
    # The third run finishes: every document exactly once in the manifest, and the outputs of an unbroken run.
    process = start_process(corpus, out, tiny_checkpoint)
    log = process.communicate(timeout=300)[0]
    assert process.returncode == bulk.EXIT_FAILED, log
    lines = manifest_lines(out)
    assert lines[:len(second)] == second
    assert sorted(line["document"] for line in lines) == DOCUMENTS
    assert not (out / STAGING).exists()
    reference = first_run["out"]
    assert visible_files(out) == visible_files(reference)
    for name in DOCUMENTS:
        if name not in REFUSALS:
            assert document_output(out, name) == document_output(reference, name), name


def run_in_local_ray(ray, monkeypatch, corpus, out, weights) -> int:
    """The command with --ray in this process, on a local Ray of 2 CPUs (ray.init here): its exit status."""
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        return bulk.main([str(corpus), str(out), "--weights-dir", str(weights), *ARGUMENTS, "--ray"])
    finally:
        ray.shutdown()


def test_ray_engines_of_a_node_take_turns_only_where_the_weights_may_be_downloaded(monkeypatch, tmp_path):
    from ocr_service import bulk_ray

    locked = []

    class Recording:
        def __init__(self, path):
            self.path = path

        def __enter__(self):
            locked.append(self.path)

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(bulk_ray, "_node_lock", Recording)
    folder = lambda settings, log: settings.weights_dir or "downloaded"  # noqa: E731
    given = Settings.from_env({**ENVIRONMENT, "DEEPSEEK_OCR_WEIGHTS_DIR": str(tmp_path)})
    assert bulk_ray._weights_on_this_node(given, folder) == str(tmp_path) and locked == []  # only read: no turns
    assert bulk_ray._weights_on_this_node(Settings.from_env(ENVIRONMENT), folder) == "downloaded"
    assert len(locked) == 1  # setup()'s folder, downloaded if missing: one engine at a time


def test_ray_engines_reserve_their_gpus_share_of_the_cpus_less_two_for_reading():
    from ocr_service.bulk_ray import default_engine_cpus

    assert default_engine_cpus(cpus=32, gpus=2, engines=2) == 14  # two cores an engine read and render documents
    assert default_engine_cpus(cpus=16, gpus=1, engines=1) == 14
    assert default_engine_cpus(cpus=24, gpus=2, engines=2) == 10
    assert default_engine_cpus(cpus=8, gpus=4, engines=4) == 2  # never below what the engine's threads need
    assert default_engine_cpus(cpus=256, gpus=8, engines=8) == 14  # the one-GPU engine's threads; the rest read
    assert default_engine_cpus(cpus=3, gpus=0, engines=2) == 1  # CPU engines (tests, trials)


def test_ray_data_in_local_mode_stops_on_sigterm_and_resumes_to_the_same_outputs(first_run, corpus, tiny_checkpoint,
                                                                                 monkeypatch, tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "out"
    # A run through Ray (its own local Ray, CPU engines) stopped by SIGTERM: what is in flight is abandoned.
    process = start_process(corpus, out, tiny_checkpoint, "--ray", "--ray-documents-per-engine", "1")
    wait_for_lines(out, 2, process, timeout=240)
    process.send_signal(signal.SIGTERM)
    log = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, log
    assert "documents in flight are abandoned" in log
    stopped = manifest_lines(out)
    assert 2 <= len(stopped) < len(DOCUMENTS) and not (out / STAGING).exists()
    # As if a kill had come between a folder's rename and its manifest line: a stale folder, redone.
    stale = next(n for n in DOCUMENTS if n not in REFUSALS and n not in {line["document"] for line in stopped})
    (out / stale).mkdir(parents=True, exist_ok=True)
    (out / stale / "output.json").write_text("{}")
    # The rerun, through Ray in this process (ray.init on this machine): every document once, the same outputs.
    code = run_in_local_ray(ray, monkeypatch, corpus, out, tiny_checkpoint)
    assert code == bulk.EXIT_FAILED
    lines = manifest_lines(out)
    assert lines[:len(stopped)] == stopped
    assert sorted(line["document"] for line in lines) == DOCUMENTS
    reference = first_run["out"]
    expected = manifest_by_name(reference)
    for line in lines:
        assert {k: v for k, v in line.items() if k not in ("seconds", "finished_at")} == {
            k: v for k, v in expected[line["document"]].items() if k not in ("seconds", "finished_at")}
    assert visible_files(out) == visible_files(reference)
    for name in DOCUMENTS:
        if name not in REFUSALS:
            assert document_output(out, name) == document_output(reference, name), name


def test_a_list_of_paths_and_urls_and_a_memory_url(corpus, engine, monkeypatch, tmp_path):
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/bulk-test/scans/c.png", (corpus / "scans/c.png").read_bytes())
    listing = tmp_path / "documents.txt"
    listing.write_text(f"# two documents\n{corpus / 'g.bmp'}\n\nmemory://bulk-test/scans/c.png\n")
    out = tmp_path / "out"
    assert run_in_process(monkeypatch, engine, listing, out) == 0
    lines = manifest_by_name(out)
    local, remote = f"{corpus.as_posix().lstrip('/')}/g.bmp", "memory/bulk-test/scans/c.png"
    assert sorted(lines) == sorted([local, remote])
    assert lines[remote]["source"] == "memory://bulk-test/scans/c.png"
    assert lines[remote]["content_hash"] == hashlib.sha256((corpus / "scans/c.png").read_bytes()).hexdigest()
    assert len(engine.calls) == 2
    engine.take()
    # A URL as INPUT: a "folder" of the in-memory filesystem, names below it.
    out = tmp_path / "out-url"
    assert run_in_process(monkeypatch, engine, "memory://bulk-test/", out) == 0
    assert list(manifest_by_name(out)) == ["scans/c.png"]
    assert document_output(out, "scans/c.png") == document_output(tmp_path / "out", remote)
    engine.take()


# ---------------------------------------------------------------- without the model


def test_listing_a_folder_a_glob_and_a_list(corpus, tmp_path):
    names = [s.name for s in list_sources(str(corpus))]
    assert sorted(names) == DOCUMENTS and names == [s.name for s in list_sources(str(corpus))]
    inside = corpus / "reports" / "out"  # an output folder inside the input is never read
    inside.mkdir()
    _save(document_image(100, 100), inside / "x.png")
    try:
        assert sorted(s.name for s in list_sources(str(corpus), exclude=inside)) == DOCUMENTS
    finally:
        shutil.rmtree(inside)
    assert [s.name for s in list_sources(str(corpus / "scans" / "*.png"))] == ["c.png", "copy of c.png"]
    assert [s.name for s in list_sources(f"{corpus}/**/*.pdf")] == [
        "broken/truncated.pdf", "reports/a.pdf", "reports/b.pdf", "reports/too-long.pdf"]
    listing = corpus / "reports" / "list.lst"
    listing.write_text("a.pdf\n../scans/d.jpg\n# a comment\n")
    try:
        assert [(s.name, s.location) for s in list_sources(str(listing))] == [
            ("reports/a.pdf", str(corpus / "reports/a.pdf")), ("scans/d.jpg", str(corpus / "scans/d.jpg"))]
    finally:
        listing.unlink()
    assert list_sources(str(corpus / "scans" / "d.jpg")) == [Source(str(corpus / "scans/d.jpg"), "d.jpg")]
    file_url = list_sources(f"file://{corpus}/reports")
    assert [s.name for s in file_url] == ["a.pdf", "b.pdf", "too-long.pdf"]
    assert file_url[0].location.startswith("file://")
    with pytest.raises(bulk.BulkError):
        list_sources(str(tmp_path / "missing"))


def test_fetched_hashes_local_and_remote_bytes(tmp_path):
    import fsspec

    data = os.urandom(3 * 2**20 + 5)
    (tmp_path / "doc.pdf").write_bytes(data)
    fsspec.filesystem("memory").pipe("/fetch-test/doc.pdf", data)
    for location in (str(tmp_path / "doc.pdf"), "memory://fetch-test/doc.pdf"):
        with fetched(location) as document:
            assert document.content_hash == hashlib.sha256(data).hexdigest() and document.size == len(data)
            assert document.path.read_bytes() == data
        if location.startswith("memory"):
            assert not document.path.exists()  # the temporary copy is gone
    with pytest.raises(OSError):
        with fetched(str(tmp_path / "missing.pdf")):
            pass


def test_the_output_folder_commits_atomically_and_repairs_a_cut_manifest(tmp_path):
    options = {"task_type": "Free OCR"}
    folder = OutputFolder(tmp_path / "out")
    assert folder.open() == {}
    staged = folder.new_staging_folder()
    (staged / "output.json").write_text("{}")
    source = Source("/in/a.pdf", "sub/a.pdf")
    folder.commit(record(source, OK, "h1", 3, options, pages=1), staged)
    assert (tmp_path / "out/sub/a.pdf/output.json").read_text() == "{}"
    # A newer output replaces the folder whole; a refusal removes it.
    staged = folder.new_staging_folder()
    (staged / "output.md").write_text("new")
    folder.commit(record(source, OK, "h2", 3, options, pages=1), staged)
    assert sorted(p.name for p in (tmp_path / "out/sub/a.pdf").iterdir()) == ["output.md"]
    folder.commit(record(Source("/in/b.png", "b.png"), REFUSED, "h3", 0, options, error="empty"), None)
    folder.close()
    # A kill in the middle of a line, and a folder staged but not committed.
    with open(tmp_path / "out" / MANIFEST, "a") as handle:
        handle.write('{"document": "c.png", "sta')
    (tmp_path / "out" / STAGING / "leftover").mkdir(parents=True)
    latest = OutputFolder(tmp_path / "out").open()
    assert sorted(latest) == ["b.png", "sub/a.pdf"] and latest["sub/a.pdf"]["content_hash"] == "h2"
    assert (tmp_path / "out" / MANIFEST).read_text().endswith("}\n")
    assert list((tmp_path / "out" / STAGING).iterdir()) == []
    # Done means: same content, same options, and (if it succeeded) its output still there.
    assert folder.is_done(latest["b.png"], "h3", options) and not folder.is_done(latest["b.png"], "h3", options, True)
    assert not folder.is_done(latest["sub/a.pdf"], "h2", options)  # output.json is missing
    assert not folder.is_done(latest["b.png"], "h4", options) and not folder.is_done(latest["b.png"], "h3", {})
    with pytest.raises(bulk.BulkError):
        folder.document_folder("../escape.pdf")


def test_the_fingerprint_holds_the_options_and_the_settings_that_change_an_output(settings):
    options = Options(task_type="Free OCR", pages="2")
    values = fingerprint(options, settings)
    assert values["task_type"] == "Free OCR" and values["pages"] == "2" and values["max_pages"] == 4
    assert fingerprint(options, settings.replace(pdf_dpi=200)) != values
    assert fingerprint(options, settings.replace(max_rows=3)) == values  # how it runs, not what it gives
    assert fingerprint(options, settings, ignore_eos=True) == dict(values, ignore_eos=True)


def test_pages_in_flight_are_bounded_and_a_large_document_goes_alone():
    import threading

    budget = PageBudget(4)
    assert budget.acquire(3) and not budget.acquire(2, abandon=_set_event())
    budget.release(3)
    assert budget.acquire(9) and budget.used == 9  # larger than the limit: alone
    stop = threading.Event()
    waiter = threading.Thread(target=lambda: results.append(budget.acquire(1, stop)))
    results = []
    waiter.start()
    time.sleep(0.3)
    assert results == []
    budget.release(9)
    waiter.join(2)
    assert results == [True]


def _set_event():
    import threading

    event = threading.Event()
    event.set()
    return event


def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        _save(document_image(280, 360, seed=index), folder / f"page-{index}.png")
    return folder


class CountingReader(bulk.DocumentReader):
    """The bulk run's reader, counting the documents it has read (`enough` is set at `wanted`)."""

    wanted = 0

    def __init__(self, *arguments, **options):
        import threading

        super().__init__(*arguments, **options)
        self.read_count, self.enough = 0, threading.Event()

    def read(self, *arguments):
        pages = super().read(*arguments)
        self.read_count += 1
        if self.read_count >= self.wanted:
            self.enough.set()
        return pages


def test_documents_are_read_ahead_while_the_engine_loads(engine, settings, monkeypatch, tmp_path):
    corpus = _images(tmp_path / "in", 6)
    readers = []
    monkeypatch.setattr(CountingReader, "wanted", 6)
    monkeypatch.setattr(bulk, "DocumentReader", lambda: readers.append(CountingReader()) or readers[-1])
    read_before_ready = []

    def load_engine():
        # the load lasts until every document is read (or 60 s): a reader that waited for it would have read one
        readers[0].enough.wait(60)
        read_before_ready.append(readers[0].read_count)
        return engine.engine

    out = OutputFolder(tmp_path / "out")
    run = bulk.LocalRun(load_engine, list_sources(str(corpus)), out, out.open(), Options(**TASK), settings,
                        {"options": "test"}, bulk.Progress(6, lambda _: None, bar=False), readers=1,
                        pages_in_flight=None)
    summary = run.run()
    out.close()
    assert read_before_ready == [6]  # all six, within the budget before the load (twice the rows setting)
    assert run.budget.limit == 2 * settings.max_rows and run.budget.used == 0
    assert summary.ok == 6 and summary.pages == 6 and not summary.interrupted
    assert 0 < summary.work_seconds < summary.seconds  # counted from the engine ready, after the reading
    assert sorted(e["status"] for e in manifest_lines(out.root)) == [OK] * 6
    engine.take()


def test_a_run_abandoned_while_its_engine_loads_ends_at_once_with_nothing_committed(engine, settings,
                                                                                    monkeypatch, tmp_path):
    import threading

    corpus = _images(tmp_path / "in", 3)
    readers = []
    monkeypatch.setattr(CountingReader, "wanted", 3)
    monkeypatch.setattr(bulk, "DocumentReader", lambda: readers.append(CountingReader()) or readers[-1])
    release = threading.Event()

    def load_engine():
        release.wait(60)  # a load that outlasts the run
        return engine.engine

    out = OutputFolder(tmp_path / "out")
    run = bulk.LocalRun(load_engine, list_sources(str(corpus)), out, out.open(), Options(**TASK), settings,
                        {"options": "test"}, bulk.Progress(3, lambda _: None, bar=False), readers=2,
                        pages_in_flight=None)
    result = []
    runner = threading.Thread(target=lambda: result.append(run.run()))
    runner.start()
    assert readers and readers[0].enough.wait(30)
    deadline = time.monotonic() + 10
    while run.in_flight() < 3 and time.monotonic() < deadline:  # the last one is counted after it is read
        time.sleep(0.01)
    assert run.in_flight() == 3  # read, waiting for the engine
    run.abandon()
    runner.join(5)
    try:
        assert not runner.is_alive()  # not held by the load
        assert result[0].interrupted and result[0].ok == 0 and run.budget.used == 0
        assert manifest_lines(out.root) == []
    finally:
        release.set()
        out.close()
    assert engine.calls == []  # the load ended later: none of the three reached the engine


def test_the_command_refuses_bad_options_before_loading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        bulk.main([str(tmp_path), str(tmp_path / "out"), "--max-new-tokens", "8193"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        bulk.main([str(tmp_path), str(tmp_path / "out"), "--resolution-size", "Huge"])
    code = bulk.main([str(tmp_path), str(tmp_path / "out"), "--task-type", "Locate Object by Reference"])
    assert code == bulk.EXIT_USAGE and "reference_text is required" in capsys.readouterr().err
    assert bulk.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == bulk.EXIT_USAGE
    assert not (tmp_path / "out").exists()


def test_figures_and_annotated_pages_are_files_beside_the_json_with_relative_paths(tmp_path):
    image = Image.new("RGB", (400, 300), "white")
    raw = "<|ref|>title<|/ref|><|det|>[[0, 0, 999, 99]]<|/det|>\n# Title\n<|ref|>image<|/ref|><|det|>[[100, 200, 600, 900]]<|/det|>"
    result = PageResult(text=raw, token_ids=[5] * 7, prompt_tokens=80, image_tokens=73, finished=True,
                        stop_reason="eos", first_token_s=0.1, seconds=0.5)
    merged = assemble_document([Page(image, 1)], [result], Options(), tmp_path / FILES_FOLDER)
    write_document(merged, tmp_path, "output.json", "output.md")
    output = json.loads((tmp_path / "output.json").read_text())
    assert output["figures"] == ["images/0.jpg"] and output["annotated_images"] == ["images/page_1_boxes.jpg"]
    markdown = (tmp_path / "output.md").read_text()
    assert "![](images/0.jpg)" in markdown and (tmp_path / "images/0.jpg").is_file()
    assert Image.open(io.BytesIO((tmp_path / output["annotated_images"][0]).read_bytes())).size == (400, 300)
    assert [b["figure"] for b in output["blocks"]] == [None, "images/0.jpg"]


def test_the_files_folder_is_where_the_markdown_links_figures():
    from checkpoints.grounding import FIGURE_PREFIX

    assert FIGURE_PREFIX == FILES_FOLDER + "/"


TINY_REFUSED = ("resolution_size 'Tiny' has no equivalent in DeepSeek-OCR 2, the model this service runs; "
                "choose one of Gundam (Recommended), Small, Base")


def test_a_preset_the_served_model_lacks_stops_the_command_before_any_document(tiny_ocr2_checkpoint, tmp_path,
                                                                               monkeypatch, capsys):
    corpus = tmp_path / "in"
    corpus.mkdir()
    _save(document_image(300, 400), corpus / "page.png")
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DEEPSEEK_OCR_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("DEEPSEEK_OCR_MODEL", raising=False)

    def never(*args, **kwargs):
        raise AssertionError("the check comes before documents are listed and before any engine or Ray starts")

    for name in ("list_sources", "load_engine", "run_with_ray"):
        monkeypatch.setattr(bulk, name, never)
    out = tmp_path / "out"
    # A folder of DeepSeek-OCR 2 weights, here and with --ray (the driver reads the folder's config.json).
    for extra in ([], ["--ray"]):
        code = bulk.main([str(corpus), str(out), "--weights-dir", str(tiny_ocr2_checkpoint), "--resolution-size",
                          "Tiny", *extra])
        assert code == bulk.EXIT_USAGE
        assert f"bulk: {TINY_REFUSED}\n" == capsys.readouterr().err
    # The official weights DEEPSEEK_OCR_MODEL chooses: their model is known without downloading them.
    monkeypatch.setenv("DEEPSEEK_OCR_MODEL", "deepseek-ocr-2")
    assert bulk.main([str(corpus), str(out), "--resolution-size", "Large"]) == bulk.EXIT_USAGE
    assert "resolution_size 'Large' has no equivalent in DeepSeek-OCR 2" in capsys.readouterr().err
    assert not out.exists()


def test_the_preset_check_passes_what_the_served_model_has(tiny_checkpoint, tiny_ocr2_checkpoint, tmp_path):
    from ocr_service.presets import RESOLUTIONS

    def settings_with(weights_dir) -> Settings:
        return Settings.from_env({**ENVIRONMENT, "DEEPSEEK_OCR_WEIGHTS_DIR": str(weights_dir)})

    for choice in ("Gundam (Recommended)", "Small", "Base"):
        bulk.check_preset_applies(Options(resolution_size=choice), settings_with(tiny_ocr2_checkpoint))
    for choice in RESOLUTIONS:
        bulk.check_preset_applies(Options(resolution_size=choice), settings_with(tiny_checkpoint))
        bulk.check_preset_applies(Options(resolution_size=choice), Settings.from_env(ENVIRONMENT))
    with pytest.raises(InputError, match="'Tiny' has no equivalent in DeepSeek-OCR 2"):
        bulk.check_preset_applies(Options(resolution_size="Tiny"),
                                  Settings.from_env({**ENVIRONMENT, "DEEPSEEK_OCR_MODEL": "deepseek-ocr-2"}))
    # A folder whose config.json cannot be read here (with --ray it may be on the engines' nodes only): the
    # engines decide.
    elsewhere = settings_with(tmp_path / "on-the-workers")
    assert bulk.served_model(elsewhere) is None
    bulk.check_preset_applies(Options(resolution_size="Tiny"), elsewhere)


def test_an_engine_without_the_preset_stops_the_run_instead_of_refusing_every_document(tiny_ocr2_checkpoint,
                                                                                       settings, monkeypatch,
                                                                                       tmp_path):
    corpus = tmp_path / "in"
    corpus.mkdir()
    for index in range(3):
        _save(document_image(300, 400, seed=index), corpus / f"page-{index}.png")
    engine = OCREngine(tiny_ocr2_checkpoint, settings, log=lambda _: None)
    monkeypatch.setattr(bulk, "served_model", lambda settings: None)  # as when only the engines can read the folder
    out = tmp_path / "out"
    code = run_in_process(monkeypatch, SubmitSpy(engine), corpus, out)  # ARGUMENTS choose Tiny
    assert code == bulk.EXIT_USAGE
    assert f"the engine could not start: {TINY_REFUSED}" in (out / "bulk.log").read_text(encoding="utf-8")
    assert manifest_lines(out) == []


def test_a_ray_engine_without_the_preset_stops_the_pipeline(tiny_ocr2_checkpoint, monkeypatch, tmp_path):
    ray = pytest.importorskip("ray")
    corpus = tmp_path / "in"
    corpus.mkdir()
    for index in range(2):
        _save(document_image(300, 400, seed=index), corpus / f"page-{index}.png")
    monkeypatch.setattr(bulk, "served_model", lambda settings: None)  # the driver cannot tell: the engines do
    out = tmp_path / "out"
    code = run_in_local_ray(ray, monkeypatch, corpus, out, tiny_ocr2_checkpoint)
    assert code == bulk.EXIT_USAGE
    log = (out / "bulk.log").read_text(encoding="utf-8")
    assert "the Ray pipeline failed" in log and TINY_REFUSED in log
    assert manifest_lines(out) == []
