"""The vision encoder and the prefill, alone on the GPU, beside their floors: which way of running the
towers is fastest, and where the prefill's time goes. `--model ocr2` runs DeepSeek-OCR 2 (SAM, then the Qwen2
encoder under its prefix-LM mask, then the projector; its Gundam mode: a 1024 global view and 768 tiles);
`--size tiny` runs the script on a tiny checkpoint on the CPU (a smoke test).

Floors come from this GPU's own ceilings, measured at the start (a large bf16 matrix product and a
device-to-device copy), and from the work counted: the towers' FLOPs with `torch.utils.flop_counter`
on one page's views, the prefill's from the decoder's shapes.

Vision variants, each on the views of 16 A4 pages (Gundam: 16 global 1024 views and 96 tiles, of 640 for
the first model, of 768 for OCR 2):
- materialised: SAM's relative positions as a dense bias passed to SDPA (the original's order), eager;
- folded: the relative positions folded into the attention kernel (`folded_relative_attention`), eager;
- folded, CUDA graphs: the same replayed as the engine replays them (`GraphedTowers`: graphs of powers of two
  of views, captured at the first call, whose seconds are in "first call");
- folded, compiled blocks (served): the towers' repeated blocks compiled as the engine compiles them at load
  (`DEEPSEEK_OCR_VISION=compiled`, `ocr_service/vision_compile.py`; "first call" is the compile's seconds),
  and those replayed as CUDA graphs, the engine's default (`DEEPSEEK_OCR_VISION_GRAPHS`);
- folded, compiled: `torch.compile` of the whole towers, with --compile (compile time reported).
Each variant's features are compared with the materialised path's and with a float32 run of the towers.

With --profile FOLDER, kernel tables (torch.profiler, top kernels by CUDA time; CPU time on the CPU) of the
folded eager vision pass on 4 pages' views (profile_vision_folded.txt) and of one prefill (profile_prefill.txt).

On the device machine (see benchmarks/device.sh):
    python benchmarks/bench_vision.py --json $OUT/vision.json
    python benchmarks/bench_vision.py --model ocr2 --profile $OUT/ocr2 --json $OUT/vision-ocr2.json
"""

