"""benchmarks/timeline.py reads a profiler trace by stream and by engine stage: a trace written here by hand
(two threads, their stage ranges, kernel launches and the kernels on two streams) gives the times that can be
counted on paper; and the real profiler, run on the engine's ranges on the CPU, gives a trace it reads."""

import time

import torch
from pytest import approx

from benchmarks.timeline import profile_window, summarise
from ocr_service.vision import DECODE_RANGE, PREFILL_RANGE, VISION_RANGE

SERVING, VISION = 11, 22  # thread ids
DECODE_STREAM, VISION_STREAM = 7, 9


def stage(tid, name, start, end):
    return {"ph": "X", "cat": "user_annotation", "name": name, "tid": tid, "ts": start, "dur": end - start}


def launch(tid, at, correlation):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": tid, "ts": at, "dur": 1,
            "args": {"correlation": correlation}}


def kernel(stream, start, end, correlation, name="k"):
    return {"ph": "X", "cat": "kernel", "name": name, "tid": stream, "ts": start, "dur": end - start,
            "args": {"stream": stream, "correlation": correlation}}


def test_a_trace_written_by_hand_reads_as_counted_on_paper():
    # µs: a decode range 0-1000 launching a kernel that runs 100-600; a prefill range 1000-3000 launching
    # 1200-1500; a vision pass 1000-4000 on its own thread launching 1400-2400 (beside the prefill's kernel
    # for 100) and 3000-3500; a kernel the serving thread launched outside its ranges runs 3900-4000.
    events = [
        stage(SERVING, DECODE_RANGE, 0, 1000), stage(SERVING, PREFILL_RANGE, 1000, 3000),
        stage(VISION, VISION_RANGE, 1000, 4000),
        launch(SERVING, 50, 1), kernel(DECODE_STREAM, 100, 600, 1, "decode step"),
        launch(SERVING, 1100, 2), kernel(DECODE_STREAM, 1200, 1500, 2, "prefill"),
        launch(VISION, 1150, 3), kernel(VISION_STREAM, 1400, 2400, 3, "tower"),
        launch(VISION, 2900, 4), kernel(VISION_STREAM, 3000, 3500, 4, "tower"),
        launch(SERVING, 3100, 5), kernel(DECODE_STREAM, 3900, 4000, 5, "after the prefill"),  # outside any range
    ]
    summary = summarise({"traceEvents": events})
    assert summary["window_ms"] == approx(4.0)
    assert summary["gpu_busy_ms"] == approx(2.3)  # 100-600, 1200-2400, 3000-3500, 3900-4000
    assert summary["gpu_idle_ms"] == approx(1.7)
    assert summary["streams"][str(DECODE_STREAM)] == {"kernels": 3, "busy_ms": approx(0.9)}
    assert summary["streams"][str(VISION_STREAM)] == {"kernels": 2, "busy_ms": approx(1.5)}
    stages = summary["stages"]
    assert stages[DECODE_RANGE]["kernel_ms"] == approx(0.5) and stages[PREFILL_RANGE]["kernel_ms"] == approx(0.3)
    assert stages[VISION_RANGE]["kernel_ms"] == approx(1.5) and stages["other"]["kernel_ms"] == approx(0.1)
    assert summary["vision_with_serving_ms"] == approx(0.1)  # the tower's 1400-1500 beside the prefill's kernel
    prefill = stages[PREFILL_RANGE]
    assert prefill["ranges"] == 1 and prefill["range_wall_ms"] == approx(2.0)
    assert prefill["vision_during_ms"] == approx(1.0) and prefill["gpu_busy_during_ms"] == approx(1.2)
    # the idle stretches between kernels, each where its middle falls: 600-1200 (900: the decode's range),
    # 2400-3000 (the prefill's and the pass's), 3500-3900 (the pass's)
    assert summary["gpu_idle_ms_by_open_stages"] == {DECODE_RANGE: 0.6, f"{PREFILL_RANGE}+{VISION_RANGE}": 0.6,
                                                     VISION_RANGE: 0.4}


def test_a_gap_is_counted_where_its_middle_falls():
    events = [stage(SERVING, DECODE_RANGE, 0, 1000), stage(SERVING, PREFILL_RANGE, 1000, 3000),
              launch(SERVING, 0, 1), kernel(DECODE_STREAM, 0, 100, 1), launch(SERVING, 1000, 2),
              kernel(DECODE_STREAM, 1500, 1600, 2)]
    summary = summarise({"traceEvents": events})
    assert summary["gpu_idle_ms_by_open_stages"] == {DECODE_RANGE: 1.4}  # 100-1500, its middle at 800


def test_the_profiler_window_of_a_cpu_job_sees_the_engine_ranges(tmp_path):
    def job(started):
        started()
        for name in (VISION_RANGE, PREFILL_RANGE, DECODE_RANGE) * 4:
            with torch.profiler.record_function(name):
                torch.ones(256, 256) @ torch.ones(256, 256)
                time.sleep(0.02)
        return "done"

    summary = profile_window(job, 0.0, 0.15, tmp_path / "trace.json.gz")
    assert summary["job"] == "done" and (tmp_path / "trace.json.gz").exists()
    assert summary["gpu_busy_ms"] == 0  # no GPU here
    opened = {name for name, numbers in summary["stages"].items() if numbers.get("ranges")}
    assert opened and opened <= {VISION_RANGE, PREFILL_RANGE, DECODE_RANGE}
