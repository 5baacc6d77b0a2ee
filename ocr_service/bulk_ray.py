"""The bulk command on a Ray cluster (`--ray`): a Ray Data pipeline, one `OCREngine` per GPU.

    documents (listed here) → read, hashed and rendered by Ray tasks on CPU workers
                            → an actor pool, one engine per GPU, many documents in flight in each
                              (threaded calls: their pages decode together)
                            → rows back to this process, which commits them into the output folder

Ray schedules everything across the cluster's nodes; nothing here assigns work to a machine. The results
come back to this process, which writes them with the same commit as a run without Ray, so the output
folder needs no shared filesystem and the layout, the manifest and resuming are the same. Every node
needs this repository at the same path (the image does) and the weights (each engine verifies them, or
downloads them once per node).

Ray is an optional install, imported only here.
"""

import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from .bulk_io import (
    DOCUMENT_JSON, DOCUMENT_MARKDOWN, FAILED, OK, REFUSED, BulkError, Source, fetched, read_files, record,
    write_files,
)
from .errors import InputError

REPOSITORY = Path(__file__).resolve().parent.parent
READ, SKIPPED = "read", "skipped"
# Memory a read task reserves for a rendered document (Ray then runs no more readers than memory allows).
READER_MEMORY = 512 * 2**20
# CPUs an engine reserves when the command is not told (--ray-engine-cpus): its GPU's share of the cluster's CPUs
# less READER_CPUS_PER_ENGINE for the readers, within these bounds. An engine at ~20 pages/s needs a core for its
# serving thread, one for its vision thread and its 12 preprocessing threads (an A4 page is ~120 ms of resizing
# and cutting on one core): the one-GPU engine's own settings on a host of 16 or more cores. Reserving 8 (half
# a GPU's share of a 32-core host, the earlier default) left it 6 preprocessing threads: on two H200s its vision
# passes held 4.6 pages against 10.7 in the one-GPU run, 27.7 ms a page against 20, and Ray ran at 1.55x one
# engine (benchmarks/results/h200-2026-11-30h, call 7), while the readers had rendered all 64 documents in
# 4.6 s, ~45 s before the engines were ready. Rendering an A4 page takes ~60 ms of a core (that run's read
# tasks): two cores read for an engine with room to spare.
ENGINE_CPUS_MIN, ENGINE_CPUS_MAX = 2, 14
READER_CPUS_PER_ENGINE = 2
ENGINE_START_TIMEOUT_S = 3600


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BulkError("--ray needs Ray Data, an optional install: pip install 'ray[data]==2.60.0'") from None
    return ray


# ---------------------------------------------------------------- on CPU workers


def read_pages(row: dict, options, limits) -> dict:
    """A document's bytes hashed, and unless an earlier run did it, its pages rendered (raw RGB)."""
    from .pipeline import read_document

    out = dict(document=row["document"], source=row["source"], status=READ, error=None, content_hash=None,
               bytes=None, page_numbers=[], page_sizes=[], page_pixels=[])
    try:
        with fetched(row["source"]) as document:
            out.update(content_hash=document.content_hash, bytes=document.size)
            if document.content_hash == row["done_hash"]:
                out["status"] = SKIPPED
                return out
            pages = read_document(document.path, options, limits)
    except InputError as error:
        out.update(status=REFUSED, error=str(error))
        return out
    except OSError as error:
        out.update(status=FAILED, error=f"the input file could not be read: {error.strerror or error}")
        return out
    out.update(page_numbers=[p.number for p in pages], page_sizes=[list(p.image.size) for p in pages],
               page_pixels=[p.image.tobytes() for p in pages])
    return out


# ---------------------------------------------------------------- on GPU workers