import argparse
import copy
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    MODEL_CLASSES, MODEL_PRESETS, PROMPT, STAGE_TWO_ENCODERS, a4_page, default_checkpoint, device_name, peak_gib,
    random_checkpoint, reset_peak, sync,
)
from benchmarks.ceilings import measure_ceilings, median_ms  # noqa: E402
from checkpoints.generation import LOOP_STOP_OFF, SERVING_NO_REPEAT_RULE  # noqa: E402
from ocr_service.decode_batch import DecodeBatch, Entry  # noqa: E402
from ocr_service.presets import Resolution  # noqa: E402
from ocr_service.vision import Preprocessor, views_for_towers  # noqa: E402
from ocr_service.vision_compile import (  # noqa: E402
    attention_backends_kept, compile_vision_towers, uncompile_vision_towers,
)
from ocr_service.vision_graphs import GraphedTowers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU for a smoke run (--size tiny)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def pass_seconds(fn, repeats: int) -> list:
    """Seconds of each of `repeats` calls of `fn()` (synchronised), after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return times


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of `fn()` (synchronised), after one warm-up call."""
    times = pass_seconds(fn, repeats)
    return sorted(times)[len(times) // 2]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def kernel_table(fn, out: Path, row_limit: int) -> str:
    """`fn()` once under torch.profiler: its kernels by total CUDA time (operators by CPU time on the CPU),
    written to `out`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = DEVICE == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=row_limit)
    out.write_text(table)
    return table


def vision_flops(model, views: list) -> float:
    """The towers' arithmetic on `views`: the original's (`flops_by_kind`), whatever kernels serve them (the
    folded path's widened attention does more, and the counter sees neither the Triton kernel nor cuDNN's)."""
    return sum(flops_by_kind(model, views).values())


def vision_variants(model, model_name: str, tokenizer, pages: int, chunks: dict, compile_too: bool,
                    profile_out: Path = None, steps: tuple = ("variants",), ceilings: dict = None,
                    trials: list = ()) -> dict:
    preprocessor = Preprocessor(model, tokenizer, 1)
    gundam = Resolution(*MODEL_PRESETS[model_name]["Gundam"])
    prompts = [preprocessor._prepare(a4_page(seed=i % 8), PROMPT, gundam) for i in range(pages)]
    global_size, tile_size = gundam.base_size, prompts[0].images[0].tiles.shape[-1]
    groups = {global_size: torch.cat([p.images[0].global_view[None] for p in prompts]).to(DEVICE),
              tile_size: torch.cat([p.images[0].tiles for p in prompts]).to(DEVICE)}
    groups = {size: views_for_towers(model, pixels) for size, pixels in groups.items()}  # normalised, as served
    inner = model.model
    stage_two_name, compose = STAGE_TWO_ENCODERS[model_name]
    one_page = [groups[global_size][:1], groups[tile_size][:groups[tile_size].shape[0] // pages]]
    work = flops_by_kind(model, one_page)
    flops = sum(work.values())

    def graphed(encode_chunks_of):
        """The towers as the engine replays them (`GraphedTowers`), captured at the first call for calls of
        `encode_chunks_of(size)` views."""
        towers = None

        def encode(pixels):
            nonlocal towers
            if towers is None:
                towers = GraphedTowers(model, {size: min(encode_chunks_of(size), views.shape[0])
                                               for size, views in groups.items()})
                towers.capture()
            return towers(pixels)
        return encode

    def run(encode, chunk_of):
        out = {}
        for size, pixels in groups.items():
            step = chunk_of(size)
            out[size] = torch.cat([encode(pixels[s:s + step]) for s in range(0, pixels.shape[0], step)])
        return out

    results = {"flops_per_page": flops}
    with torch.inference_mode():
        # float32 reference of the towers (materialised bias, no autocast)
        sam32, stage_two32, proj32 = (copy.deepcopy(m).float() for m in (inner.sam_model,
                                                                           getattr(inner, stage_two_name),
                                                                           inner.projector))
        sam32.use_relative_positions("materialised")
        reference32 = {size: torch.cat([compose(sam32, stage_two32, proj32, pixels[s:s + 4].float())
                                        for s in range(0, pixels.shape[0], 4)]) for size, pixels in groups.items()}
        del sam32, stage_two32, proj32
        if "variants" not in steps:  # the served path's trials and attention options only
            inner.sam_model.use_relative_positions("materialised")
            base = {size: inner.encode_views(pixels) for size, pixels in groups.items()}
            inner.sam_model.use_relative_positions("folded")
            if "attention-options" in steps and DEVICE == "cuda":
                results["attention_options"] = attention_options(model, groups, pages, ceilings)
            if "gelu" in steps and DEVICE == "cuda":
                results["gelu_options"] = gelu_options(model, groups, ceilings)
            if "served-trials" in steps:
                results["served_trials"] = served_trials(model, groups, pages, reference32, base, work, ceilings,
                                                         list(trials))
            return results
        today = lambda size: max(1, 4 * 1024 * 1024 // (size * size))  # noqa: E731  the engine's PASS_PIXELS
        variants = [("materialised, eager", False, inner.encode_views, today)]
        for name, chunk in chunks.items():
            variants.append((f"folded, eager, {name}", True, inner.encode_views, chunk))
        if DEVICE == "cuda":
            for name, chunk in chunks.items():
                variants.append((f"folded, CUDA graphs, {name}", True, graphed(chunk), chunk))
        base = None

        def record(name: str, out: dict, seconds: float, first_s: float, **extra) -> None:
            """A variant's row: its time a page, and its features' distance from the dense-bias path and float32."""
            row = {"ms_per_page": seconds / pages * 1e3, "first_call_s": first_s, **extra,
                   "peak_gib": peak_gib("allocated"),
                   "vs_materialised": max(relative_error(out[s], base[s]) for s in out),
                   "vs_float32": max(relative_error(out[s], reference32[s]) for s in out)}
            results[name] = row
            print(name, json.dumps(row), flush=True)

        def measure(name: str, encode, chunk_of) -> None:
            """One variant timed (its first call apart: it captures the graphs, if any) and recorded."""
            nonlocal base
            reset_peak()
            started = time.perf_counter()
            out = run(encode, chunk_of)
            sync()
            first_s = time.perf_counter() - started
            seconds = timed(lambda: run(encode, chunk_of))
            if base is None:
                base = out
            record(name, out, seconds, first_s)

        for name, folded, encode, chunk_of in variants:
            inner.sam_model.use_relative_positions("folded" if folded else "materialised")
            measure(name, encode, chunk_of)
        variants.clear()  # the graphs' memory
        model.model.sam_model.use_relative_positions("folded")
        compiled_table = ""
        try:  # the served path (DEEPSEEK_OCR_VISION=compiled): the towers' blocks compiled, as the engine does
            compiled_report = compile_vision_towers(model, backend="inductor" if DEVICE == "cuda" else "eager")
            for name, chunk in chunks.items():
                reset_peak()
                out = run(inner.encode_views, chunk)
                seconds = timed(lambda: run(inner.encode_views, chunk))
                record(f"folded, compiled blocks (served), {name}", out, seconds, compiled_report["seconds"],
                       graphs=compiled_report["graphs"])
            if DEVICE == "cuda":  # and replayed as CUDA graphs, as the engine does by default
                chunk = chunks["one pass per view size"]
                measure("folded, compiled blocks, CUDA graphs (served), one pass per view size", graphed(chunk), chunk)
            if profile_out is not None:
                compiled_table = kernel_table(lambda: run(inner.encode_views, chunks["one pass per view size"]),
                                              profile_out.with_name("profile_vision_compiled.txt"), 25)
        except Exception as error:  # report and go on: the other variants stand
            results["compiled_blocks_error"] = repr(error)[:500]
            print("compiling the blocks failed:", traceback.format_exc()[-6000:], flush=True)
        uncompile_vision_towers(model)
        torch.compiler.set_stance("default")
        if compiled_table:
            print(f"profile of the compiled vision pass, {pages} pages' views:\n{compiled_table[:6000]}", flush=True)
        try:
            if not compile_too or DEVICE != "cuda":
                raise RuntimeError("compiled variant not asked for (--compile, CUDA only)")
            # Dynamic in the number of views: one compilation per view size serves every pass size.
            compiled = torch.compile(inner.encode_views, dynamic=True)
            for size, pixels in groups.items():
                for views in sorted({pixels.shape[0], max(1, pixels.shape[0] // 2), max(1, pixels.shape[0] // 5)},
                                    reverse=True):
                    started = time.perf_counter()
                    out = compiled(pixels[:views])
                    sync()
                    first_s = time.perf_counter() - started
                    seconds = timed(lambda: compiled(pixels[:views]))
                    eager = timed(lambda: inner.encode_views(pixels[:views]))
                    row = {"views": views, "size": size, "first_call_s": first_s, "compiled_ms": seconds * 1e3,
                           "eager_ms": eager * 1e3,
                           "vs_materialised": relative_error(out, base[size][:views]),
                           "vs_float32": relative_error(out, reference32[size][:views])}
                    results[f"compiled dynamic, {views} views of {size}"] = row
                    print("compiled dynamic", json.dumps(row), flush=True)
        except Exception as error:  # report and go on: the other variants stand
            results["compiled_error"] = repr(error)[:500]
            print("compile failed:", repr(error)[:500], flush=True)
        if profile_out is not None:
            profiled_pages = max(1, pages // 4)

            def four_pages():
                for pixels in groups.values():
                    inner.encode_views(pixels[:pixels.shape[0] // pages * profiled_pages])

            table = kernel_table(four_pages, profile_out, 25)
            print(f"profile of the folded eager vision pass, {profiled_pages} pages' views:\n{table[:6000]}",
                  flush=True)
        materialised32 = relative_error(base[global_size], reference32[global_size])
        results["materialised_vs_float32_global"] = materialised32
    return results


KERNEL_KINDS = (  # (kind, test on a kernel's name), first match wins: Inductor's fused kernels are named after
    # the operators they absorbed (an attention's operand layout among them), so they are tested first
    ("fused element-wise (Inductor, reductions)", lambda name: name.startswith("triton_red") or name.startswith("triton_per")),
    ("fused element-wise (Inductor, pointwise)", lambda name: name.startswith("triton_")),
    ("attention", lambda name: any(key in name.lower() for key in ("flash", "fmha", "sdpa", "attention"))),
    ("matrix products", lambda name: any(key in name.lower() for key in ("nvjet", "gemm", "cutlass", "xmma", "cublas"))),
    ("convolutions", lambda name: "conv" in name.lower()),
)


def kernel_kinds(fn, top: int = 40) -> dict:
    """`fn()` once under torch.profiler: {"kinds": CUDA ms by kind of kernel (KERNEL_KINDS, the rest
    "other (PyTorch element-wise, copies)"), "top": the `top` longest kernels by full name, ms and calls}."""
    from torch.profiler import ProfilerActivity, profile

    cuda = DEVICE == "cuda"  # on the CPU (a smoke run): the operators' own CPU time
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    kinds, kernels = {}, {}
    for event in prof.events():
        if cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = (event.device_time_total if cuda else event.self_cpu_time_total) / 1e3
        kind = next((k for k, test in KERNEL_KINDS if test(event.name)), "other (PyTorch element-wise, copies)")
        kinds[kind] = kinds.get(kind, 0.0) + ms
        total, calls = kernels.get(event.name, (0.0, 0))
        kernels[event.name] = (total + ms, calls + 1)
    longest = sorted(kernels.items(), key=lambda item: -item[1][0])[:top]
    return {"kinds": kinds, "top": [{"name": name[:160], "ms": ms, "calls": calls} for name, (ms, calls) in longest]}


def flops_by_kind(model, views: list) -> dict:
    """One page's work counted by `torch.utils.flop_counter` on the original's order (SAM's attention over its
    head dimension, the relative positions as a bias): {"matrix products", "attention"} in FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    sam = model.model.sam_model
    folded = [block.attn.fold_relative_positions for block in sam.blocks]
    sam.use_relative_positions("materialised")
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.inference_mode():
            for pixels in views:
                model.model.encode_views(pixels)
    finally:
        sam.use_relative_positions("folded" if all(folded) else "materialised")
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(count for op, count in by_op.items() if "attention" in str(op))
    return {"matrix products": float(counter.get_total_flops() - attention), "attention": float(attention)}


# name → how the served towers run: "cudnn" (SDPA with cuDNN's kernels first for what SAM runs through SDPA),
# "kernel" (SAM's blocks through the Triton kernel: None, "rows" (grids it walks by whole rows: the default),
# "global" (global blocks) or "all"), "tables" (within windows, the kernel computes the relative terms from the
# tables), "padding" (within windows, the padding past the grid made up in the kernel), "options" (Inductor's, for
# compiling the blocks)
SERVED_TRIALS = {
    "flash attention, folded": dict(cudnn=False, kernel=None),
    "cuDNN attention, folded": dict(cudnn=True, kernel=None),
    # DEEPSEEK_OCR_SAM_KERNEL=1
    "Triton kernel for grids walked by rows, cuDNN for the rest": dict(cudnn=True, kernel="rows"),
    # ... with DEEPSEEK_OCR_SAM_GELU=1: the MLP's GELU through its Triton kernel
    "Triton kernel for grids walked by rows, cuDNN for the rest, GELU kernel": dict(cudnn=True, kernel="rows",
                                                                                     gelu="kernel"),
    "Triton kernel for global blocks, cuDNN for windows": dict(cudnn=True, kernel="global"),
    # the windows' terms computed first (`table_terms`) and read, as the global blocks' are
    "Triton kernel for every block, windows' terms read": dict(cudnn=False, kernel="all"),
    "Triton kernel for every block, windows' terms read, GELU kernel": dict(cudnn=False, kernel="all", gelu="kernel"),
    # DEEPSEEK_OCR_SAM_KERNEL=all, the default since h200-2026-12-01c, with DEEPSEEK_OCR_SAM_GELU=0
    "Triton kernel for every block": dict(cudnn=False, kernel="all", tables=True),
    # ... with DEEPSEEK_OCR_SAM_GELU=1
    "Triton kernel for every block, GELU kernel": dict(cudnn=False, kernel="all", tables=True, gelu="kernel"),
    # ... with DEEPSEEK_OCR_SAM_GELU=epilogue: the GELU in cuBLASLt's epilogue of the first product
    "Triton kernel for every block, GELU in the product's epilogue": dict(cudnn=False, kernel="all", tables=True,
                                                                         gelu="epilogue"),
    # ... with the windows' terms computed first and read (windows whole since h200-2026-12-01e)
    "Triton kernel for every block, windows' terms read, GELU in the product's epilogue": dict(
        cudnn=False, kernel="all", gelu="epilogue"),
    # ... with the windows' padding made up in the kernel (DEEPSEEK_OCR_SAM_WINDOW_PADDING=kernel): the grid as it
    # is, neither padded nor its padding projected
    "Triton kernel for every block, GELU in the product's epilogue, windows' padding in the kernel": dict(
        cudnn=False, kernel="all", tables=True, gelu="epilogue", padding=True),
    # Inductor's own GEMM templates, to fuse the GELU into the first MLP product: on the H200 its autotuning
    # took 10-20 s a shape (and its templates ran at 55-61% of the best choice), the towers' compile more
    # than five minutes (h200-2026-11-30l, call 1)
    "Triton kernel for every block, GEMMs autotuned": dict(cudnn=False, kernel="all",
                                                           options={"max_autotune_gemm": True}),
}


def served_trials(model, groups: dict, pages: int, reference32: dict, base: dict, flops: dict,
                  ceilings: dict, trials: list) -> dict:
    """The served vision path (blocks compiled for the two Gundam view sizes, one pass per size, then the same
    replayed as CUDA graphs as the engine replays them) under each of `trials` (SERVED_TRIALS): ms a page, and
    where the GPU time goes, the whole pass and SAM alone, by kind of kernel, beside each kind's floor."""
    inner = model.model
    floors = {"matrix products": flops["matrix products"] / ceilings["matmul_flops"] * 1e3,
              "attention": flops["attention"] / ceilings["matmul_flops"] * 1e3}
    results = {"floors_ms_per_page": floors}
    with attention_backends_kept():
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the engine runs: only what asks for cuDNN gets it
        for name in trials:
            results[name] = served_trial(model, groups, pages, reference32, base, name)
    uncompile_vision_towers(model)
    torch._dynamo.reset()
    inner.sam_model.use_relative_attention_kernel(False)
    inner.sam_model.use_cudnn_attention(False)
    inner.sam_model.use_gelu("exact")
    return results


def served_trial(model, groups: dict, pages: int, reference32: dict, base: dict, name: str) -> dict:
    """One of `served_trials`' rows (its docstring), or {"error"} if the trial failed."""
    inner = model.model
    sides = list(groups)
    trial = SERVED_TRIALS[name]
    kernel, options = trial["kernel"], trial.get("options")
    inner.sam_model.use_cudnn_attention(trial["cudnn"])
    inner.sam_model.use_relative_attention_kernel(kernel is not None, windows=kernel != "global",
                                                  any_grid=kernel != "rows", terms_in_kernel=trial.get("tables", False),
                                                  padding_in_kernel=trial.get("padding", False))
    inner.sam_model.use_gelu(trial.get("gelu", "exact"))
    uncompile_vision_towers(model)
    torch._dynamo.reset()
    try:
        compiled = compile_vision_towers(model, sides=sides, backend="inductor" if DEVICE == "cuda" else "eager",
                                         options=options if DEVICE == "cuda" else None)

        def whole_pass():
            return {size: inner.encode_views(pixels) for size, pixels in groups.items()}

        with torch.inference_mode():
            out = whole_pass()
            seconds = timed(whole_pass)
            graphed, graphed_seconds = dict(out), float("nan")
            if DEVICE == "cuda":  # as the engine replays them
                towers = GraphedTowers(model, {size: views.shape[0] for size, views in groups.items()})
                towers.capture()
                graphed = {size: towers(pixels) for size, pixels in groups.items()}
                graphed_seconds = timed(lambda: [towers(pixels) for pixels in groups.values()])
                del towers
            whole = kernel_kinds(whole_pass)
            sam_only = kernel_kinds(lambda: [inner.run_vision_towers(inner.sam_model, pixels)
                                             for pixels in groups.values()])
        row = {"ms_per_page": seconds / pages * 1e3, "graphed_ms_per_page": graphed_seconds / pages * 1e3,
               "compile_s": compiled["seconds"],
               "kinds_ms_per_page": {kind: ms / pages for kind, ms in whole["kinds"].items()},
               "sam_kinds_ms_per_page": {kind: ms / pages for kind, ms in sam_only["kinds"].items()},
               "top_kernels": whole["top"],
               "graphed_equals_compiled": all(torch.equal(graphed[s], out[s]) for s in out),
               "vs_materialised": max(relative_error(out[s], base[s]) for s in out),
               "vs_float32": max(relative_error(out[s], reference32[s]) for s in out)}
    except Exception as error:  # report and go on: the other trials stand
        row = {"error": repr(error)[:500]}
        print(f"trial {name} failed:", traceback.format_exc()[-4000:], flush=True)
    print("served trial", name, json.dumps(row), flush=True)
    torch.compiler.set_stance("default")
    return row


def attention_options(model, groups: dict, pages: int, ceilings: dict) -> dict:
    """SAM's attention alone at the shapes of one pass of `pages` Gundam pages (the global blocks over each
    view size, the windowed blocks over all windows), by each way of computing it, in TFLOP/s of the
    attention's own arithmetic (4·heads·N²·64 a view, the relative positions not counted): plain SDPA without
    relative positions (what attention over 64 dimensions costs: the floor of any way to add them), the folded
    path under flash and cuDNN, and the Triton kernel at several tiles."""
    from checkpoints.deepencoder import (folded_relative_attention, relative_positions, relative_terms,
                                         resized_relative_table, widened_qkv)
    from checkpoints.triton_relative_attention import relative_attention, table_terms
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sam = model.model.sam_model
    settings_heads = sam.blocks[0].attn.heads
    head_dim = sam.blocks[0].attn.rel_pos_h.shape[-1]
    window = next(block.window_size for block in sam.blocks if block.window_size)
    global_attn = next(block.attn for block in sam.blocks if not block.window_size)
    window_attn = next(block.attn for block in sam.blocks if block.window_size)
    shapes = {}
    windows = 0
    for size, views in groups.items():
        side = size // 16
        shapes[f"global, {views.shape[0]} views of {size}"] = (views.shape[0], side, global_attn)
        windows += views.shape[0] * math.ceil(side / window) ** 2
    shapes[f"windowed, {windows} windows of {window}×{window}"] = (windows, window, window_attn)
    results = {}

    for label, (batch, side, attn) in shapes.items():
        tokens = side * side
        q, k, v = (torch.randn(batch, settings_heads, tokens, head_dim, device=DEVICE, dtype=DTYPE) for _ in range(3))
        rel_h = relative_positions(side, side, attn.rel_pos_h.detach()).to(DTYPE)
        rel_w = relative_positions(side, side, attn.rel_pos_w.detach()).to(DTYPE)
        work = 4 * batch * settings_heads * tokens * tokens * head_dim
        options = {}
        with torch.inference_mode():
            for backend_name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
                with sdpa_kernel([backend]):
                    try:
                        options[f"plain SDPA ({backend_name}), no relative positions"] = median_ms(
                            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), 5)
                        options[f"folded ({backend_name}), eager, terms and widening included"] = median_ms(
                            lambda: folded_relative_attention(q, k, v, *relative_terms(q, rel_h, rel_w, side, side),
                                                              side, side), 5)
                        row_terms, col_terms = relative_terms(q, rel_h, rel_w, side, side)
                        widened = widened_qkv(q, k, v, row_terms, col_terms, side, side)
                        options[f"folded ({backend_name}), the widened attention alone"] = median_ms(
                            lambda: torch.nn.functional.scaled_dot_product_attention(*widened, scale=1.0), 5)
                    except Exception as error:
                        options[f"{backend_name} failed"] = repr(error)[:200]
            row_terms, col_terms = relative_terms(q, rel_h, rel_w, side, side, pad_to=8)
            options["the kernel's terms (two products, tables padded to 8)"] = median_ms(
                lambda: relative_terms(q, rel_h, rel_w, side, side, pad_to=8), 5)
            options["the folded path's terms (two products)"] = median_ms(
                lambda: relative_terms(q, rel_h, rel_w, side, side), 5)
            grid_tables = (resized_relative_table(side, attn.rel_pos_h.detach()).to(DTYPE),
                           resized_relative_table(side, attn.rel_pos_w.detach()).to(DTYPE))
            options["the kernel's terms by table_terms (a product a grid line)"] = median_ms(
                lambda: table_terms(q, *grid_tables, side, side), 5)
            options["Triton kernel, terms first by table_terms, default tiles (both included)"] = median_ms(
                lambda: relative_attention(q, k, v, None, None, side, side, tables=grid_tables, terms_first=True), 5)
            for keys, tiles in kernel_options(side):
                option = f"Triton kernel, keys by {keys[0]}×{keys[1]}, {tiles[0]} queries, {tiles[1]} warps, {tiles[2]} stages"
                try:
                    options[option] = median_ms(lambda: relative_attention(
                        q, k, v, row_terms, col_terms, side, side, tiles=tiles, keys=keys), 5)
                except Exception as error:
                    options[f"{option} failed"] = repr(error)[:200]
            tables = (resized_relative_table(side, attn.rel_pos_h.detach()), resized_relative_table(side, attn.rel_pos_w.detach()))
            for keys, tiles in kernel_options(side):  # the terms computed in the kernel from the tables
                if attn is not window_attn:
                    break  # over a whole grid the look-ups cost more than they save (h200-2026-12-01, call 1)
                option = (f"Triton window kernel, terms inside, keys by {keys[0]}×{keys[1]}, {tiles[0]} queries, "
                          f"{tiles[1]} warps, {tiles[2]} stages")
                try:  # each cut-out window a grid of one window
                    options[option] = median_ms(lambda: relative_attention(
                        q, k, v, None, None, side, side, window=side, tiles=tiles, keys=keys, tables=tables), 5)
                except Exception as error:
                    options[f"{option} failed"] = repr(error)[:200]
            if attn is window_attn:  # as served: the windows read where they lie in each view's grid
                options["Triton kernel, windows read in the views' grids, terms by two products (included)"] = \
                    median_ms(windows_in_grids(groups, attn, settings_heads, head_dim, window, terms="products"), 5)
                for keys in (None, (4, 16)):
                    for terms in ("first", "inside"):
                        option = (f"Triton kernel, windows read in the views' grids, terms {terms}"
                                  + (f", keys by {keys[0]}×{keys[1]}" if keys else ""))
                        try:
                            options[option] = median_ms(windows_in_grids(groups, attn, settings_heads, head_dim,
                                                                         window, terms=terms, keys=keys), 5)
                        except Exception as error:
                            options[f"{option}: failed"] = repr(error)[:200]
        row = {"work_flops": work, "floor_ms": work / ceilings["matmul_flops"] * 1e3, "pages": pages,
               "ms": {name: ms for name, ms in options.items() if isinstance(ms, float)},
               "tflops": {name: work / ms / 1e9 for name, ms in options.items() if isinstance(ms, float)},
               "errors": {name: e for name, e in options.items() if isinstance(e, str)}}
        results[label] = row
        print("attention", label, json.dumps(row), flush=True)
        del q, k, v
    return results


