"""A 16-page Gundam pass's overheads, variant by variant, alternating rounds on the same pages:

served      encode_prompts with the engine's GraphedTowers (every size's uploads queued first; tiles 64 + 32)
lazy        each size's upload queued just before its towers (the next size's copies launched after them)
exact       lazy, and each size one graph of exactly its views (16 globals, 96 tiles), one shared pool
parallel    exact, the two sizes on two streams at once (a pool and a capture stream each)
gpu_cat     parallel, the views already on the GPU (one cat a size instead of a copy a page)

Also: each graph's pool memory, the bits of each variant against served.
"""
import json
import os
import sys
from pathlib import Path

REPO = Path.cwd()
sys.path.insert(0, str(REPO))
import torch  # noqa: E402

from benchmarks.bench_engine import GUNDAM  # noqa: E402
from benchmarks.bench_vision import pass_seconds  # noqa: E402
from benchmarks.common import PROMPT, a4_page, default_checkpoint, random_checkpoint, sync  # noqa: E402
from ocr_service.engine import OCREngine  # noqa: E402
from ocr_service.settings import Settings  # noqa: E402
from ocr_service.vision import _ids_and_image_positions, encode_prompts, views_for_towers  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/exp-out"))
OUT.mkdir(parents=True, exist_ok=True)
results = {}


def note(key, value):
    results[key] = value
    print(key, json.dumps(value), flush=True)
    (OUT / "exp_pass2.json").write_text(json.dumps(results, indent=1))


