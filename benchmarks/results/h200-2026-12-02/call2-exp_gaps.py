"""Where the served vision pass's time goes between kernels: one 16-page Gundam pass, compiled blocks replayed as
CUDA graphs (the engine's way), traced with torch.profiler; gaps between consecutive kernels by the kernel before
and after them, memsets and what precedes them. Exploration, not a benchmark."""
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import torch  # noqa: E402

import bench_vision as bv  # noqa: E402
from benchmarks.common import MODEL_CLASSES, MODEL_PRESETS, PROMPT, a4_page, default_checkpoint, random_checkpoint  # noqa: E402
from ocr_service.presets import Resolution  # noqa: E402
from ocr_service.vision import Preprocessor, views_for_towers  # noqa: E402
from ocr_service.vision_compile import compile_vision_towers  # noqa: E402
from ocr_service.vision_graphs import GraphedTowers  # noqa: E402

out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp")
checkpoint = default_checkpoint("ocr")
random_checkpoint(checkpoint, "full", "ocr")
from transformers import PreTrainedTokenizerFast  # noqa: E402

model = MODEL_CLASSES["ocr"].from_pretrained(str(checkpoint), dtype=bv.DTYPE).to("cuda").eval()
tokenizer = PreTrainedTokenizerFast.from_pretrained(str(checkpoint))
pages = 16
preprocessor = Preprocessor(model, tokenizer, 1)
gundam = Resolution(*MODEL_PRESETS["ocr"]["Gundam"])
prompts = [preprocessor._prepare(a4_page(seed=i % 8), PROMPT, gundam) for i in range(pages)]
groups = {1024: torch.cat([p.images[0].global_view[None] for p in prompts]).cuda(),
          640: torch.cat([p.images[0].tiles for p in prompts]).cuda()}
groups = {size: views_for_towers(model, pixels) for size, pixels in groups.items()}
inner = model.model
sam = inner.sam_model
sam.use_relative_positions("folded")
sam.use_relative_attention_kernel(True, any_grid=True, terms_in_kernel=True)
sam.use_gelu("epilogue")
torch.backends.cuda.enable_cudnn_sdp(False)
compile_vision_towers(model, sides=list(groups))
towers = GraphedTowers(model, {size: views.shape[0] for size, views in groups.items()})
report = {}
with torch.inference_mode():
    towers.capture()

    def graphed():
        return [towers(pixels) for pixels in groups.values()]

    def compiled():
        return [inner.encode_views(pixels) for pixels in groups.values()]

    for name, fn in (("graphed", graphed), ("compiled", compiled)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        seconds = bv.timed(fn)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            fn()
            torch.cuda.synchronize()
        trace = out_dir / f"trace-{name}.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
        kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset",
                                                                                         "gpu_memcpy")),
                         key=lambda e: e["ts"])
        span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
        busy = sum(e["dur"] for e in kernels)
        gaps_after, gaps_before, pairs = defaultdict(float), defaultdict(float), defaultdict(float)
        sizes = Counter()
        memset_prev = Counter()
        for a, b in zip(kernels, kernels[1:]):
            gap = max(0.0, b["ts"] - (a["ts"] + a["dur"]))
            an, bn = a["name"][:70], b["name"][:70]
            gaps_after[an] += gap
            gaps_before[bn] += gap
            pairs[(an, bn)] += gap
            sizes[min(int(gap), 50)] += 1
            if b.get("cat") == "gpu_memset" or "Memset" in b["name"]:
                memset_prev[an] += 1
        row = {"ms_per_page": seconds / pages * 1e3, "span_ms": span / 1e3, "busy_ms": busy / 1e3,
               "kernels": len(kernels),
               "gap_ms": (span - busy) / 1e3,
               "gaps_after": sorted(((k, round(v / 1e3, 3)) for k, v in gaps_after.items()), key=lambda x: -x[1])[:25],
               "gaps_before": sorted(((k, round(v / 1e3, 3)) for k, v in gaps_before.items()), key=lambda x: -x[1])[:25],
               "pairs": sorted(((f"{k[0]} -> {k[1]}", round(v / 1e3, 3)) for k, v in pairs.items()), key=lambda x: -x[1])[:25],
               "gap_us_histogram": sorted(sizes.items()),
               "memset_after": memset_prev.most_common(15),
               "memset_sizes": Counter(json.dumps(e.get("args", {}).get("bytes", e.get("args", {}))) for e in kernels
                                       if "emset" in e["name"]).most_common(10)}
        report[name] = row
        print(name, json.dumps(row, indent=1), flush=True)
        # CPU-side ops that launched memsets (compiled path): operator names around them
        if name == "compiled":
            ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
            zeroing = Counter(e["name"] for e in ops if e["name"] in ("aten::zero_", "aten::zeros", "aten::fill_",
                                                                      "aten::new_zeros"))
            report["zeroing_ops"] = zeroing.most_common()
            print("zeroing ops", zeroing.most_common(), flush=True)
(out_dir / "gaps.json").write_text(json.dumps(report, indent=1))
