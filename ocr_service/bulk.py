"""OCR a whole archive: `python -m ocr_service.bulk INPUT OUTPUT [options]`.

Every document of INPUT (a folder, searched recursively; a glob; a text file listing paths or URLs; an
fsspec URL such as s3://bucket/prefix/) goes through the predictor's steps (`pipeline.py`) with the same
options, and OUTPUT gets, per document, the predictor's JSON, its markdown and its files, plus a manifest
(`bulk_io.py` describes the folder and why a kill leaves nothing half-written). A rerun skips what is done.

On one machine one `OCREngine` serves every document: reader threads hash and render documents ahead, and
each rendered document is submitted at once, so that the pages of many documents decode together; the
pages held at once (rendered, queued, decoding) are bounded. With `--ray` the same work runs as a Ray Data
pipeline over every GPU of a cluster (`bulk_ray.py`).

SIGTERM or Ctrl-C: no new document starts; those in flight finish within `--grace` seconds, then the rest
are abandoned (a second signal abandons them at once). What was not committed is redone by the next run.
"""

import argparse
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .bulk_io import (
    DOCUMENT_JSON, DOCUMENT_MARKDOWN, FAILED, LOG, OK, REFUSED, BulkError, OutputFolder, PageBudget, fetched,
    fingerprint, list_sources, record,
)
from .bulk_render import DocumentReader, RendererCrashed
from .errors import InputError
from .presets import DEFAULT_RESOLUTION, DEFAULT_TASK_TYPE, RESOLUTIONS, TASK_TYPES
from .settings import CARD_ROWS, Settings, SettingsError

REPOSITORY = Path(__file__).resolve().parent.parent
EXIT_FAILED, EXIT_USAGE = 1, 2


@dataclass
class Summary:
    """What a run did, and the state of every listed document at its end."""

    listed: int = 0
    ok: int = 0  # this run
    refused: int = 0
    failed: int = 0
    skipped: int = 0  # finished by an earlier run
    skipped_unsuccessful: int = 0  # of those, refused earlier
    pages: int = 0
    tokens: int = 0
    seconds: float = 0.0  # from the first document read to the last committed
    work_seconds: Optional[float] = None  # from when an engine first had a document to the last committed
    interrupted: bool = False
    extra: dict = field(default_factory=dict)  # what a runner adds (Ray: the engines' start times)

    @property
    def unsuccessful(self) -> int:
        return self.refused + self.failed + self.skipped_unsuccessful

    def count_skipped(self, previous_status: str) -> None:
        self.skipped += 1
        self.skipped_unsuccessful += previous_status != OK

    def count_finished(self, entry: dict) -> Optional[str]:
        """Adds a document this run finished (its manifest entry); returns the line to log if it did not succeed."""
        status = entry["status"]
        self.ok += status == OK
        self.refused += status == REFUSED
        self.failed += status == FAILED
        self.pages += entry["pages"] if status == OK else 0
        self.tokens += entry["tokens"]
        return None if status == OK else f"{status}: {entry['document']}: {entry['error']}"

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        done = self.ok + self.refused + self.failed + self.skipped
        text = (f"{done}/{self.listed} documents: {self.ok} done now, {self.skipped} done before"
                f"{f' ({self.skipped_unsuccessful} of them refused)' if self.skipped_unsuccessful else ''}, "
                f"{self.refused} refused, {self.failed} failed; {self.pages} pages, {self.tokens} tokens in "
                f"{self.seconds:.1f} s ({self.pages_per_second:.2f} pages/s"
                f"{f'; {self.pages / self.work_seconds:.2f} once the model was loaded' if self.work_seconds else ''})")
        if self.interrupted:
            text += f"; interrupted: {self.listed - done} left for the next run"
        return text


# ---------------------------------------------------------------- progress


