"""Reading a bulk run's documents into pages: PDFs rendered in worker processes, other files in the caller's thread.

PDFium may not be called from two threads of a process at once, not even for different documents
(`inputs.PDFIUM_LOCK`), so reader threads render one page at a time between them. On the H200 the engine
reads a 256-page job faster than one thread renders its PDFs (~20-30 ms a page): the bulk command's vision
passes held 5.2 pages against 9.1 in the job, its prefills 5.2 against 9.5, and it ran at 0.83 of the job
(benchmarks/results/h200-2026-11-30f). With a renderer process per reader thread, each with its own PDFium,
the readers render side by side: the passes now hold as many pages as the job's. With its PDFs rendered
beforehand the bulk run matches the job (0.97-1.02); reading them it ran at 0.86-0.87, its prefills twice the
job's: the renderers took cores from the engine's launching threads (at lower priority, `RENDERER_NICENESS`:
0.90, from the engine ready 0.95; on a 32-core host 0.94 and 0.99; benchmarks/results/h200-2026-11-30h).

Each reader thread has its own worker (`python -m ocr_service.bulk_render`): nothing to schedule, and a worker
imports only what reading needs, where `multiprocessing` would import the parent's main module in every
worker (a benchmark script's torch, seconds before the first page) and `fork` would copy a parent that holds
CUDA and threads. A request and its answer travel as pickles over the worker's pipes, the pages' pixels beside
the pickle rather than inside it (`_send`, `_receive`: an A4 page at 144 dpi is ~6 MB). Workers run at a lower
priority than the engine (`RENDERER_NICENESS`) and ignore SIGINT, which a terminal sends to the whole process
group: stopping is the parent's to decide (documents in flight finish, no new one starts); they exit when the
parent closes their input, or dies. A worker that dies while rendering (PDFium crashing on a hostile file, the
kernel's OOM killer) is replaced and the document tried once more in the new one; if that one dies too, the
document fails with an error that says so and the run goes on.
"""

import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

from .errors import InputError
from .inputs import HEADER_BYTES, Limits, is_pdf
from .pipeline import Options, read_document

_LENGTH = struct.Struct("<Q")
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class RendererCrashed(RuntimeError):
    """The process rendering a document died twice on it (the document is recorded as failed)."""


class DocumentReader:
    """`read(path, options, limits)` → the pages of one document, as `pipeline.read_document` gives them; with `workers`
    on, a PDF is rendered by the calling thread's own worker process (off: in the calling thread, as the
    predictor does)."""

    def __init__(self, workers: bool = True):
        self.workers = workers
        self._local = threading.local()
        self._started: list = []
        self._lock = threading.Lock()
        self._closed = False

    def read(self, path: Path, options: Options, limits: Limits) -> list:
        if not self.workers or not _starts_like_pdf(path):
            return read_document(path, options, limits)
        request = (str(path), options, limits)
        for _ in range(2):  # a worker may have died of something else: a new one tries once more
            try:
                return self._worker().ask(request)
            except _WorkerDied:
                self._local.worker = None
        raise RendererCrashed("the PDF renderer's process died on this document, twice; the file may be damaged "
                              "or hostile")

    def start_worker(self) -> None:
        """Starts the calling thread's worker now, so that its first document does not wait for it."""
        if self.workers:
            self._worker()

    def stop_worker(self) -> None:
        """Ends the calling thread's worker, once the thread has nothing more to read: its exit is then not
        waited for at the end of the run (`close`), after the last document."""
        worker = getattr(self._local, "worker", None)
        self._local.worker = None
        if worker is not None:
            with self._lock:
                if worker in self._started:
                    self._started.remove(worker)
            worker.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._started = self._started, []
        for worker in workers:
            worker.close()

    def _worker(self) -> "_Worker":
        worker = getattr(self._local, "worker", None)
        if worker is None or not worker.alive():
            worker = _Worker()  # outside the lock: the threads' workers start side by side
            with self._lock:
                closed = self._closed
                if not closed:
                    self._started.append(worker)
            if closed:
                worker.close()
                raise RuntimeError("the document reader is closed")
            self._local.worker = worker
        return worker


class _WorkerDied(Exception):
    pass


