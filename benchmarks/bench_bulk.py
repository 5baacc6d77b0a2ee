"""Throughput of the bulk command beside the engine's own job, on the same pages in the same run.

One GPU: PDFs of A4 pages (several pages each) totalling --pages; (a) their rendered pages as one engine job
(`OCREngine.run_pages`, as bench_engine.py measures its page job) and (b) the bulk command
(`python -m ocr_service.bulk`, run in this process on the same loaded engine) over the PDFs, from the first
document read to the last output committed. Both Gundam, the markdown prompt, --tokens new tokens a page
forced (EOS ignored, the loop stop off). Prints pages/s of each and their ratio (target ≥ 0.95).

    python benchmarks/bench_bulk.py --pages 256 --json /tmp/bulk.json

Many GPUs (--ray --gpus N): the one-GPU bulk figure in a child process on GPU 0, then the bulk command
through Ray Data with N engines, from this process (which never touches CUDA itself); prints pages/s from
the first moment an engine is loaded and holds a document (the one-GPU figure starts with its engine
loaded too; documents are read while the engines load) to the last output committed, its ratio to the
one-GPU figure (target ≥ 1.85 for 2), and the whole run's (Ray's start and the engines' loading included).

    python benchmarks/bench_bulk.py --ray --gpus 2 --pages 512 --json /tmp/bulk-ray.json

--smoke: the same on the CPU with a tiny checkpoint, tiny sizes (Tiny preset, a few pages and tokens).
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# As bench_engine.py runs the engine: no loop stop (random weights loop), every page its full token count.
os.environ["DEEPSEEK_OCR_STOP_LOOPS"] = "0"

from benchmarks.common import (  # noqa: E402
    ThreadSampler, a4_page, device_name, print_thread_report, random_checkpoint, work_since,
)

MARKDOWN_TASK = "Convert to Markdown"


def make_pdfs(folder: Path, pages: int, per_pdf: int, size: tuple) -> list:
    """PDFs of A4 pages at 150 dpi (rendered back at 144 dpi by the service), `per_pdf` pages each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for first in range(0, pages, per_pdf):
        images = [a4_page(*size, seed=i % 8) for i in range(first, min(pages, first + per_pdf))]
        path = folder / f"doc-{first // per_pdf:04d}.pdf"
        images[0].save(path, save_all=True, append_images=images[1:], resolution=150)
        paths.append(path)
    return paths


def bulk_arguments(args, folder: Path, out: Path, checkpoint: Path) -> list:
    return [str(folder), str(out), "--task-type", MARKDOWN_TASK, "--resolution-size", args.preset,
            "--max-new-tokens", str(args.tokens), "--ignore-eos", "--weights-dir", str(checkpoint),
            "--no-progress-bar", "--log-every", "10", *getattr(args, "extra_arguments", [])]