class Progress:
    """A bar on a terminal (documents, pages, pages/s, time left); elsewhere a line every `every` seconds.
    Failures are always logged as they happen.

    The rate and the time left count from when an engine first had a document (`work_started`), not from the
    start: a run loads its model first (a minute or two), and counted in, the load made the first estimates
    many times too long (a Ray run of 64 documents said "1 h 16 min left" with 15 s to go)."""

    def __init__(self, total: int, log: Callable[[str], None], bar: bool, every: float = 30.0):
        self.total, self.log, self.every = total, log, every
        self.summary: Optional[Summary] = None
        self._started = time.monotonic()
        self._last_line = self._started
        self._created_at = time.time()
        self._work_started_at: Optional[float] = None  # time.time() when an engine first had a document
        self._lock = threading.Lock()
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="doc", dynamic_ncols=True, smoothing=0.1,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} documents{postfix}")

    def update(self, summary: Summary, message: Optional[str] = None) -> None:
        with self._lock:
            self.summary = summary
            if message is not None:
                (self._bar.write if self._bar is not None else self.log)(message)
            now = time.monotonic()
            if self._bar is not None:
                self._bar.n = self._done(summary)
                self._bar.set_postfix_str(self._status(summary), refresh=True)
            elif now - self._last_line >= self.every:
                self._last_line = now
                self.log(f"{self._done(summary)}/{self.total} documents, {self._status(summary)}")

    def work_started(self, at: Optional[float] = None) -> None:
        """An engine has its first document since `at` (time.time(), now by default; the earliest of several
        engines' counts). Another node's clock may be off: `at` counts within this run's start and now."""
        now = time.time()
        at = min(max(now if at is None else at, self._created_at), now)
        with self._lock:
            if self._work_started_at is None or at < self._work_started_at:
                self._work_started_at = at

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    @staticmethod
    def _done(summary: Summary) -> int:
        return summary.ok + summary.refused + summary.failed + summary.skipped

    def _status(self, summary: Summary) -> str:
        elapsed = time.time() - (self._work_started_at or self._created_at)
        worked = summary.ok + summary.refused + summary.failed
        rate = summary.pages / elapsed if elapsed > 0 else 0.0
        left = self.total - self._done(summary)
        failed = summary.refused + summary.failed
        text = f"{summary.pages} pages, {rate:.2f} pages/s, {failed} failed"
        if left:
            text += f", {_duration(elapsed / worked * left)} left" if worked else ", time left unknown"
        return text

    def tick(self) -> None:
        """Refresh the bar's rate and time left between documents."""
        if self._bar is not None and self.summary is not None:
            self.update(self.summary)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


# ---------------------------------------------------------------- one engine in this process