def gelu_options(model, groups: dict, ceilings: dict) -> dict:
    """SAM's MLP GELU alone at one pass's hidden layers (its tokens × 3,072, bf16; random values at the spread
    of a trained layer's), each way: PyTorch's kernel, Inductor's, the Triton kernel (its short erf) at a few block
    sizes; a copy of the same bytes for the bandwidth; and each way's outputs against PyTorch's (how many of them
    differ, the largest difference). (Triton's libdevice erf in the same kernel: 0.287 / 0.643 ms at 16 pages' 1024
    views / 640 tiles, arithmetic-bound like Inductor's; h200-2026-12-01b, call 2.)"""
    from checkpoints.triton_ops import gelu

    hidden = model.model.sam_model.blocks[0].mlp.lin1.out_features
    compiled = torch.compile(torch.nn.functional.gelu)
    results = {}
    for size, views in groups.items():
        tokens = views.shape[0] * (size // 16) ** 2
        x = torch.randn(tokens, hidden, device=DEVICE, dtype=DTYPE) * 1.5
        reference = torch.nn.functional.gelu(x)
        ways = {"copy (the bytes alone)": lambda: x.clone(), "PyTorch (eager)": lambda: torch.nn.functional.gelu(x),
                "Inductor (compiled)": lambda: compiled(x)}
        for block, warps in ((1024, 4), (2048, 4), (4096, 8), (8192, 8)):
            ways[f"Triton, short erf, {block} a program, {warps} warps"] = (
                lambda block=block, warps=warps: gelu(x, block=block, warps=warps))
        row = {"tokens": tokens, "bytes_floor_ms": 4 * x.numel() / ceilings["copy_bytes_s"] * 1e3, "ms": {},
               "differing": {}, "largest_difference": {}}
        with torch.inference_mode():
            for name, way in ways.items():
                try:
                    row["ms"][name] = median_ms(way, 10)
                    if name.startswith("copy"):
                        continue
                    out = way()
                    row["differing"][name] = int((out != reference).sum())
                    row["largest_difference"][name] = float((out.float() - reference.float()).abs().max())
                except Exception as error:
                    row["ms"][name] = repr(error)[:200]
        row["elements"] = x.numel()
        row["with_the_product"] = product_and_gelu(tokens, model.model.sam_model.blocks[0].mlp.lin1)
        results[f"{views.shape[0]} views of {size}"] = row
        print("gelu", size, json.dumps(row), flush=True)
        del x, reference
    return results


def product_and_gelu(tokens: int, lin1) -> dict:
    """SAM's first MLP product and its GELU at `tokens` tokens (random inputs, the layer's weights scaled so that
    the hidden layer has the spread of a trained one's), each way: the product alone (the floor of any way), then
    F.gelu (eager and compiled, as served before), and cuBLASLt's product with the GELU in its epilogue
    (`MLPBlock.gelu_way` "epilogue"); ms, and each way's distance from the float32 product and exact GELU
    (mean and root-mean-square of the differences; the float32 result rounded once to bf16 for scale)."""
    import torch.nn.functional as F

    x = torch.randn(tokens, lin1.in_features, device=DEVICE).to(DTYPE)
    weight = (torch.randn(lin1.out_features, lin1.in_features, device=DEVICE) * 1.5 / lin1.in_features ** 0.5).to(DTYPE)
    bias = (torch.randn(lin1.out_features, device=DEVICE) * 0.1).to(DTYPE)
    compiled = torch.compile(lambda x: F.gelu(F.linear(x, weight, bias)))
    ways = {"the product alone": lambda: F.linear(x, weight, bias),
            "the product, then F.gelu (eager)": lambda: F.gelu(F.linear(x, weight, bias)),
            "the product, then F.gelu (compiled)": lambda: compiled(x),
            "the product with the GELU in cuBLASLt's epilogue": lambda: torch._addmm_activation(
                bias, x, weight.t(), use_gelu=True)}
    row = {"ms": {}, "mean_abs_from_float32": {}, "rms_from_float32": {}}
    with torch.inference_mode():
        exact = F.gelu(x.float() @ weight.float().t() + bias.float())
        outputs = {name: way for name, way in ways.items() if name != "the product alone"}
        outputs["float32, rounded once to bf16"] = lambda: exact.to(DTYPE)
        for name, way in ways.items():
            row["ms"][name] = median_ms(way, 10)
        for name, way in outputs.items():
            difference = way().float() - exact
            row["mean_abs_from_float32"][name] = float(difference.abs().mean())
            row["rms_from_float32"][name] = float(difference.pow(2).mean().sqrt())
    return row


def kernel_options(side: int) -> list:
    """(key rectangle, (queries, warps, stages)) to time the Triton kernel with over a side × side grid: its
    default rectangle at a few tiles, the other rectangles of 64 keys that cover the grid, and rectangles of 128
    keys (fewer, larger steps of the loop over the keys)."""
    from checkpoints.triton_relative_attention import key_tiles

    default = key_tiles(side, side)
    tiles = ((64, 4, 3), (64, 4, 2), (64, 4, 1), (32, 4, 3), (128, 8, 3), (64, 8, 3), (128, 8, 2))
    others = [] if default[0] == 1 else [r for r in ((8, 8), (4, 16), (2, 32)) if r != default]
    wider = [key_tiles(side, side, keys=128)] if default[0] != 1 else [(2, side)] if side <= 64 else []
    return ([(default, t) for t in tiles] + [(r, (64, 4, 3)) for r in others]
            + [(r, t) for r in wider for t in ((64, 4, 3), (64, 4, 2), (64, 8, 3), (128, 8, 2))])


def windows_in_grids(groups: dict, attn, heads: int, head_dim: int, window: int, terms: str = "first",
                     keys: tuple = None):
    """One windowed block's attention as the engine serves it, to time: over each view size's grids padded to
    whole windows as SamBlock pads them (random q, k, v; the block's tables), the kernel reading the windows where
    they lie and writing the grid's queries, its terms computed
    first by `table_terms` ("first"), by the kernel from the tables ("inside"), or first by two einsums over the
    gathered tables ("products", as served before `table_terms`); `keys`: the kernel's key rectangle."""
    from checkpoints.deepencoder import relative_positions_in_windows, relative_terms, resized_relative_table
    from checkpoints.triton_relative_attention import relative_attention

    grids = []
    for size, views in groups.items():
        side = size // 16
        padded = -(-side // window) * window
        grids.append((side, padded,
                      [torch.randn(views.shape[0], heads, padded * padded, head_dim, device=DEVICE, dtype=DTYPE)
                       for _ in range(3)],
                      relative_positions_in_windows(padded, window, attn.rel_pos_h.detach()).to(DTYPE),
                      relative_positions_in_windows(padded, window, attn.rel_pos_w.detach()).to(DTYPE)))

    tables = (resized_relative_table(window, attn.rel_pos_h.detach()).to(DTYPE),
              resized_relative_table(window, attn.rel_pos_w.detach()).to(DTYPE))

    def run():
        for side, padded, (q, k, v), rel_h, rel_w in grids:
            if terms != "products":
                relative_attention(q, k, v, None, None, padded, padded, window=window, tables=tables,
                                   terms_first=terms == "first", keys=keys, written=(side, side))
                continue
            rows, cols = relative_terms(q, rel_h, rel_w, padded, padded, pad_to=8)
            relative_attention(q, k, v, rows, cols, padded, padded, window=window, keys=keys, written=(side, side))

    return run


def print_trials(vision: dict, pages: int) -> None:
    """The served trials' and attention options' tables (markdown)."""
    trials = vision.get("served_trials")
    if trials:
        floors = trials["floors_ms_per_page"]
        names = [name for name in trials if name != "floors_ms_per_page" and "error" not in trials[name]]
        print(f"\n| served vision path, {pages} A4 Gundam pages a pass | " + " | ".join(names) + " | floor |")
        print("|---|" + "---|" * (len(names) + 1))
        print("| ms a page, compiled blocks | " + " | ".join(f"{trials[n]['ms_per_page']:.2f}" for n in names)
              + f" | {sum(floors.values()):.2f} |")
        print("| ms a page, replayed as CUDA graphs (served) | "
              + " | ".join(f"{trials[n]['graphed_ms_per_page']:.2f}" for n in names) + " | |")
        kinds = sorted({kind for n in names for kind in trials[n]["kinds_ms_per_page"]})
        for kind in kinds:
            print(f"| … {kind}, ms a page (SAM's share) | " + " | ".join(
                f"{trials[n]['kinds_ms_per_page'].get(kind, 0):.2f} ({trials[n]['sam_kinds_ms_per_page'].get(kind, 0):.2f})"
                for n in names) + f" | {floors.get(kind, float('nan')):.2f} |")
        print("| towers' output vs float32 | " + " | ".join(f"{trials[n]['vs_float32']:.2e}" for n in names) + " | |")
        for name in trials:
            if "error" in trials[name]:
                print(f"trial {name}: {trials[name]['error']}")
    for label, row in vision.get("attention_options", {}).items():
        print(f"\n| SAM attention, {label} | ms | TFLOP/s (64-dim work) |\n|---|---|---|")
        for name, ms in row["ms"].items():
            print(f"| {name} | {ms:.3f} | {row['tflops'][name]:.0f} |")
        print(f"| floor: {row['work_flops'] / 1e9:.0f} GFLOP ÷ the matmul rate | {row['floor_ms']:.3f} | |")


def prefill_flops(config, lengths: list) -> float:
    """Matrix-product FLOPs of one prefill of packed prompts (logits at each prompt's last token only)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, head_dim = config.num_attention_heads, config.head_dim
    tokens = sum(lengths)
    attention_proj = 2 * tokens * d * (heads * head_dim * 2 + config.num_key_value_heads * head_dim * 2)
    scores = sum(2 * 2 * n * (n + 1) / 2 * heads * head_dim for n in lengths)  # causal half, QK and PV
    moe_layers = sum(config.is_moe_layer(i) for i in range(layers))
    expert_mlp = 2 * 3 * d * config.moe_intermediate_size
    per_token_moe = (config.num_experts_per_tok + config.n_shared_experts) * expert_mlp
    dense = 2 * 3 * d * config.intermediate_size
    mlp = tokens * (moe_layers * per_token_moe + (layers - moe_layers) * dense)
    return layers * (attention_proj + scores) + mlp + 2 * len(lengths) * d * config.vocab_size


def prefill(model, prompts: int, length: int, profile_out: Path = None) -> dict:
    """One batched prefill of `prompts` prompts of `length` tokens through the decode batch's admission, alone on
    the GPU: called (every kernel launched from Python), and on CUDA replayed as the serving engine's CUDA graph
    of its bucket (`prefill_graphs.py`; captured in the warm-up call)."""
    config = model.config
    blocks_each = math.ceil(length / 64) + 1
    tokens = prompts * length
    modes = ["exact"] + (["graphs"] if DEVICE == "cuda" else [])
    seconds = {}
    with torch.inference_mode():
        for mode in modes:
            batch = DecodeBatch(model, prompts * blocks_each + 1, 64, prompts, length + 64, SERVING_NO_REPEAT_RULE,
                                LOOP_STOP_OFF, 1, use_cuda_graphs=False, prefill_tokens=tokens, prefill_mode=mode)
            entries = []
            for row in range(prompts):
                embeds = torch.randn(length, config.hidden_size, device=DEVICE, dtype=DTYPE) * 0.02
                blocks = list(range(1 + row * blocks_each, 1 + (row + 1) * blocks_each))
                entries.append(Entry(row, embeds, torch.zeros(length, dtype=torch.long), blocks, 16, []))
            seconds[mode] = timed(lambda: batch.admit(entries))
            if mode == "exact":
                table = kernel_table(lambda: batch.admit(entries), profile_out, 20) if profile_out is not None else ""
            del batch
    flops = prefill_flops(config, [length] * prompts)
    graphed = {"seconds_graphs": seconds["graphs"], "tokens_s_graphs": tokens / seconds["graphs"]} \
        if "graphs" in seconds else {}
    return {"prompts": prompts, "length": length, "seconds": seconds["exact"], "tokens_s": tokens / seconds["exact"],
            **graphed, "flops": flops, "table": table[:4000]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="ocr",
                        help="ocr: DeepSeek-OCR; ocr2: DeepSeek-OCR 2")
    parser.add_argument("--checkpoint", type=Path, help="default: /tmp/bench-checkpoint (ocr), "
                        "/tmp/bench-ocr2-checkpoint (ocr2); -tiny appended for --size tiny")
    parser.add_argument("--pages", type=int, default=16)
    parser.add_argument("--size", choices=["full", "tiny"], default="full",
                        help="random checkpoint size: full, or tiny for a CPU smoke run")
    parser.add_argument("--prefill", type=int, nargs=2, metavar=("PROMPTS", "LENGTH"),
                        help="default: 16 prompts of an A4 page's Gundam prompt length for the model")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the towers (minutes)")
    parser.add_argument("--profile", type=Path, help="folder for the kernel profiles of the vision pass and the "
                        "prefill")
    parser.add_argument("--steps", nargs="+", default=["variants", "prefill"],
                        choices=["variants", "served-trials", "attention-options", "gelu", "prefill"],
                        help="variants: the ways of running the towers above; served-trials: the served path "
                        "(compiled blocks, CUDA graphs) under --trials, with its GPU time by kind of kernel beside "
                        "each kind's floor; attention-options: SAM's attention alone at one pass's shapes, each way "
                        "of computing it; gelu: SAM's MLP GELU alone, each way; prefill: the prefill alone")
    parser.add_argument("--trials", nargs="+", default=list(SERVED_TRIALS), choices=list(SERVED_TRIALS),
                        help="served-trials' attention choices (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ceilings = measure_ceilings()
    print("ceilings", json.dumps(ceilings), flush=True)
    if args.checkpoint is None:
        default = default_checkpoint(args.model)
        args.checkpoint = default if args.size == "full" else default.with_name(default.name + "-tiny")
    random_checkpoint(args.checkpoint, args.size, args.model)
    from transformers import PreTrainedTokenizerFast

    model = MODEL_CLASSES[args.model].from_pretrained(str(args.checkpoint), dtype=DTYPE).to(DEVICE).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(args.checkpoint))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    chunks = {"passes of 4 MP": lambda size: max(1, 4 * 1024 * 1024 // (size * size)),
              "one pass per view size": lambda size: 10**6}
    report = {"model": args.model, "size": args.size, "device": device_name(), "torch": torch.__version__,
              "ceilings": ceilings}
    report["vision"] = vision_variants(model, args.model, tokenizer, args.pages, chunks, args.compile,
                                       args.profile / "profile_vision_folded.txt" if args.profile else None,
                                       steps=tuple(args.steps), ceilings=ceilings, trials=args.trials)
    if "prefill" not in args.steps:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
        print_trials(report["vision"], args.pages)
        return
    if args.prefill is None:
        a4_prompt = model.prepare_inputs(tokenizer, PROMPT, [a4_page()], *MODEL_PRESETS[args.model]["Gundam"])
        args.prefill = [16, a4_prompt.input_ids.numel()]
    prompts, length = args.prefill
    report["prefill"] = [prefill(model, prompts, length, args.profile / "profile_prefill.txt" if args.profile else None),
                         prefill(model, max(1, prompts // 4), length)]
    for row in report["prefill"]:
        print(f"prefill {row['prompts']} × {row['length']}: {row['tokens_s']:.0f} tokens/s, "
              f"floor {row['flops'] / ceilings['matmul_flops'] * 1e3:.1f} ms vs {row['seconds'] * 1e3:.1f} ms", flush=True)
    print(report["prefill"][0]["table"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    vision = report["vision"]
    floor_ms = vision["flops_per_page"] / ceilings["matmul_flops"] * 1e3
    print(f"\n--model {args.model}, {report['device']}, torch {torch.__version__}; ceilings: {ceilings['matmul_flops'] / 1e12:.0f} TFLOP/s "
          f"bf16, {ceilings['copy_bytes_s'] / 1e12:.2f} TB/s copy\n")
    print(f"| vision variant ({args.pages} A4 pages, Gundam) | ms a page | first call, s | peak GiB | "
          f"vs materialised | vs float32 |\n|---|---|---|---|---|---|")
    for name, row in vision.items():
        if isinstance(row, dict) and "ms_per_page" in row:
            print(f"| {name} | {row['ms_per_page']:.1f} | {row['first_call_s']:.1f} | {row.get('peak_gib', float('nan')):.1f} "
                  f"| {row['vs_materialised']:.2e} | {row['vs_float32']:.2e} |")
    print(f"| floor: {vision['flops_per_page'] / 1e12:.2f} TFLOP a page ÷ the matmul rate | {floor_ms:.1f} | | | | |")
    compiled = [row for row in vision.values() if isinstance(row, dict) and "compiled_ms" in row]
    if compiled:
        print("\n| torch.compile, dynamic views | first call, s | compiled, ms | eager, ms | vs float32 |\n|---|---|---|---|---|")
        for row in compiled:
            print(f"| {row['views']} views of {row['size']} | {row['first_call_s']:.1f} | {row['compiled_ms']:.1f} | "
                  f"{row['eager_ms']:.1f} | {row['vs_float32']:.2e} |")


if __name__ == "__main__":
    main()