def one_gpu(args, folder: Path, checkpoint: Path) -> dict:
    """(a) the engine's job and (b) the bulk command, on one engine."""
    from ocr_service import bulk, bulk_render
    from ocr_service.engine import OCREngine
    from ocr_service.pipeline import Options, read_document
    from ocr_service.presets import build_prompt, resolution
    from ocr_service.settings import Settings

    settings = Settings.from_env()
    if args.preprocessed_ahead is not None:  # a trial of the engine's bound (pinned views vs encoder passes)
        from ocr_service.engine import ServingLoop

        ServingLoop.PREPROCESSED_AHEAD = args.preprocessed_ahead
    started = time.perf_counter()
    engine = OCREngine(checkpoint, settings, ignore_eos=True)
    report = {"load_s": time.perf_counter() - started}
    preset = resolution(args.preset)
    prompt = build_prompt(MARKDOWN_TASK)
    pages_by_path = {path: read_document(path, Options(), settings.limits) for path in sorted(folder.glob("*.pdf"))}
    images = [page.image for pages in pages_by_path.values() for page in pages]
    engine.run_pages(images[:2], prompt, preset, 4)  # warm-up
    if "job" not in args.skip:
        before = engine.server.work_done()
        started = time.perf_counter()
        with ThreadSampler() as sampler:
            results = engine.run_pages(images, prompt, preset, args.tokens)
        elapsed = time.perf_counter() - started
        report["job"] = {"pages": len(images), "seconds": elapsed, "pages_s": len(images) / elapsed,
                         "tokens": sum(len(r.token_ids) for r in results), **work_since(engine, before, len(images)),
                         "threads": sampler.report()}
        print("job", json.dumps(report["job"]), flush=True)
        print_thread_report("the engine's job", report["job"]["threads"])
    bulk.load_engine = lambda *unused, **unused_too: engine  # the command runs on the engine loaded above

    def loading(*unused, **unused_too):
        """The engine above, after a load of --load-s seconds: a real run loads its engine when its first document
        is read, and its readers read on meanwhile (a load takes minutes, a document well under a second)."""
        time.sleep(args.load_s)
        return engine
    from ocr_service import pipeline

    class PreRead:
        """A reader that hands out the job's pages, already rendered."""

        def __init__(self, *unused):
            pass

        def read(self, path, options, limits):
            return pages_by_path[Path(path)]

        def start_worker(self):
            pass

        def close(self):
            pass

    # (report key, what the run is, its output folder, the change it runs under)
    runs = [("bulk", "", "out-one-gpu", contextlib.nullcontext()),
            # what a run does once its engine has loaded: pages/s from then on (`from_engine_ready`)
            ("bulk_loading", "with its engine loading while the first documents are read", "out-loading",
             mock.patch.object(bulk, "load_engine", loading))]
    if args.trial_preread:
        # Every PDF already rendered: what separates the bulk run from the job is then its documents, not their
        # reading.
        runs.append(("bulk_trial_preread", "with the PDFs read beforehand", "out-preread",
                     mock.patch.object(bulk, "DocumentReader", PreRead)))
    if args.trial_renderers_as_equals:
        # The render workers at the engine's own priority, as they ran before they were made to give way to it.
        runs.append(("bulk_trial_renderers_as_equals", "with its renderers at the engine's priority",
                     "out-renderers", mock.patch.object(bulk_render, "RENDERER_NICENESS", 0)))
    if args.trial_readers:
        runs.append(("bulk_trial_readers", f"with --readers {args.trial_readers}", "out-readers",
                     mock.patch.object(args, "extra_arguments", ["--readers", str(args.trial_readers)])))
    if "foreground" not in args.skip:
        # The documents submitted as predictions are (their first pages put first at the encoder), as the command
        # did before its documents ran in the background.
        as_background = pipeline.submit_document
        runs.append(("bulk_foreground", "with its documents as predictions", "out-foreground",
                     mock.patch.object(pipeline, "submit_document",
                                       lambda *arguments, **unused: as_background(*arguments, background=False))))
    for key, what, out, change in runs:
        with change:
            report[key] = run_bulk(args, engine, folder, Path(args.work) / out, checkpoint)
        if key == "bulk_loading":  # the command's own count, from its engine ready to its last commit
            seconds = report[key]["work_seconds"]
            report[key]["from_engine_ready"] = {"seconds": seconds, "pages_s": report[key]["pages"] / seconds}
        print(f"bulk {what}".strip(), json.dumps(report[key]), flush=True)
        print_thread_report(f"the bulk command {what}".strip(), report[key]["threads"])
    return report


def run_bulk(args, engine, folder: Path, out: Path, checkpoint: Path) -> dict:
    from ocr_service import bulk

    before = engine.server.work_done()
    with ThreadSampler() as sampler:
        code, summary = bulk.run_command(bulk.parser().parse_args(bulk_arguments(args, folder, out, checkpoint)))
    return {"threads": sampler.report(), "exit": code, "pages": summary.pages, "documents": summary.ok,
            "seconds": summary.seconds, "work_seconds": summary.work_seconds,
            "pages_s": summary.pages_per_second, "tokens": summary.tokens,
            # the bulk's own costs at both ends: reading the first documents, writing the last
            "first_document_s": summary.extra.get("first_submitted_s"),
            "after_last_page_s": summary.seconds - summary.extra.get("last_decoded_s", summary.seconds),
            **work_since(engine, before, max(summary.pages, 1))}