class LocalRun:
    """Reader threads read, hash and render documents and submit them to the engine; one thread per
    document in flight waits for its pages, assembles the result and commits it.

    The engine loads on a thread of its own, started by the first document that needs it, and the readers read
    on meanwhile, within the pages' budget: when it is ready it gets every document read so far at once, as the
    engine's own job gets its pages. (A reader that waited for the load held one document: on the H200 the run
    then started with four documents, 32 pages, and ran at 0.946 of the job from its engine ready against ~1.0
    with its PDFs rendered beforehand; benchmarks/results/h200-2026-11-30h.)"""

    def __init__(self, load_engine: Callable, sources: list, folder: OutputFolder, previous: dict, options,
                 settings: Settings, run_options: dict, progress: Progress, readers: int,
                 pages_in_flight: Optional[int], retry_refused: bool = False):
        """`load_engine()` gives the engine; it is called when the first document needs it (a rerun that
        finds everything done never loads the model)."""
        self._load_engine, self.sources, self.folder, self.previous = load_engine, sources, folder, previous
        self.options, self.settings, self.run_options = options, settings, run_options
        self.progress, self.readers, self.retry_refused = progress, max(1, readers), retry_refused
        self._engine = None
        self._engine_error: Optional[BulkError] = None
        self._engine_lock = threading.Lock()  # the engine, its error, the loader and the documents waiting for it
        self._loader: Optional[threading.Thread] = None
        self._loaded_at: Optional[float] = None  # time.monotonic() when the engine was ready
        self._waiting: list = []  # documents read while the engine loads: (source, hash, size, pages)
        self._pages_in_flight = pages_in_flight  # None: twice the engine's rows once it is loaded (`_load`)
        # Until then, twice the rows of the rows setting or of a smaller card: pages read ahead while it loads.
        self.budget = PageBudget(pages_in_flight or 2 * (settings.max_rows or CARD_ROWS))
        self.summary = Summary(listed=len(sources))
        self.stopping = threading.Event()  # no new document
        self.abandoning = threading.Event()  # documents in flight leave the engine
        self._lock = threading.Lock()
        self._pending = iter(sources)
        self._jobs: set = set()
        self._started = time.monotonic()
        self._changed = threading.Event()  # a document left the engine or a reader stopped
        self._finishers: Optional[ThreadPoolExecutor] = None  # a thread per document in flight, made with the engine
        self.reader = DocumentReader()  # PDFs rendered by a process per reader thread

    def run(self, poll: Optional[Callable[[], None]] = None) -> Summary:
        """Until every document is done or dropped; `poll` is called at least every 0.2 s meanwhile (from this
        thread, where signal handlers run)."""
        threads = [threading.Thread(target=self._read_loop, name=f"bulk-read-{i}", daemon=True)
                   for i in range(self.readers)]
        for thread in threads:
            thread.start()
        try:
            while True:
                self._changed.clear()
                if not (any(thread.is_alive() for thread in threads) or self.in_flight() or self._loading()):
                    break
                self._changed.wait(0.2)  # woken at once when the last document is done: the run's time is exact
                if poll is not None:
                    poll()
        finally:
            self.reader.close()
        if self._finishers is not None:
            self._finishers.shutdown(wait=True)
        if self._engine_error is not None:
            raise self._engine_error
        ended = time.monotonic()
        self.summary.seconds = ended - self._started
        if self._loaded_at is not None:
            self.summary.work_seconds = ended - self._loaded_at
        self.summary.interrupted = self.stopping.is_set() and self._finished() < self.summary.listed
        return self.summary

    def stop(self) -> None:
        """No new document; those in flight go on."""
        self.stopping.set()

    def abandon(self) -> None:
        """Documents in flight leave the engine uncommitted (the next run redoes them)."""
        self.stopping.set()
        self.abandoning.set()
        with self._engine_lock:  # those read while the engine loads never reach it
            waiting, self._waiting = self._waiting, []
        for document in waiting:
            self.budget.release(len(document[3]))
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        self._changed.set()

    def engine(self):
        """The loaded engine (documents reach `_finish` only once it is)."""
        return self._engine

    def _submit(self, source, content_hash: str, size: int, pages: list) -> None:
        """A read document, its pages counted in the budget, to the engine: now if it is loaded, else when it is
        (the first document starts the load). BulkError if it could not start."""
        with self._engine_lock:
            if self._engine_error is not None:
                self.budget.release(len(pages))
                raise self._engine_error
            if self._engine is None:
                self._waiting.append((source, content_hash, size, pages))
                if self._loader is None:
                    self._loader = threading.Thread(target=self._load, name="bulk-engine-load", daemon=True)
                    self._loader.start()
                return
        self._start_job(source, content_hash, size, pages)

    def _load(self) -> None:
        try:
            engine = self._load_engine()
            self.prompt, _ = self.options.prompt_and_preset(engine.special_token_texts)
            # the served model's own geometry, or its refusal of the preset for the whole run
            self.preset = engine.resolution(self.options.resolution_size)
        except Exception as error:  # no document can run: the run stops, and what was read waits for the next
            with self._engine_lock:
                self._engine_error = BulkError(f"the engine could not start: {error}")
                waiting, self._waiting = self._waiting, []
            self.stopping.set()
            for document in waiting:
                self.budget.release(len(document[3]))
            self._changed.set()
            return
        if self._pages_in_flight is None:  # the default: twice the rows this engine decodes at once
            self.budget.resize(2 * getattr(engine.server, "max_rows", 1))
        # a thread per document in flight (the budget's pages bound them; a document has at least one)
        self._finishers = ThreadPoolExecutor(max_workers=max(self.budget.limit, self.budget.used),
                                             thread_name_prefix="bulk-finish")
        self.progress.work_started()
        self._loaded_at = time.monotonic()
        with self._engine_lock:
            self._engine = engine
            waiting, self._waiting = self._waiting, []
        for document in waiting:
            self._start_job(*document)
        self._changed.set()

    def _loading(self) -> bool:
        """Whether the engine's load (and the start of the documents read meanwhile) is still to end; an
        abandoned run does not wait for it."""
        loader = self._loader
        return loader is not None and loader.is_alive() and not self.abandoning.is_set()

    def in_flight(self) -> int:
        """Documents submitted and not yet committed, those waiting for the engine's load among them."""
        with self._engine_lock:
            waiting = len(self._waiting)
        with self._lock:
            return len(self._jobs) + waiting

    def _finished(self) -> int:
        s = self.summary
        return s.ok + s.refused + s.failed + s.skipped

    def _count(self, entry: Optional[dict] = None, skipped: Optional[dict] = None) -> None:
        message = None
        with self._lock:
            s = self.summary
            if skipped is not None:
                s.count_skipped(skipped.get("status"))
            elif entry is not None:
                message = s.count_finished(entry)
            snapshot = Summary(**{k: getattr(s, k) for k in Summary.__dataclass_fields__})
        self.progress.update(snapshot, message)

    def _read_loop(self) -> None:
        try:
            try:
                self.reader.start_worker()  # now rather than at its first PDF
            except RuntimeError:
                pass  # it cannot start: each PDF this thread reads fails with the reason, and the run goes on
            self._read_documents()
        finally:
            self.reader.stop_worker()
            self._changed.set()

    def _read_documents(self) -> None:
        while not self.stopping.is_set():
            with self._lock:
                source = next(self._pending, None)
            if source is None:
                return
            try:
                self._read(source)
            except BulkError:
                return
            except Exception as error:  # a bug of ours must not stop the other documents
                self._commit_failure(source, None, None, FAILED, f"unexpected error: {error!r}")

    def _read(self, source) -> None:
        try:
            with fetched(source.location) as document:
                previous = self.previous.get(source.name)
                if self.folder.is_done(previous, document.content_hash, self.run_options, self.retry_refused):
                    self._count(skipped=previous)
                    return
                content_hash, size = document.content_hash, document.size
                try:
                    pages = self.reader.read(document.path, self.options, self.settings.limits)
                except InputError as error:
                    self._commit_failure(source, content_hash, size, REFUSED, str(error))
                    return
                except RendererCrashed as error:
                    self._commit_failure(source, content_hash, size, FAILED, str(error))
                    return
        except OSError as error:
            self._commit_failure(source, None, None, FAILED,
                                 f"the input file could not be read: {error.strerror or error}")
            return
        if not self.budget.acquire(len(pages), self.stopping):
            return  # stopping: this document waits for the next run
        self._submit(source, content_hash, size, pages)

    def _start_job(self, source, content_hash: str, size: int, pages: list) -> None:
        from .pipeline import submit_document

        if self.abandoning.is_set():
            self.budget.release(len(pages))
            return
        try:
            job = submit_document(self._engine, pages, self.prompt, self.preset, self.options, background=True)
        except InputError as error:
            self.budget.release(len(pages))
            self._commit_failure(source, content_hash, size, REFUSED, str(error), pages=len(pages))
            return
        with self._lock:
            self._jobs.add(job)
            # seconds from the start to the first document in the engine (what reading and rendering delay)
            self.summary.extra.setdefault("first_submitted_s", time.monotonic() - self._started)
        if self.abandoning.is_set():
            job.cancel()
        self._finishers.submit(self._finish, source, content_hash, size, pages, job)

    def _finish(self, source, content_hash: str, size: int, pages: list, job) -> None:
        from .engine import JobCancelled
        from .pipeline import FILES_FOLDER, assemble_document, wait_for, write_document

        try:
            try:
                results = wait_for(job, self.settings.request_timeout_s)
                with self._lock:  # the last document's pages decoded; what follows is writing it
                    self.summary.extra["last_decoded_s"] = time.monotonic() - self._started
            except JobCancelled:
                return  # abandoned: not committed
            except InputError as error:
                self._commit_failure(source, content_hash, size, REFUSED, str(error), pages=len(pages))
                return
            except Exception as error:
                self._commit_failure(source, content_hash, size, FAILED, str(error) or repr(error), pages=len(pages))
                return
            staged = self.folder.new_staging_folder()
            merged = assemble_document(pages, results, self.options, staged / FILES_FOLDER,
                                       self.engine().special_token_texts)
            write_document(merged, staged, DOCUMENT_JSON, DOCUMENT_MARKDOWN)
            entry = record(source, OK, content_hash, size, self.run_options, pages=len(pages),
                           tokens=sum(len(r.token_ids) for r in results),
                           seconds=max(r.seconds for r in results),
                           stop_reasons=[r.stop_reason for r in results])
            self.folder.commit(entry, staged)
            self._count(entry)
        except Exception as error:
            self._commit_failure(source, content_hash, size, FAILED, f"unexpected error: {error!r}", pages=len(pages))
        finally:
            self.budget.release(len(pages))
            with self._lock:
                self._jobs.discard(job)
            self._changed.set()

    def _commit_failure(self, source, content_hash, size, status: str, error: str, pages: int = 0) -> None:
        entry = record(source, status, content_hash, size, self.run_options, pages=pages, error=error)
        self.folder.commit(entry, None)
        self._count(entry)


