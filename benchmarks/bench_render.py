"""How fast a bulk run's reader threads turn PDFs into pages (CPU only): rendered in the threads themselves,
one page at a time under PDFium's lock, or each thread by its own worker process (`ocr_service/bulk_render.py`,
what the bulk command does). The PDFs are bench_bulk.py's: A4 pages of eight a document.

Beside the readers a probe thread runs pure Python (as the engine's serving and vision threads do when they
launch kernels): its speed while the readers work, as a share of its speed alone, says how much of the
interpreter the reading takes from the engine in the same process.

    python benchmarks/bench_render.py --pages 64 --readers 2 --json out.json
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_bulk import make_pdfs  # noqa: E402
from ocr_service.bulk_render import DocumentReader  # noqa: E402
from ocr_service.pipeline import Options  # noqa: E402
from ocr_service.settings import Settings  # noqa: E402


class PythonProbe:
    """A thread counting iterations of a pure-Python loop: its rate while something else runs, against its
    rate alone, is the share of the interpreter that something leaves to another thread."""

    def __init__(self):
        self.count, self.running = 0, True
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        total = 0
        while self.running:
            for i in range(1000):
                total += i
            self.count += 1

    def __enter__(self):
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.rate = self.count / (time.perf_counter() - self.started)


def probe_alone(seconds: float = 1.0) -> float:
    with PythonProbe() as probe:
        time.sleep(seconds)
    return probe.rate


def read_all(paths: list, readers: int, workers: bool) -> dict:
    """Every PDF read once by `readers` threads sharing one reader; pages/s from the threads' start (workers
    started inside the time, as a bulk run starts them)."""
    reader, limits = DocumentReader(workers), Settings.from_env({}).limits
    counts, pending, lock = [], list(paths), threading.Lock()

    def read() -> None:
        reader.start_worker()
        while True:
            with lock:
                if not pending:
                    return
                path = pending.pop()
            counts.append(len(reader.read(path, Options(), limits)))

    alone = probe_alone()
    started = time.perf_counter()
    with PythonProbe() as probe:
        threads = [threading.Thread(target=read) for _ in range(readers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
    reader.close()
    return {"pages": sum(counts), "seconds": seconds, "pages_s": sum(counts) / seconds,
            "python_left": probe.rate / alone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=64)
    parser.add_argument("--pages-per-pdf", type=int, default=8)
    parser.add_argument("--readers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = make_pdfs(Path(folder), args.pages, args.pages_per_pdf, (1240, 1754))
        runs = {"threads": [], "worker processes": []}
        for _ in range(args.repeats):  # alternated, so that both see the machine alike
            runs["threads"].append(read_all(paths, args.readers, workers=False))
            runs["worker processes"].append(read_all(paths, args.readers, workers=True))
    report = {"cpus": os.cpu_count(), "readers": args.readers, "pages": args.pages, "runs": runs}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"\n{args.pages} A4 pages in PDFs of {args.pages_per_pdf}, {args.readers} reader threads, {os.cpu_count()} CPUs")
    print("| rendering | pages/s, each run | a Python thread's speed beside it, of its speed alone |\n|---|---|---|")
    for name, results in runs.items():
        rates = ", ".join(format(r["pages_s"], ".1f") for r in results)
        left = ", ".join(format(r["python_left"], ".0%") for r in results)
        print(f"| {name} | {rates} | {left} |")


if __name__ == "__main__":
    main()