def with_ray(args, folder: Path, checkpoint: Path) -> dict:
    """The one-GPU figure in a child process, then Ray Data with --gpus engines from here."""
    from ocr_service import bulk

    child_json = Path(args.work) / "one-gpu.json"
    if args.reuse_one_gpu and child_json.exists():
        report = {"one_gpu": json.loads(child_json.read_text())}
    else:
        report = {"one_gpu": one_gpu_child(args, checkpoint, child_json)}
    if args.smoke:
        import ray

        # CPU engines: Ray counts one CPU each; the readers need one more (there are 2 cores here).
        ray.init(num_cpus=args.gpus + 1, include_dashboard=False, logging_level="WARNING")
    out = Path(args.work) / "out-ray"
    started = time.time()
    extra = ["--ray-engine-cpus", str(args.engine_cpus)] if args.engine_cpus else []
    # --verbose: the engines' own progress lines and Ray Data's statistics in the log
    code, summary = bulk.run_command(bulk.parser().parse_args(
        bulk_arguments(args, folder, out, checkpoint) + ["--ray", "--ray-engines", str(args.gpus), "--verbose"]
        + extra))
    ended = summary.extra["last_commit_at"]
    ready, first = summary.extra["engine_ready_at"], summary.extra["first_document_at"]
    report["ray"] = {"exit": code, "engines": args.gpus, "engine_cpus": args.engine_cpus or "default",
                     "pages": summary.pages, "documents": summary.ok,
                     "seconds_whole_run": ended - started, "seconds_from_first_document": ended - first,
                     "engines_ready_after_s": [t - started for t in ready],
                     "first_document_after_s": first - started,
                     "pages_s": summary.pages / (ended - first), "pages_s_whole_run": summary.pages / (ended - started)}
    print("ray", json.dumps(report["ray"]), flush=True)
    return report


def one_gpu_child(args, checkpoint: Path, child_json: Path) -> dict:
    """The one-GPU figures, from a child process that sees only the first GPU."""
    command = [sys.executable, __file__, "--pages", str(args.pages), "--pages-per-pdf", str(args.pages_per_pdf),
               "--tokens", str(args.tokens), "--preset", args.preset, "--checkpoint", str(checkpoint),
               "--work", str(Path(args.work) / "child"), "--json", str(child_json),
               "--skip", *args.skip, "foreground"]  # the trial is the one-GPU run's own
    if args.smoke:
        command.append("--smoke")
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    subprocess.run(command, env=environment, check=True)
    return json.loads(child_json.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=None, help="pages in all (default 256; 512 with --ray)")
    parser.add_argument("--pages-per-pdf", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="new tokens a page (EOS ignored)")
    parser.add_argument("--preset", default="Gundam (Recommended)")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-bulk"))
    parser.add_argument("--ray", action="store_true")
    parser.add_argument("--gpus", type=int, default=2, help="engines of the Ray run")
    parser.add_argument("--engine-cpus", type=int, default=None, help="--ray-engine-cpus of the Ray run")
    parser.add_argument("--preprocessed-ahead", type=int, default=None,
                        help="one GPU: ServingLoop.PREPROCESSED_AHEAD for this run (a trial)")
    parser.add_argument("--reuse-one-gpu", action="store_true",
                        help="take the one-GPU figures from an earlier run's one-gpu.json in --work")
    parser.add_argument("--load-s", type=float, default=3.0,
                        help="one GPU: the engine's load in the run measured from the engine ready (seconds)")
    parser.add_argument("--trial-preread", action="store_true",
                        help="one GPU: the bulk command once more with its PDFs rendered beforehand (a trial)")
    parser.add_argument("--trial-renderers-as-equals", action="store_true",
                        help="one GPU: the bulk command once more with its render workers at the engine's priority")
    parser.add_argument("--trial-readers", type=int, default=None,
                        help="one GPU: the bulk command once more with this many --readers (a trial)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["job", "foreground"],
                        help="job: no engine-job figure; foreground: no trial of the documents as predictions")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny checkpoint, tiny sizes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("DEEPSEEK_OCR_DEVICE", "cpu")
        args.preset, args.pages_per_pdf = "Tiny", min(args.pages_per_pdf, 3)
        args.tokens = min(args.tokens, 16)
        args.pages = args.pages or (8 if args.ray else 6)
    args.pages = args.pages or (512 if args.ray else 256)
    checkpoint = args.checkpoint or Path("/tmp/bench-bulk-tiny" if args.smoke else "/tmp/bench-checkpoint")
    random_checkpoint(checkpoint, size="tiny" if args.smoke else "full")
    folder = Path(args.work) / f"pdfs-{args.pages}x{args.pages_per_pdf}"
    size = (620, 877) if args.smoke else (1240, 1754)
    if not folder.exists():
        make_pdfs(folder, args.pages, args.pages_per_pdf, size)
    args.extra_arguments = []
    for stale in ("out-one-gpu", "out-foreground", "out-readers", "out-preread", "out-renderers", "out-loading",
                  "out-ray"):  # every run measures every document
        subprocess.run(["rm", "-rf", str(Path(args.work) / stale)], check=True)
    report = with_ray(args, folder, checkpoint) if args.ray else one_gpu(args, folder, checkpoint)
    report.update(device=device_name(), pages=args.pages, pages_per_pdf=args.pages_per_pdf, tokens=args.tokens,
                  preset=args.preset)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print_table(report, args)