def weights_folder(settings: Settings, log: Callable[[str], None]) -> Path:
    """The weights setup() would use: DEEPSEEK_OCR_MODEL's official weights (downloaded if missing), or the
    DEEPSEEK_OCR_WEIGHTS_DIR folder."""
    from .engine import checkpoint_tensor_shapes
    from .weights import ensure_model_weights

    return ensure_model_weights(REPOSITORY, settings.model, expected_tensors=checkpoint_tensor_shapes, log=log,
                                **settings.weights_source)


def served_model(settings: Settings):
    """The model (weights.OfficialWeights) the run's engines will serve, known before any of them starts: the
    one the weights folder's config.json names, else DEEPSEEK_OCR_MODEL's (setup() installs only that model's
    official weights, verified to be its). None when the folder's config cannot be read here: with --ray it
    may exist on the engines' nodes only, and an engine that cannot read it fails to start with its own message."""
    from .weights import OFFICIAL_WEIGHTS, WeightsError, model_in

    if not settings.weights_dir:
        return OFFICIAL_WEIGHTS[settings.model]
    try:
        return model_in(Path(settings.weights_dir))
    except WeightsError:
        return None


def check_preset_applies(options, settings: Settings) -> None:
    """InputError (the predictor's: it names resolution_size and the choices that apply) when the model the run
    will serve has no equivalent of the chosen preset: every document would be refused for it."""
    model = served_model(settings)
    if model is None:
        return
    import checkpoints

    from .presets import model_presets, resolution

    presets = model_presets(getattr(checkpoints, model.architecture).processing)
    resolution(options.resolution_size, presets, model.title)


