"""Where a job's GPU time goes, stage by stage: a window of a running job under the profiler, read back as
kernels per CUDA stream and per engine stage (the vision worker's passes, the serving thread's prefills and
decode rounds, named by the engine's profiler ranges: `ocr_service.vision.*_RANGE`).

    window = profile_window(lambda started: page_job(..., on_start=started), start_after_s=3, window_s=2,
                            trace=Path("/tmp/job-trace.json.gz"))

What it answers: is the GPU ever idle; how much of the encoder's and the serving thread's kernels run at the
same time; how long a prefill holds the serving thread against how long its kernels run. The kernels of a
stage are those launched inside its range on its thread (the launch's correlation id), so work queued by a
range is counted even where it runs after the range ended. The raw trace is kept (gzipped) to read again
with `summarise(load(path))` away from the GPU. The profiler records every operator of every thread in the
window, which slows the CPU side: compare stages within a window, not the window's pages/s with a job's.
"""

import gzip
import json
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

STAGE_RANGES = ("ocr.vision_pass", "ocr.prefill", "ocr.decode")


def profile_window(run_job: Callable[[Callable[[], None]], object], start_after_s: float, window_s: float,
                   trace: Optional[Path] = None) -> dict:
    """Runs `run_job(started)` in a thread (it calls `started()` as its job is submitted), profiles
    [start_after_s, start_after_s + window_s] after that (CPU and CUDA activity of every thread), waits for
    the job; returns `summarise` of the window (and the job's return value under "job")."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    outcome = {}
    submitted = threading.Event()

    def job():
        try:
            outcome["value"] = run_job(submitted.set)
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error
        finally:
            submitted.set()

    thread = threading.Thread(target=job, name="timeline-job")
    thread.start()
    submitted.wait()
    time.sleep(start_after_s)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    from torch._C._profiler import _ExperimentalConfig

    # The stages run on the engine's own threads: without this only the starting thread's operators are seen.
    prof = profile(activities=activities, experimental_config=_ExperimentalConfig(profile_all_threads=True))
    prof.start()
    time.sleep(window_s)
    prof.stop()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    raw = Path("/tmp/timeline-trace.json") if trace is None else trace.with_suffix("")
    prof.export_chrome_trace(str(raw))
    events = json.loads(raw.read_text())
    if trace is not None:
        with gzip.open(trace, "wt") as out:
            json.dump(events, out)
        raw.unlink()
    try:
        summary = summarise(events)
    except Exception as error:  # the trace is kept: it can be read again elsewhere
        summary = {"summary_error": repr(error)}
    summary["job"] = outcome.get("value")
    return summary


def load(path: Path) -> dict:
    with gzip.open(path, "rt") as source:
        return json.load(source)


def _union(intervals: list) -> float:
    """Total length covered by [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def _overlap(first: list, second: list) -> float:
    """Length covered by both sets of intervals."""
    return _union(first) + _union(second) - _union(first + second)


def summarise(trace: dict) -> dict:
    """The window's GPU time (µs in the trace, ms here): busy by stream, by stage, both at once, idle; the
    serving thread's prefills and decode rounds (wall against their kernels); the largest kernels of each
    stage."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    launches = {}  # correlation id → (thread, launch time)
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = (e.get("tid"), e["ts"])
    ranges = defaultdict(list)  # thread → [(start, end, stage)]
    for e in events:
        if e.get("cat") == "user_annotation" and e.get("name") in STAGE_RANGES:
            ranges[e.get("tid")].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    if not events:
        return {"window_ms": 0.0}
    window_start = min(e["ts"] for e in events)
    window_end = max(e["ts"] + e.get("dur", 0) for e in events)

    def stage_of(kernel: dict) -> str:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            return "unattributed"
        tid, at = launch
        for start, end, name in ranges.get(tid, ()):
            if start <= at <= end:
                return name
        return "other"

    by_stage = defaultdict(list)
    by_stream = defaultdict(list)
    names = defaultdict(lambda: defaultdict(float))
    for kernel in kernels:
        interval = (kernel["ts"], kernel["ts"] + kernel["dur"])
        stage = stage_of(kernel)
        by_stage[stage].append(interval)
        by_stream[kernel.get("args", {}).get("stream")].append(interval)
        names[stage][kernel["name"][:70]] += kernel["dur"]
    everything = [i for intervals in by_stage.values() for i in intervals]
    ms = 1e-3
    summary = {
        "window_ms": (window_end - window_start) * ms,
        "gpu_busy_ms": _union(everything) * ms,
        "streams": {str(stream): {"kernels": len(intervals), "busy_ms": _union(intervals) * ms}
                    for stream, intervals in by_stream.items()},
        "stages": {stage: {"kernels": len(intervals), "kernel_ms": sum(e - s for s, e in intervals) * ms,
                           "busy_ms": _union(intervals) * ms,
                           "top": sorted(((round(t * ms, 2), n) for n, t in names[stage].items()), reverse=True)[:8]}
                   for stage, intervals in by_stage.items()},
    }
    summary["gpu_idle_ms"] = summary["window_ms"] - summary["gpu_busy_ms"]
    # The GPU's idle stretches, by the stage ranges open meanwhile (which threads had work in hand and were
    # not launching it)
    open_ranges = sorted((s, e, name) for thread in ranges.values() for s, e, name in thread)
    idle_by = defaultdict(float)
    reach = None
    for start, end in sorted(everything):
        if reach is not None and start > reach:
            middle = (reach + start) / 2
            key = "+".join(sorted({name for s, e, name in open_ranges if s <= middle <= e})) or "none"
            idle_by[key] += (start - reach) * ms
        reach = end if reach is None else max(reach, end)
    summary["gpu_idle_ms_by_open_stages"] = {key: round(value, 1) for key, value in sorted(idle_by.items())}
    vision = by_stage.get("ocr.vision_pass", [])
    serving = by_stage.get("ocr.prefill", []) + by_stage.get("ocr.decode", [])
    summary["vision_with_serving_ms"] = _overlap(vision, serving) * ms
    for stage in ("ocr.prefill", "ocr.decode", "ocr.vision_pass"):
        spans = [(s, e) for thread in ranges.values() for s, e, name in thread if name == stage]
        if spans:
            summary["stages"].setdefault(stage, {"kernels": 0, "kernel_ms": 0.0, "busy_ms": 0.0, "top": []})
            summary["stages"][stage].update({
                "ranges": len(spans), "range_wall_ms": sum(e - s for s, e in spans) * ms,
                # while this stage's ranges were open: the GPU's kernels of the encoder (for the serving
                # thread's stages: is it competing?) and of every stage
                "vision_during_ms": _overlap(spans, vision) * ms,
                "gpu_busy_during_ms": _overlap(spans, everything) * ms})
    return summary


def print_summary(summary: dict, label: str) -> None:
    if "summary_error" in summary:
        print(f"timeline of {label}: reading the trace failed ({summary['summary_error']})", flush=True)
        return
    print(f"timeline of {label}: window {summary.get('window_ms', 0):.0f} ms, GPU busy {summary.get('gpu_busy_ms', 0):.0f} "
          f"ms, idle {summary.get('gpu_idle_ms', 0):.0f} ms, encoder and serving kernels at once "
          f"{summary.get('vision_with_serving_ms', 0):.0f} ms", flush=True)
    if summary.get("gpu_idle_ms_by_open_stages"):
        print("  GPU idle while these stages' ranges were open, ms: " + ", ".join(
            f"{key} {value:.0f}" for key, value in summary["gpu_idle_ms_by_open_stages"].items()), flush=True)
    for stage, numbers in summary.get("stages", {}).items():
        line = (f"  {stage}: {numbers['kernels']} kernels, {numbers['kernel_ms']:.0f} ms of kernels, busy "
                f"{numbers['busy_ms']:.0f} ms")
        if "ranges" in numbers:
            line += (f"; {numbers['ranges']} ranges open {numbers['range_wall_ms']:.0f} ms, GPU busy meanwhile "
                     f"{numbers['gpu_busy_during_ms']:.0f} ms, encoder kernels meanwhile "
                     f"{numbers['vision_during_ms']:.0f} ms")
        print(line, flush=True)
        for milliseconds, name in numbers["top"][:5]:
            print(f"      {milliseconds:8.2f} ms  {name}", flush=True)


if __name__ == "__main__":  # a stored trace read again: python -m benchmarks.timeline TRACE.json.gz
    import sys

    print_summary(summarise(load(Path(sys.argv[1]))), sys.argv[1])
