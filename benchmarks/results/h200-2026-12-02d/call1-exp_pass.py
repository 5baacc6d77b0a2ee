"""Where a served vision pass's wall time goes beyond its kernels, and what pass shapes cost.

1. the served pass (encode_prompts with the engine's graphed towers) of 8/16/24/32 pages, ms a page
2. the same 16 pages with their views already on the GPU (the upload's exposed share)
3. each graph replayed alone (1024 × 16, 640 × 64, 640 × 32): ms a view
4. a graph of exactly 96 tiles beside 64 + 32
5. one 16-page pass traced: host start → first GPU work, upload copies, first kernel → last, idle, the end
"""
import json
import os
import sys
import time
from pathlib import Path

REPO = Path.cwd()
sys.path.insert(0, str(REPO))
import torch  # noqa: E402

from benchmarks.bench_engine import GUNDAM  # noqa: E402
from benchmarks.bench_vision import pass_seconds  # noqa: E402
from benchmarks.common import PROMPT, a4_page, default_checkpoint, random_checkpoint, sync  # noqa: E402
from ocr_service.engine import OCREngine  # noqa: E402
from ocr_service.settings import Settings  # noqa: E402
from ocr_service.vision import encode_prompts, views_for_towers  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/exp-out"))
OUT.mkdir(parents=True, exist_ok=True)
results = {}


def note(key, value):
    results[key] = value
    print(key, json.dumps(value), flush=True)
    (OUT / "exp_pass.json").write_text(json.dumps(results, indent=1))


def median(xs):
    return sorted(xs)[len(xs) // 2]


ckpt = default_checkpoint("ocr")
random_checkpoint(ckpt, size="full", model="ocr")
engine = OCREngine(ckpt, Settings.from_env().replace(stop_loops=False), ignore_eos=True)
model, towers = engine.model, engine.server.towers
pre = engine.server.preprocessor
gundam = engine.resolution(GUNDAM)
prompts = [pre._prepare(a4_page(seed=i % 8), PROMPT, gundam) for i in range(32)]
print("graphs", sorted(towers.graphs), "largest", towers.largest, flush=True)

with torch.inference_mode():
    # 1. pass sizes, alternating rounds
    sizes = (8, 16, 24, 32)
    walls = {n: [] for n in sizes}
    for _ in range(3):
        for n in sizes:
            walls[n] += [s / n * 1e3 for s in pass_seconds(lambda: encode_prompts(model, prompts[:n], towers=towers), 3)]
    note("served_pass_ms_per_page", {n: {"median": round(median(w), 3), "all": [round(x, 3) for x in w]}
                                     for n, w in walls.items()})

    # 2. views already on the GPU
    import copy
    on_gpu = []
    for p in prompts[:16]:
        q = copy.copy(p)
        q.images = [copy.copy(v) for v in p.images]
        for v in q.images:
            v.global_view = v.global_view.cuda()
            if v.has_tiles:
                v.tiles = v.tiles.cuda()
        on_gpu.append(q)
    a, b = [], []
    for _ in range(3):
        a += pass_seconds(lambda: encode_prompts(model, prompts[:16], towers=towers), 3)
        b += pass_seconds(lambda: encode_prompts(model, on_gpu, towers=towers), 3)
    note("upload_exposed", {"host_views_ms_per_page": round(median(a) / 16 * 1e3, 3),
                            "gpu_views_ms_per_page": round(median(b) / 16 * 1e3, 3)})

    # 3. each graph alone, and the towers call as served
    def graph_ms(side, count, reps=10):
        graph, _ = towers.graphs[side, count]
        graph.replay()
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return median(times)

    per_view = {}
    for side, count in sorted(towers.graphs):
        if count >= 8:
            ms = graph_ms(side, count)
            per_view[f"{side}x{count}"] = {"ms": round(ms, 3), "ms_per_view": round(ms / count, 4)}
    note("graphs_alone", per_view)

    # 4. a graph of exactly 96 tiles
    views96 = views_for_towers(model, torch.cat([p.images[0].tiles for p in prompts[:16]]).cuda())
    served = []
    for _ in range(10):
        served += pass_seconds(lambda: towers(views96), 1)
    buffer = torch.zeros(96, 3, 640, 640, device="cuda", dtype=views96.dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model.model.encode_views(buffer)
    stream.synchronize()
    graph96 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph96, stream=stream):
        out96 = model.model.encode_views(buffer)
    sync()

    def run96():
        buffer.copy_(views96)
        graph96.replay()
        return out96.clone()

    exact = []
    for _ in range(10):
        exact += pass_seconds(run96, 1)
    same = torch.equal(run96(), towers(views96))
    note("tiles96", {"served_64_32_ms": round(median(served) * 1e3, 3), "one_graph_96_ms": round(median(exact) * 1e3, 3),
                     "same_bits": bool(same)})
    del graph96, out96, buffer
    torch.cuda.empty_cache()

    # 5. a traced pass
    from torch.profiler import ProfilerActivity, profile, record_function
    encode_prompts(model, prompts[:16], towers=towers)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            with record_function("PASS"):
                encode_prompts(model, prompts[:16], towers=towers)
                sync()
    trace = OUT / "exp_pass_trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    passes = sorted([e for e in events if e.get("name") == "PASS" and e.get("ph") == "X"], key=lambda e: e["ts"])
    gpu = sorted([e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")],
                 key=lambda e: e["ts"])
    report = []
    for p in passes:
        t0, t1 = p["ts"], p["ts"] + p["dur"]
        inside = [e for e in gpu if t0 <= e["ts"] <= t1]
        kernels = [e for e in inside if e["cat"] == "kernel"]
        copies = [e for e in inside if e["cat"] == "gpu_memcpy"]
        sets = [e for e in inside if e["cat"] == "gpu_memset"]
        busy, last_end, idle, gaps = 0.0, None, 0.0, []
        for e in inside:
            if last_end is not None and e["ts"] > last_end:
                gap = e["ts"] - last_end
                idle += gap
                if gap > 15:
                    gaps.append((round(gap, 1), prev["name"][:60], e["name"][:60]))
            end = e["ts"] + e["dur"]
            if last_end is None or end > last_end:
                last_end, prev = end, e
        first_kernel = kernels[0]["ts"] if kernels else None
        report.append({
            "host_ms": round(p["dur"] / 1e3, 3),
            "host_start_to_first_gpu_ms": round((inside[0]["ts"] - t0) / 1e3, 3),
            "host_start_to_first_kernel_ms": round((first_kernel - t0) / 1e3, 3),
            "first_to_last_gpu_ms": round((last_end - inside[0]["ts"]) / 1e3, 3),
            "last_gpu_to_host_end_ms": round((t1 - last_end) / 1e3, 3),
            "kernel_ms": round(sum(e["dur"] for e in kernels) / 1e3, 3), "kernels": len(kernels),
            "memcpy": [(e["name"][:40], round(e["dur"] / 1e3, 3), round((e["ts"] - t0) / 1e3, 3)) for e in copies],
            "memsets": len(sets), "memset_ms": round(sum(e["dur"] for e in sets) / 1e3, 3),
            "idle_ms": round(idle / 1e3, 3), "gaps_over_15us": gaps[:40],
            "last_kernels": [(e["name"][:60], round(e["dur"] / 1e3, 3)) for e in kernels[-12:]],
        })
    note("trace", report)
    trace.unlink()