def load_engine(settings: Settings, log: Callable[[str], None], ignore_eos: bool = False,
                resolutions: Optional[list] = None):
    """The run's engine; `resolutions`: the run's resolution_size, whose view sizes alone it compiles at load
    (`OCREngine`)."""
    from .engine import OCREngine

    return OCREngine(weights_folder(settings, log), settings, log=log, ignore_eos=ignore_eos, resolutions=resolutions)


# ---------------------------------------------------------------- the command


def parser() -> argparse.ArgumentParser:
    from .engine import MAX_NEW_TOKENS

    command = argparse.ArgumentParser(
        prog="python -m ocr_service.bulk", description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 when every document is done, 1 when any was refused or failed (see the manifest), "
               "2 when the run cannot start (options, input, output folder, weights), 128+N when stopped by "
               "signal N (rerun to finish).")
    command.add_argument("input", help="a folder (searched recursively), a glob, a .txt/.lst file listing paths or "
                                       "URLs, or an fsspec URL (s3://bucket/prefix/, gs://..., file://...)")
    command.add_argument("output", type=Path, help="the output folder (created; a rerun resumes in it)")
    task = command.add_argument_group("the predictor's options, for every document")
    task.add_argument("--task-type", choices=TASK_TYPES, default=DEFAULT_TASK_TYPE)
    task.add_argument("--reference-text", default="", help="what to locate, for 'Locate Object by Reference'")
    task.add_argument("--resolution-size", choices=RESOLUTIONS, default=DEFAULT_RESOLUTION)
    task.add_argument("--pages", default="", help="pages of each PDF or multi-page TIFF, e.g. '1-3,5'; empty = all")
    task.add_argument("--max-new-tokens", type=_bounded(1, MAX_NEW_TOKENS), default=MAX_NEW_TOKENS,
                      help=f"most tokens per page, 1 to {MAX_NEW_TOKENS} (default {MAX_NEW_TOKENS})")
    run = command.add_argument_group("the run")
    run.add_argument("--weights-dir", help="a folder holding the weights (else DEEPSEEK_OCR_WEIGHTS_DIR, else "
                                           "checkpoints/, downloaded if needed)")
    run.add_argument("--pages-in-flight", type=_bounded(1, 10**6), default=None,
                     help="pages held at once, rendered or in the engine (default: twice the engine's decode rows, "
                          "DEEPSEEK_OCR_MAX_ROWS)")
    run.add_argument("--readers", type=_bounded(1, 256), default=min(4, os.cpu_count() or 1),
                     help="threads reading documents ahead (PDFs are rendered by as many processes: PDFium "
                          "renders one page at a time in a process)")
    run.add_argument("--retry-refused", action="store_true",
                     help="try again the documents an earlier run refused (damaged, over a limit)")
    run.add_argument("--grace", type=float, default=60.0,
                     help="seconds the documents in flight get to finish after SIGTERM/Ctrl-C (default 60)")
    run.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines off a terminal")
    run.add_argument("--no-progress-bar", action="store_true", help="log lines even on a terminal")
    run.add_argument("--verbose", action="store_true", help="the engine's own log on stderr too (always in bulk.log)")
    ray = command.add_argument_group("many GPUs: Ray Data (pip install 'ray[data]==2.60.0')")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Data pipeline, one engine per GPU")
    ray.add_argument("--ray-address", default=None,
                     help="the cluster to join ('auto', ray://host:10001); default: a local Ray on this machine")
    ray.add_argument("--ray-engines", type=_bounded(1, 4096), default=None,
                     help="engines (one per GPU; default: every GPU of the cluster, or 1 on the CPU without GPUs)")
    ray.add_argument("--ray-documents-per-engine", type=_bounded(1, 4096), default=64,
                     help="documents each engine holds at once (default 64)")
    ray.add_argument("--ray-engine-cpus", type=_bounded(1, 4096), default=None,
                     help="CPUs each engine reserves for its own threads (default: its GPU's share of the "
                          "cluster's CPUs less 2, from 2 to 14); the others read and render documents")
    command.add_argument("--ignore-eos", action="store_true", help=argparse.SUPPRESS)  # benchmarks: full pages
    return command