def median(xs):
    return sorted(xs)[len(xs) // 2]


ckpt = default_checkpoint("ocr")
random_checkpoint(ckpt, size="full", model="ocr")
engine = OCREngine(ckpt, Settings.from_env().replace(stop_loops=False), ignore_eos=True)
model, towers = engine.model, engine.server.towers
inner = model.model
pre = engine.server.preprocessor
gundam = engine.resolution(GUNDAM)
PAGES = 16
prompts = [pre._prepare(a4_page(seed=i % 8), PROMPT, gundam) for i in range(PAGES)]
device = torch.device("cuda")


class ExactGraphs:
    """One graph a size of exactly `count` views, its own pool and capture stream (so that two may run at once)."""

    def __init__(self, counts: dict):
        self.graphs = {}
        for side, count in counts.items():
            before = torch.cuda.memory_reserved()
            stream = torch.cuda.Stream()
            buffer = torch.zeros(count, 3, side, side, device=device, dtype=inner.vision_dtype)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                inner.encode_views(buffer)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                output = inner.encode_views(buffer)
            sync()
            torch.cuda.empty_cache()
            self.graphs[side] = (graph, buffer, output)
            note(f"pool_gib_{side}x{count}", round((torch.cuda.memory_reserved() - before) / 2**30, 3))

    def __call__(self, views):
        graph, buffer, output = self.graphs[views.shape[-1]]
        assert views.shape[0] == buffer.shape[0]
        buffer.copy_(views)
        graph.replay()
        return output.clone()


STREAMS = {}


def encode(prompts, towers_fn, lazy=True, parallel=False):
    """encode_prompts' work for one call a size, its uploads lazy or not, its sizes on streams of their own or not."""
    groups = {}
    for p, prompt in enumerate(prompts):
        for i, views in enumerate(prompt.images):
            groups.setdefault(views.global_view.shape[-1], []).append(((p, i, "global"), views.global_view[None]))
            if views.has_tiles:
                groups.setdefault(views.tiles.shape[-1], []).append(((p, i, "tiles"), views.tiles))
    main = torch.cuda.current_stream()
    upload = STREAMS.setdefault("upload", torch.cuda.Stream())
    upload.wait_stream(main)
    features, done = {}, []

    def queue_upload(members):
        first = members[0][1]
        if first.is_cuda:  # already there: one cat
            return torch.cat([v for _, v in members]), None
        pixels = torch.empty((sum(v.shape[0] for _, v in members), *first.shape[1:]), dtype=first.dtype, device=device)
        with torch.cuda.stream(upload):
            start = 0
            for _, v in members:
                pixels[start:start + v.shape[0]].copy_(v, non_blocking=True)
                start += v.shape[0]
            return pixels, upload.record_event()

    uploads = {} if lazy else {size: queue_upload(m) for size, m in groups.items()}
    for n, (size, members) in enumerate(groups.items()):
        pixels, event = uploads[size] if size in uploads else queue_upload(members)
        stream = STREAMS.setdefault(("side", n), torch.cuda.Stream()) if parallel else main
        if parallel:
            stream.wait_stream(main)
        with torch.cuda.stream(stream):
            if event is not None:
                stream.wait_event(event)
            encoded = towers_fn(views_for_towers(model, pixels))
        if parallel:
            done.append(stream)
        start = 0
        for key, views in members:
            features[key] = encoded[start:start + views.shape[0]]
            start += views.shape[0]
    for stream in done:
        main.wait_stream(stream)
    ids, positions = _ids_and_image_positions(prompts, pin=True)
    ids, positions = ids.to(device, non_blocking=True), positions.to(device, non_blocking=True)
    embeds = inner.embed_tokens(ids)
    arranged = [inner.arrange_image(views, features[(p, i, "global")][0], features.get((p, i, "tiles")))
                for p, prompt in enumerate(prompts) for i, views in enumerate(prompt.images)]
    embeds.index_copy_(0, positions, torch.cat(arranged).to(embeds.dtype))
    return list(embeds.split([int(prompt.input_ids.numel()) for prompt in prompts]))


with torch.inference_mode():
    exact = ExactGraphs({1024: PAGES, 640: 6 * PAGES})
    import copy
    on_gpu = []
    for p in prompts:
        q = copy.copy(p)
        q.images = [copy.copy(v) for v in p.images]
        for v in q.images:
            v.global_view = v.global_view.cuda()
            v.tiles = v.tiles.cuda()
        on_gpu.append(q)
    variants = {
        "served": lambda: encode_prompts(model, prompts, towers=towers),
        "served_graphs_own_encode": lambda: encode(prompts, towers, lazy=False),
        "lazy": lambda: encode(prompts, towers, lazy=True),
        "exact": lambda: encode(prompts, exact, lazy=True),
        "parallel": lambda: encode(prompts, exact, lazy=True, parallel=True),
        "parallel_served_graphs": None,  # (the served graphs share one pool: not run at once)
        "gpu_cat": lambda: encode(on_gpu, exact, lazy=True, parallel=True),
        "gpu_cat_serial": lambda: encode(on_gpu, exact, lazy=True, parallel=False),
    }
    variants = {k: v for k, v in variants.items() if v is not None}
    reference = torch.cat(variants["served"]())
    bits = {}
    for name, fn in variants.items():
        out = torch.cat(fn())
        sync()
        bits[name] = {"same": bool(torch.equal(out, reference)),
                      "max_abs": float((out.float() - reference.float()).abs().max())}
    note("bits_against_served", bits)
    walls = {name: [] for name in variants}
    for _ in range(6):
        for name, fn in variants.items():
            walls[name] += [s / PAGES * 1e3 for s in pass_seconds(fn, 3)]
    note("ms_per_page", {name: {"median": round(median(w), 3), "min": round(min(w), 3),
                                "all": [round(x, 3) for x in w]} for name, w in walls.items()})

    # graph timings alone: exact graphs serially and at once
    def replay_ms(fn, reps=10):
        fn()
        sync()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        return round(median(times), 3)

    g1, g2 = exact.graphs[1024][0], exact.graphs[640][0]
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def both_at_once():
        main = torch.cuda.current_stream()
        s1.wait_stream(main)
        s2.wait_stream(main)
        with torch.cuda.stream(s1):
            g1.replay()
        with torch.cuda.stream(s2):
            g2.replay()
        main.wait_stream(s1)
        main.wait_stream(s2)

    note("graphs_ms", {"1024x16": replay_ms(g1.replay), "640x96": replay_ms(g2.replay),
                       "serial": replay_ms(lambda: (g1.replay(), g2.replay())), "at_once": replay_ms(both_at_once)})
    note("memory_gib", {"allocated": round(torch.cuda.memory_allocated() / 2**30, 2),
                        "reserved": round(torch.cuda.memory_reserved() / 2**30, 2)})