def print_table(report: dict, args) -> None:
    documents = -(-args.pages // args.pages_per_pdf)
    print(f"\n{report['device']}; {args.pages} A4 pages as {documents} PDFs of {args.pages_per_pdf} pages, "
          f"{args.preset}, {args.tokens} tokens a page forced\n")
    print("| run | pages/s | ratio | target |\n|---|---|---|---|")
    single = report.get("one_gpu", report)
    job, local = single.get("job"), single["bulk"]
    if job:
        print(f"| engine job, {job['pages']} pages at once | {job['pages_s']:.2f} | 1.00 | |")
        print(f"| bulk command, one engine | {local['pages_s']:.2f} | {local['pages_s'] / job['pages_s']:.3f} of the "
              f"job | ≥ 0.95 |")
        loading = single.get("bulk_loading", {}).get("from_engine_ready")
        if loading:
            print(f"| bulk command, from its engine ready (loaded for {args.load_s:g} s while the first documents "
                  f"were read, as a real run's load) | {loading['pages_s']:.2f} | "
                  f"{loading['pages_s'] / job['pages_s']:.3f} of the job | ≥ 0.95 |")
        trials = [("bulk_trial_preread", "the PDFs rendered beforehand"),
                  ("bulk_trial_renderers_as_equals", "the render workers at the engine's priority"),
                  ("bulk_trial_readers", f"--readers {args.trial_readers}"),
                  ("bulk_foreground", "its documents as predictions (first pages first at the encoder)")]
        for key, what in trials:
            if key in single:
                print(f"| trial: {what} | {single[key]['pages_s']:.2f} | "
                      f"{single[key]['pages_s'] / job['pages_s']:.3f} of the job | |")
    else:
        print(f"| bulk command, one engine | {local['pages_s']:.2f} | 1.00 | |")
    if "ray" in report:
        ray = report["ray"]
        print(f"| bulk command --ray, {ray['engines']} engines, from the first engine loaded with a document | "
              f"{ray['pages_s']:.2f} | {ray['pages_s'] / local['pages_s']:.2f}× one engine | ≥ 1.85× (2) |")
        print(f"| bulk command --ray, {ray['engines']} engines, whole run (Ray's start, models loading) | "
              f"{ray['pages_s_whole_run']:.2f} | | |")


if __name__ == "__main__":
    main()