def _bounded(low: int, high: int):
    def parse(text: str) -> int:
        if not text.strip().isascii() or not text.strip().isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {high}")
        return int(text)
    return parse


class Logger:
    """Lines on stderr and in OUTPUT/bulk.log; the engine's lines only in the file unless --verbose."""

    def __init__(self, path: Optional[Path], verbose: bool):
        self.verbose = verbose
        self._file = open(path, "a", encoding="utf-8", buffering=1) if path is not None else None
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        self._write(line, show=True)

    def engine(self, line: str) -> None:
        self._write(line, show=self.verbose)

    def _write(self, line: str, show: bool) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        with self._lock:
            if self._file is not None:
                self._file.write(stamped + "\n")
            if show:
                print(f"bulk: {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Interrupted(BaseException):
    """A signal, raised where the main thread is (Ray mode), so that Ray's own waits end at once."""


class Signals:
    """The first SIGTERM/SIGINT stops new work and starts the grace period; the second abandons. With
    `interrupt()`, a signal raises Interrupted in the main thread instead."""

    def __init__(self):
        self.count = 0
        self.number: Optional[int] = None
        self.first_at: Optional[float] = None
        self._raise = False
        self._previous = {}

    def __enter__(self):
        self.install()
        return self

    def install(self) -> None:
        """(Again:) ray.init() installs a SIGTERM handler of its own."""
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                previous = signal.signal(number, self._handle)
                self._previous.setdefault(number, previous)

    def interrupt(self) -> None:
        self._raise = True
        self.install()

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame) -> None:
        self.count += 1
        self.number = self.number or number
        self.first_at = self.first_at or time.monotonic()
        if self._raise:
            self._raise = False  # once: the clean-up after it is not interrupted again
            raise Interrupted()