class _Worker:
    """One renderer process and its two pipes."""

    def __init__(self):
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, environment.get("PYTHONPATH")]))
        self.process = subprocess.Popen([sys.executable, "-m", "ocr_service.bulk_render"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=environment)
        _widen_pipe(self.process.stdout)
        _lower_priority(self.process.pid)
        try:
            _receive(self.process.stdout)  # its greeting: it has started and imported what it needs
        except EOFError:
            code = self.process.wait()
            raise RuntimeError(f"the PDF renderer process could not start (python -m ocr_service.bulk_render "
                               f"exited with {code}; its error is above)") from None

    def alive(self) -> bool:
        return self.process.poll() is None

    def ask(self, request):
        try:
            _send(self.process.stdin, request)
            ok, value = _receive(self.process.stdout)
        except (BrokenPipeError, EOFError, OSError):
            self.close()
            raise _WorkerDied() from None
        if ok:
            return value
        raise value

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# The answers' pipe widened from Linux's 64 KiB to this (the most an unprivileged process may ask by default).
# A document of eight A4 pages is ~48 MB: read through 64 KiB the reader thread takes the interpreter back
# ~750 times, each time from the engine's threads that launch kernels (~48 times through 1 MiB). On the H200
# the bulk run's prefills took 1.6-2x the job's and a sampling thread woke twice as late; with the wider pipe
# the bulk ran at 0.884 and 0.852 of the job against 0.833 and 0.864 before, within the run-to-run spread
# (benchmarks/results/h200-2026-11-30g).
ANSWER_PIPE_BYTES = 1 << 20


# How much lower than the parent a renderer runs (Unix niceness). The engine's threads launch the GPU's work from
# Python and each launch waits for a core: on a 16-core GPU host the engine's 12 preprocessing threads and four
# renderers can want more cores than there are, and a launching thread that waits for one stalls the GPU. The
# renderers only need to keep ahead of the encoder (several times over: `benchmarks/bench_render.py`), so they
# take the cores the engine leaves. Set by the parent, once the worker has started.
RENDERER_NICENESS = 10


def _lower_priority(pid: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(os.getpriority(os.PRIO_PROCESS, 0) + RENDERER_NICENESS, 19))
    except (AttributeError, OSError):
        pass  # not Unix: the renderers share the cores as equals


def _widen_pipe(stream) -> None:
    try:
        import fcntl

        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, ANSWER_PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass  # not Linux, or a lower limit: the default pipe works, in more reads


def _send(stream, value) -> None:
    """`value` as a pickle whose images' pixels travel out of band: the pickle, then each image's bytes as they
    are, so that the reader fills its own buffers with them (`_receive`)."""
    pixels: list = []
    data = _PixelsApart(pixels).dumps(value)
    stream.write(_LENGTH.pack(len(data)))
    stream.write(data)
    stream.write(_LENGTH.pack(len(pixels)))
    for buffer in pixels:
        view = buffer.raw()
        stream.write(_LENGTH.pack(view.nbytes))
        stream.write(view)
    stream.flush()


def _receive(stream):
    """What `_send` sent. The pixels are read straight into buffers of their own, with the interpreter lock let go
    while the pipe is read, and Pillow unpacks them with the lock let go too (`_image_from_pixels`), where
    unpickling the pages whole copied each page holding the lock, beside the engine's threads that launch the
    GPU's work from Python. (On the H200 the bulk run's pages/s did not move with it, 0.867 → 0.859 of the job:
    the cores the renderers took mattered more, see RENDERER_NICENESS.)"""
    (length,) = _LENGTH.unpack(_read_exactly(stream, _LENGTH.size))
    data = _read_exactly(stream, length)
    (count,) = _LENGTH.unpack(_read_exactly(stream, _LENGTH.size))
    pixels = []
    for _ in range(count):
        (size,) = _LENGTH.unpack(_read_exactly(stream, _LENGTH.size))
        buffer = bytearray(size)
        if stream.readinto(buffer) != size:
            raise EOFError
        pixels.append(buffer)
    return pickle.loads(data, buffers=pixels)


def _read_exactly(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return data


class _PixelsApart(pickle.Pickler):
    """Pickles a PIL image as its mode, size, info and a reference to its pixels, which go into `pixels` to be
    sent apart (pickle protocol 5's out-of-band buffers)."""

    def __init__(self, pixels: list):
        import io

        self._file = io.BytesIO()
        super().__init__(self._file, protocol=5, buffer_callback=pixels.append)

    def dumps(self, value) -> bytes:
        self.dump(value)
        return self._file.getvalue()

    def reducer_override(self, value):
        from PIL import Image

        if isinstance(value, Image.Image):
            return _image_from_pixels, (value.mode, value.size, value.info, pickle.PickleBuffer(value.tobytes()))
        return NotImplemented


def _image_from_pixels(mode: str, size: tuple, info: dict, pixels) -> "Image.Image":
    """The image whose raw pixels `pixels` holds (Pillow unpacks them with the interpreter lock let go)."""
    from PIL import Image

    image = Image.frombuffer(mode, size, pixels, "raw", mode, 0, 1)
    if image.readonly:  # modes Pillow maps rather than copies: an image of its own, as the predictor's are
        image = image.copy()
    image.info.update(info)
    return image


def _starts_like_pdf(path: Path) -> bool:
    """Whether `inputs.load_pages` would read `path` as a PDF (its test, on the same first bytes)."""
    try:
        with open(path, "rb") as file:
            head = file.read(HEADER_BYTES)
    except OSError:
        return False  # read_document, in this thread, gives the error the user sees
    return is_pdf(head)


def _serve() -> None:
    """A worker: requests from stdin, answers (ok, pages or the error to raise) to stdout, until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the answers
    _send(answers, (True, "ready"))
    while True:
        try:
            path, options, limits = _receive(requests)
        except EOFError:
            return
        try:
            answer = (True, read_document(Path(path), options, limits))
        except (InputError, OSError) as error:
            answer = (False, error)
        except Exception as error:  # noqa: BLE001 - whatever it was, the parent records it for this document
            answer = (False, RuntimeError(f"rendering failed: {error!r}"))
        _send(answers, answer)


if __name__ == "__main__":
    # run from the module under its own name, so that what it pickles names functions the parent can find
    from ocr_service.bulk_render import _serve as serve

    serve()