class OCRActor:
    """One engine; Ray calls it from several threads at once, one document per call.

    The engine loads on a thread of its own, started by the constructor: Ray Data hands documents out only
    once every engine of the pool is constructed, and a constructor that loaded the model would keep the
    readers idle for as long (tens of seconds). This way documents are read and rendered while the models
    load, and each engine finds its share waiting when it is ready."""

    def __init__(self, environment: dict, options, timeout: float, ignore_eos: bool):
        self.options, self.timeout = options, timeout
        self.engine = self.prompt = self.preset = self.ready_at = self.start_error = None
        self.first_document_at = None  # when the engine could first work on a document (benchmarks)
        self.started = threading.Event()
        threading.Thread(target=self._start, args=(environment, ignore_eos), name="bulk-engine-start",
                         daemon=True).start()

    def _start(self, environment: dict, ignore_eos: bool) -> None:
        try:
            from .bulk import weights_folder
            from .engine import OCREngine
            from .settings import Settings

            settings = Settings.from_env({**os.environ, **environment})
            weights_dir = _weights_on_this_node(settings, weights_folder)
            # compiled for the run's resolution_size alone (a shorter load: OCREngine's `resolutions`)
            self.engine = OCREngine(weights_dir, settings, log=_log, ignore_eos=ignore_eos,
                                    resolutions=[self.options.resolution_size])
            self.prompt, _ = self.options.prompt_and_preset(self.engine.special_token_texts)
            # the served model's own geometry; a preset it has no equivalent for stops the run, not each document
            self.preset = self.engine.resolution(self.options.resolution_size)
            self.ready_at = time.time()
        except BaseException as error:  # every call raises it: the pipeline, and with it the run, stops
            self.start_error = error
        finally:
            self.started.set()

    def __call__(self, row: dict) -> dict:
        from PIL import Image

        from .inputs import Page
        from .pipeline import FILES_FOLDER, assemble_document, submit_document, wait_for, write_document

        out = dict(document=row["document"], source=row["source"], status=row["status"], error=row["error"],
                   content_hash=row["content_hash"], bytes=row["bytes"], pages=len(row["page_numbers"]), tokens=0,
                   seconds=0.0, stop_reasons=[], files=[], engine_ready_at=None, first_document_at=None)
        if row["status"] != READ:
            return out
        self.started.wait()
        if self.start_error is not None:
            raise BulkError(f"the engine could not start: {self.start_error}") from self.start_error
        out["engine_ready_at"] = self.ready_at
        self.first_document_at = self.first_document_at or time.time()
        out["first_document_at"] = self.first_document_at
        pages = [Page(Image.frombytes("RGB", (int(size[0]), int(size[1])), pixels), int(number))
                 for number, size, pixels
                 in zip(row["page_numbers"], row["page_sizes"], row["page_pixels"])]
        try:
            job = submit_document(self.engine, pages, self.prompt, self.preset, self.options, background=True)
            results = wait_for(job, self.timeout)
        except InputError as error:
            out.update(status=REFUSED, error=str(error))
            return out
        except Exception as error:
            out.update(status=FAILED, error=str(error) or repr(error))
            return out
        with tempfile.TemporaryDirectory(prefix="bulk-ocr-") as folder:
            merged = assemble_document(pages, results, self.options, Path(folder) / FILES_FOLDER,
                                       self.engine.special_token_texts)
            write_document(merged, Path(folder), DOCUMENT_JSON, DOCUMENT_MARKDOWN)
            files = read_files(Path(folder))
        out.update(status=OK, tokens=sum(len(r.token_ids) for r in results), seconds=max(r.seconds for r in results),
                   stop_reasons=[r.stop_reason for r in results], files=files)
        return out


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _weights_on_this_node(settings, weights_folder) -> Path:
    """`weights_folder(settings, log)`: the engines of a node take turns only where the weights may be downloaded
    (one download per node). An operator's folder (DEEPSEEK_OCR_WEIGHTS_DIR, --weights-dir) is only read, and
    each engine verifies it at once: in turns, an engine waited for the others' checks (which build the model on
    the meta device) before its load began (on two H200s the second engine's load began 0.8 s after the first's,
    benchmarks/results/h200-2026-11-30i; not measured since)."""
    if settings.weights_dir:
        return weights_folder(settings, _log)
    with _node_lock(Path(tempfile.gettempdir()) / "deepseek-ocr-weights.lock"):
        return weights_folder(settings, _log)