def main(argv: Optional[list] = None) -> int:
    return run_command(parser().parse_args(argv))[0]


def run_command(args: argparse.Namespace) -> tuple:
    """(exit status, Summary or None when the run could not start)."""
    from .pipeline import Options

    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"bulk: {error}", file=sys.stderr)
        return EXIT_USAGE, None
    if args.weights_dir:
        settings = settings.replace(weights_dir=args.weights_dir)
    options = Options(task_type=args.task_type, resolution_size=args.resolution_size, pages=args.pages,
                      max_new_tokens=args.max_new_tokens, reference_text=args.reference_text)
    folder = OutputFolder(args.output)
    try:
        options.prompt_and_preset()
        check_preset_applies(options, settings)
        sources = list_sources(args.input, exclude=folder.root)
        previous = folder.open()
    except (InputError, BulkError, OSError) as error:
        print(f"bulk: {error}", file=sys.stderr)
        return EXIT_USAGE, None
    log = Logger(folder.root / LOG, args.verbose)
    try:
        run_options = fingerprint(options, settings, args.ignore_eos)
        log(f"{len(sources)} document(s) in {args.input}; output in {folder.root}")
        progress = Progress(len(sources), log, bar=sys.stderr.isatty() and not args.no_progress_bar,
                            every=args.log_every)
        with Signals() as signals:
            run = run_with_ray if args.ray else run_here
            try:
                summary = run(args, sources, folder, previous, options, settings, run_options, progress, log,
                              signals)
            finally:
                progress.close()
        log(summary.line())
        log(f"manifest: {folder.manifest}")
    except (BulkError, InputError) as error:
        log(f"{error}")
        return EXIT_USAGE, None
    finally:
        folder.close()
        log.close()
    if summary.interrupted:
        return 128 + (signals.number or signal.SIGTERM), summary
    return (EXIT_FAILED if summary.unsuccessful else 0), summary


def run_with_ray(*arguments) -> Summary:
    from .bulk_ray import run_with_ray as run

    return run(*arguments)


def run_here(args, sources, folder, previous, options, settings, run_options, progress, log, signals) -> Summary:
    pages_in_flight = args.pages_in_flight  # None: twice the engine's rows, once it is loaded
    def engine():  # compiled for the run's resolution_size alone
        return load_engine(settings, log.engine, ignore_eos=args.ignore_eos, resolutions=[options.resolution_size])

    run = LocalRun(engine, sources, folder, previous, options, settings, run_options, progress, args.readers,
                   pages_in_flight, args.retry_refused)

    def poll() -> None:
        _react(run, signals, args.grace, log)
        progress.tick()

    return run.run(poll)


def _react(run: LocalRun, signals: Signals, grace: float, log) -> None:
    if not signals.count:
        return
    if not run.stopping.is_set():
        run.stop()
        log(f"stopping: no new document; {run.in_flight()} in flight get {grace:g} s to finish "
            "(signal again to abandon them)")
    if not run.abandoning.is_set() and (signals.count > 1 or time.monotonic() - signals.first_at > grace):
        log(f"abandoning {run.in_flight()} document(s) in flight: the next run redoes them")
        run.abandon()


if __name__ == "__main__":
    # Through the package's module, not this __main__ copy: bulk_ray must see the same classes.
    from ocr_service.bulk import main as package_main

    sys.exit(package_main())