class _node_lock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import fcntl

        self.handle = open(self.path, "a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        self.handle.close()


# ---------------------------------------------------------------- the driver


def run_with_ray(args, sources, folder, previous, options, settings, run_options, progress, log, signals):
    from .bulk import Summary

    ray = import_ray()
    from ray.data import ActorPoolStrategy, DataContext

    environment = {name: value for name, value in os.environ.items() if name.startswith(("DEEPSEEK_OCR_", "COG_"))}
    if args.weights_dir:
        environment["DEEPSEEK_OCR_WEIGHTS_DIR"] = str(Path(args.weights_dir).resolve())
    python_path = os.pathsep.join([str(REPOSITORY)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    runtime_env = {"env_vars": {**environment, "PYTHONPATH": python_path}}
    started_here = not ray.is_initialized()
    if not args.verbose:
        logging.getLogger("ray").setLevel(logging.WARNING)
    if started_here:
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=args.verbose,
                 logging_level=logging.INFO if args.verbose else logging.WARNING)
    summary = Summary(listed=len(sources))
    if not args.verbose:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-run lines; ours say the same
    try:
        context = DataContext.get_current()
        context.enable_progress_bars = False  # ours counts documents and pages
        # Documents go to the engine holding the fewest: an engine ready first would otherwise take the first
        # documents-per-engine documents alone. Starting can include downloading the weights.
        context.wait_for_min_actors_s = ENGINE_START_TIMEOUT_S
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        engines = args.ray_engines or gpus or 1
        if gpus and engines > gpus:
            raise BulkError(f"--ray-engines {engines}: the cluster has {gpus} GPU(s)")
        engine_cpus = args.ray_engine_cpus or default_engine_cpus(cpus, gpus, engines)
        if engines * engine_cpus >= cpus:  # Ray would start the engines and never the readers
            raise BulkError(f"{engines} engine(s) of {engine_cpus} CPU(s) each leave none of the cluster's {cpus} CPUs "
                            "to read documents: use fewer engines, a smaller --ray-engine-cpus or more CPUs")
        # The engine's preprocessing threads fit in what Ray reserved for it, not in the whole node.
        environment.setdefault("DEEPSEEK_OCR_CPUS", str(engine_cpus))
        log(f"Ray: {engines} engine(s) on {'GPUs' if gpus else 'CPUs'}, {engine_cpus} CPU(s) each, "
            f"{args.ray_documents_per_engine} documents in flight each; {cpus - engines * engine_cpus} CPU(s) "
            "for reading")
        items = [{"document": s.name, "source": s.location, "done_hash": _done_hash(folder, previous.get(s.name),
                                                                                    run_options, args.retry_refused)}
                 for s in sources]
        if not items:
            return summary
        calls = args.ray_documents_per_engine
        dataset = (
            # One document per block: a task, and the rows an engine fetches at once, hold one document.
            ray.data.from_items(items, override_num_blocks=len(items))
            .map(read_pages, fn_kwargs={"options": options, "limits": settings.limits}, num_cpus=1,
                 memory=READER_MEMORY, runtime_env=runtime_env)
            .map(OCRActor, fn_constructor_kwargs={"environment": environment, "options": options,
                                                  "timeout": settings.request_timeout_s,
                                                  "ignore_eos": args.ignore_eos},
                 compute=ActorPoolStrategy(size=engines, max_tasks_in_flight_per_actor=calls,
                                           max_concurrent_calls_per_actor=calls, enable_true_multi_threading=True),
                 num_gpus=1 if gpus else 0, num_cpus=engine_cpus, runtime_env=runtime_env)
        )
        _consume(dataset, summary, folder, previous, run_options, progress, signals, log)
        if args.verbose and not summary.interrupted:  # where Ray Data spent the time, operator by operator
            log(str(dataset.stats()))
    finally:
        if started_here:
            ray.shutdown()
    return summary


def default_engine_cpus(cpus: int, gpus: int, engines: int) -> int:
    """CPUs an engine reserves: see ENGINE_CPUS_MIN; on a cluster without GPUs (tests, trials), one."""
    if not gpus:
        return 1
    share = cpus // max(engines, 1) - READER_CPUS_PER_ENGINE
    return max(ENGINE_CPUS_MIN, min(ENGINE_CPUS_MAX, share))


def _done_hash(folder, previous, run_options, retry_refused) -> str:
    """The content hash an earlier run finished this document with, under these options ('' if none)."""
    if previous is None or not folder.is_done(previous, previous.get("content_hash"), run_options, retry_refused):
        return ""
    return previous["content_hash"]


def _consume(dataset, summary, folder, previous, run_options, progress, signals, log) -> None:
    """Commit rows as they come. A signal raises Interrupted here, which ends the iteration and with it
    the pipeline: the documents in flight are abandoned."""
    from .bulk import Interrupted

    started = time.monotonic()
    ready, first_document = set(), []
    signals.interrupt()
    try:
        if signals.count:
            raise Interrupted()
        for row in dataset.iter_rows():
            if row["engine_ready_at"] is not None:
                ready.add(row["engine_ready_at"])
            if row["first_document_at"] is not None:
                first_document.append(row["first_document_at"])
                progress.work_started(row["first_document_at"])
            _commit(row, summary, folder, previous, run_options, progress)
            summary.seconds = time.monotonic() - started
            summary.extra["last_commit_at"] = time.time()
    except Interrupted:
        log("stopping: the documents in flight are abandoned; the next run redoes them")
        summary.interrupted = True
    except Exception as error:
        raise BulkError(f"the Ray pipeline failed: {error}") from error
    summary.extra["engine_ready_at"] = sorted(ready)
    summary.extra["first_document_at"] = min(first_document, default=None)
    if first_document and "last_commit_at" in summary.extra:  # another node's clock: within the run's time
        worked = summary.extra["last_commit_at"] - min(first_document)
        summary.work_seconds = min(max(worked, 0.0), summary.seconds)


def _commit(row: dict, summary, folder, previous, run_options, progress) -> None:
    source = Source(row["source"], row["document"])
    status = row["status"]
    message = None
    if status == SKIPPED:
        summary.count_skipped(previous[row["document"]]["status"])
    else:
        entry = record(source, status, row["content_hash"], row["bytes"], run_options, pages=row["pages"],
                       tokens=row["tokens"], seconds=row["seconds"], stop_reasons=row["stop_reasons"],
                       error=row["error"])
        staged = None
        if status == OK:
            staged = folder.new_staging_folder()
            write_files(staged, row["files"])
        folder.commit(entry, staged)
        message = summary.count_finished(entry)
    progress.update(summary, message)
