"""Speed of the decode engine beside the original code and beside the memory-bandwidth floor.

One run prints one table: batch-1 tokens/s; the time of one decode step with 32, 64 and 128 sequences
at ~2,000 positions (each beside its floor: the bytes of weights and KV cache the step must read ÷
this GPU's copy bandwidth, measured at the start); the vision encoding of a page and a prefill alone
(beside their floors: FLOPs ÷ this GPU's matmul rate); jobs of 128 and 256 A4 pages (Gundam, 1,024
new tokens each, EOS ignored) through `OCREngine` end to end (preprocessing, vision, prefill, decode)
with their peak GPU memory and what each stage did in them (busy seconds, vision passes, prefill
tokens/s); and how many greedy tokens the batched engine shares with the model's plain
`generate_tokens` in bf16.

On the device machine (see README "Performance"):
    python benchmarks/bench_engine.py --original .bench/orig --original-site /tmp/origsite
    python benchmarks/bench_engine.py --model ocr2 --original .bench/orig2 --original-site /tmp/origsite

`--model ocr2` runs DeepSeek-OCR 2 instead (its random checkpoint of the official size, its Gundam mode: a
1024 global view and 768 tiles). `--original` holds the original remote-code .py files of that model
(fetched, never committed) and `--original-site` a site-packages folder with transformers 4.46.3 for them;
the original runs in a subprocess. `--size tiny` runs the whole script on a tiny checkpoint (a CPU smoke test).

`--trial NAME ...` runs the largest job once more for each named change to the serving loop (`TRIALS`), in
the same process and run as the job it is compared with; `--timeline DIR` runs it once more with a window of it
under the profiler (`benchmarks/timeline.py`: GPU time by stream and engine stage, the trace kept in DIR).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.agreement_across_trees import both_paths, common_prefix  # noqa: E402
from benchmarks.bench_vision import pass_seconds, prefill, vision_flops  # noqa: E402
from benchmarks.ceilings import measure_ceilings  # noqa: E402
from benchmarks.common import (  # noqa: E402
    MODEL_PRESETS, PROMPT, a4_page, default_checkpoint, device_name, peak_gib, random_checkpoint, reset_peak,
    run_original_driver, sync, work_since,
)
from checkpoints.generation import SERVING_NO_REPEAT_RULE, NoRepeatNGramGuard  # noqa: E402
from checkpoints.modeling_deepseekv2 import KVCache  # noqa: E402
from ocr_service.decode_batch import Entry  # noqa: E402
from ocr_service.engine import OCREngine  # noqa: E402
from ocr_service.settings import Settings  # noqa: E402

GUNDAM = "Gundam (Recommended)"  # the preset every measure uses, as the loaded model maps it


ORIGINAL_DRIVER = r'''
tokens, image_path = int(sys.argv[3]), sys.argv[4]
base_size, image_size, crop_mode = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "1"
original_generate = model.generate
marks = {}

class Clock:
    def __init__(self): self.calls = 0
    def put(self, value):
        self.calls += 1
        if self.calls == 2: torch.cuda.synchronize(); marks["first"] = time.perf_counter()
    def end(self): pass

def timed_generate(*args, **kwargs):
    kwargs.update(max_new_tokens=marks["n"], min_new_tokens=marks["n"], streamer=Clock())
    return original_generate(*args, **kwargs)

model.generate = timed_generate
for n in (2, tokens):  # the first run warms up
    marks["n"] = n
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.infer(tokenizer, prompt="<image>\n<|grounding|>Convert the document to markdown.", image_file=image_path,
                output_path="/tmp/orig-out", base_size=base_size, image_size=image_size, crop_mode=crop_mode,
                save_results=False,
                eval_mode=False)
    torch.cuda.synchronize(); end = time.perf_counter()
print("RESULT " + json.dumps({"ttft_s": marks["first"] - start, "tok_s_b1": (tokens - 1) / (end - marks["first"]),
                              "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))
'''


def run_original(args, checkpoint: Path) -> dict:
    image_path = "/tmp/bench-page.png"
    a4_page().save(image_path)
    base_size, image_size, crop_mode = MODEL_PRESETS[args.model]["Gundam"]
    done = run_original_driver(ORIGINAL_DRIVER, args.original, args.original_site, checkpoint, args.original_tokens,
                               image_path, base_size, image_size, int(crop_mode), timeout=args.original_timeout)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {}


def step_floor_bytes(config, batch: int, positions: int) -> dict:
    """Bytes one decode step must read at least: KV of every sequence, the experts the batch routes to
    (expected distinct count under uniform routing), and every dense weight (attention, dense and shared
    MLPs, lm_head), in bf16."""
    d, layers, heads, head_dim = config.hidden_size, config.num_hidden_layers, config.num_attention_heads, \
        config.head_dim
    moe_layers = sum(config.is_moe_layer(i) for i in range(layers))
    experts, top_k, width = config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size
    distinct = experts * (1 - (1 - top_k / experts) ** batch)
    kv = batch * positions * layers * 2 * config.num_key_value_heads * head_dim * 2
    expert_bytes = moe_layers * distinct * 3 * width * d * 2
    dense = layers * (2 * heads * head_dim * d + 2 * config.num_key_value_heads * head_dim * d) * 2
    dense += moe_layers * 3 * width * config.n_shared_experts * d * 2
    dense += (layers - moe_layers) * 3 * config.intermediate_size * d * 2
    dense += config.vocab_size * d * 2
    return {"kv": kv, "experts": expert_bytes, "dense": dense, "total": kv + expert_bytes + dense}


def fill_rows(engine: OCREngine, batch: int, positions: int, room: int, generator=None) -> list:
    """Admit `batch` rows of `positions` random-embedding positions (prefills of the engine's size), each with
    blocks for `room` positions more; returns the rows' blocks, for `release_rows`."""
    decode, policy = engine.server.batch, engine.server.policy
    hidden = engine.model.config.hidden_size
    per_prefill = max(1, engine.settings.prefill_tokens // positions)
    held = []
    for start in range(0, batch, per_prefill):
        entries = []
        for row in range(start, min(batch, start + per_prefill)):
            blocks = policy.blocks.take(policy.blocks.blocks_for(positions + room))
            held.append(blocks)
            embeds = torch.randn(positions, hidden, device=engine.device, dtype=engine.dtype,
                                 generator=generator) * 0.02
            entries.append(Entry(row, embeds, torch.zeros(positions, dtype=torch.long), blocks, 10**6, []))
        decode.admit(entries)
    return held


def release_rows(engine: OCREngine, held: list) -> None:
    """Clear the rows `fill_rows` admitted and give their blocks back."""
    for row, blocks in enumerate(held):
        engine.server.batch.clear(row)
        engine.server.policy.blocks.give_back(blocks)


@torch.inference_mode()
def decode_steps(engine: OCREngine, batch: int, positions: int, steps: int, bandwidth: float) -> dict:
    """Fill `batch` rows with sequences of `positions` random-embedding positions, then time decode steps."""
    decode, model = engine.server.batch, engine.model
    held = fill_rows(engine, batch, positions, steps + 2)
    decode.run(batch, 2)  # warm (and capture, if this size was not captured)
    sync()
    started = time.perf_counter()
    decode.run(batch, steps)
    sync()
    step_s = (time.perf_counter() - started) / steps
    release_rows(engine, held)
    floor = step_floor_bytes(model.config, batch, positions + steps // 2)
    return {"step_ms": step_s * 1e3, "tok_s": batch / step_s, "floor_ms": floor["total"] / bandwidth * 1e3,
            "floor_bytes": floor}


STEP_VARIANT_HELP = """Batch-1 step variants (`--b1-variants`), each measured in the same run as the served step, its
graphs captured again for it: `pdl-off` (the decode step's kernels launched plainly, not programmatically, so
cuBLAS for every projection), `linear-off` (programmatic launches, the projections through cuBLAS),
`linear:P<programs per SM>:W<warps>` (the few-token projections' launch, triton_linear LINEAR_*),
`shared-apart` (the MoE layers' shared experts as GEMMs of their own, not inside the routed experts' GEMVs),
`gate-up:I<rows>:D<cols>:W<warps>` and `down:D<rows>:I<cols>:W<warps>` (the experts' GEMV tiles, triton_moe
GEMV_GATE_UP / GEMV_DOWN), `decode:P<programs per SM>:C<chunk>:W<warps>` (the paged decode kernel's
launch for a few sequences, triton_attention DECODE_PROGRAMS_PER_SM, DECODE_FEW_*)."""


def step_variant(name: str) -> Callable[[], Callable[[], None]]:
    """The change a batch-1 step variant makes (see STEP_VARIANT_HELP): a function that makes it and returns
    what puts it back."""
    from checkpoints import fused_moe, triton_attention, triton_common, triton_linear, triton_moe

    def setting(module, attribute, value):
        def apply():
            served = getattr(module, attribute)
            setattr(module, attribute, value)
            return lambda: setattr(module, attribute, served)
        return apply

    def combined(*changes):
        def apply():
            undos = [change() for change in changes]
            return lambda: [undo() for undo in reversed(undos)]
        return apply

    if name == "pdl-off":
        def apply():
            served = triton_common._PROGRAMMATIC_LAUNCH
            triton_common.use_programmatic_launch(False)
            return lambda: triton_common.use_programmatic_launch(served)
        return apply
    if name == "shared-apart":
        return setting(fused_moe, "SHARED_IN_GEMV", False)
    if name == "linear-off":
        return setting(triton_linear, "LINEAR_MAX_TOKENS", 0)
    kind, *fields = name.split(":")
    values = {field[0]: int(field[1:]) for field in fields}
    if kind == "gate-up" and set(values) == {"I", "D", "W"}:
        return setting(triton_moe, "GEMV_GATE_UP", dict(BLOCK_I=values["I"], BLOCK_D=values["D"],
                                                          num_warps=values["W"]))
    if kind == "down" and set(values) == {"D", "I", "W"}:
        return setting(triton_moe, "GEMV_DOWN", dict(BLOCK_D=values["D"], BLOCK_I=values["I"],
                                                      num_warps=values["W"]))
    if kind == "linear" and set(values) == {"P", "W"}:
        return combined(setting(triton_linear, "LINEAR_PROGRAMS_PER_SM", values["P"]),
                        setting(triton_linear, "LINEAR_WARPS", values["W"]))
    if kind == "decode" and set(values) == {"P", "C", "W"}:
        return combined(setting(triton_attention, "DECODE_PROGRAMS_PER_SM", values["P"]),
                        setting(triton_attention, "DECODE_FEW_CHUNK", values["C"]),
                        setting(triton_attention, "DECODE_FEW_WARPS", values["W"]))
    raise ValueError(f"unknown batch-1 step variant {name!r}: {STEP_VARIANT_HELP}")


@torch.inference_mode()
def graph_replays_match_eager_steps(engine: OCREngine, batch: int, positions: int, steps: int) -> bool:
    """From one state (rows of random-embedding prompts), `steps` decode steps replayed as CUDA graphs and the same
    steps run eagerly give the same tokens: the same kernels in the same order on the same inputs, so any
    difference is a kernel that read or wrote before the one ahead of it had finished."""
    decode = engine.server.batch
    held = fill_rows(engine, batch, positions, steps + 2, torch.Generator(device=engine.device).manual_seed(7))
    saved = [t.clone() for t in decode._state()]
    tokens = {}
    for graphs in (True, False):
        for tensor, value in zip(decode._state(), saved):
            tensor.copy_(value)
        served, decode.use_cuda_graphs = decode.use_cuda_graphs, graphs
        try:
            decode.run(batch, steps)
        finally:
            decode.use_cuda_graphs = served
        sync()
        tokens[graphs] = decode.history[:batch].clone()
    release_rows(engine, held)
    return bool(torch.equal(tokens[True], tokens[False]))


def with_step_variant(engine: OCREngine, name: str, measure: Callable[[], dict]) -> dict:
    """`measure()` with a step variant made and the decode graphs captured again for it (into the same pool);
    then as it was."""
    batch = engine.server.batch
    served_graphs, batch._graphs = batch._graphs, {}
    undo = step_variant(name)()
    try:
        return measure()
    finally:
        undo()
        batch._graphs = served_graphs


@torch.inference_mode()
def profile_step(engine: OCREngine, batch: int, positions: int, out: Path) -> None:
    """One step of `batch` rows run eagerly under the profiler: where the time goes, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    decode = engine.server.batch
    held = fill_rows(engine, batch, positions, 8)
    graphs, decode.use_cuda_graphs = decode.use_cuda_graphs, False
    decode.run(batch, 1)
    sync()
    activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        decode.run(batch, 2)
        sync()
    decode.use_cuda_graphs = graphs
    table = prof.key_averages().table(sort_by="cuda_time_total" if torch.cuda.is_available() else "cpu_time_total",
                                      row_limit=25)
    out.write_text(table)
    print(f"profile of one eager step, {batch} rows at {positions} positions (2 steps):\n{table[:6000]}", flush=True)
    release_rows(engine, held)


@torch.inference_mode()
def vision_pass(engine: OCREngine, pages: int, out: Path = None) -> dict:
    """Preprocessing and batched vision encoding of `pages` A4 pages (Gundam), timed apart, with an optional
    kernel profile of the encoding."""
    from ocr_service.vision import encode_prompts, views_for_towers

    model, gundam = engine.model, engine.resolution(GUNDAM)
    images = [a4_page(seed=i % 8) for i in range(pages)]
    preprocessor = engine.server.preprocessor  # one of its workers' work, in this thread
    started = time.perf_counter()
    prompts = [preprocessor._prepare(image, PROMPT, gundam) for image in images]
    preprocess_s = time.perf_counter() - started
    towers = engine.server.towers  # as the engine encodes: replayed as CUDA graphs by default
    # the median of a few passes: one pass's wall time moves by ~3% between passes (h200-2026-12-02b)
    passes_s = pass_seconds(lambda: encode_prompts(model, prompts, towers=towers), 5)
    encode_s = sorted(passes_s)[len(passes_s) // 2]
    if out is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]) as prof:
            encode_prompts(model, prompts[:4], towers=towers)
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total" if torch.cuda.is_available()
                                          else "cpu_time_total", row_limit=20)
        out.write_text(table)
        print(f"profile of encoding 4 pages:\n{table[:5000]}", flush=True)
    # The work of one page, counted on the eager towers (a compiled graph's kernels are not seen by the counter)
    # in the original's order: the model's own arithmetic, its attention at the head dim (the folded path widens
    # q and k, and a Triton kernel is not seen by the counter).
    sam = model.model.sam_model
    served_mode = "folded" if sam.blocks[0].attn.fold_relative_positions else "materialised"
    with torch.compiler.set_stance("force_eager"):
        views = [prompts[0].images[0].global_view[None], prompts[0].images[0].tiles]
        sam.use_relative_positions("materialised")
        try:
            flops = vision_flops(model, [views_for_towers(model, v.to(engine.device)) for v in views if v is not None])
        finally:
            sam.use_relative_positions(served_mode)
    return {"preprocess_ms_per_page": preprocess_s / pages * 1e3, "encode_ms_per_page": encode_s / pages * 1e3,
            "encode_ms_per_page_each_pass": [round(s / pages * 1e3, 3) for s in passes_s], "flops_per_page": flops}


TRIALS = {
    "serving-priority-high": "prefills and decode steps on a stream of higher priority than the vision worker's",
    "no-launch-turn": "the vision worker and the serving thread launching at the same time (no launch turn)",
    "preprocess-workers-4": "4 preprocessing workers",
    # (5 ms by default; the serving, vision and preprocessing threads share one interpreter)
    "switch-interval-0.2ms": "Python's thread switch interval at 0.2 ms",
    "vision-towers-called": "the vision towers called, not replayed as CUDA graphs (DEEPSEEK_OCR_VISION_GRAPHS=0)",
    "prefill-called": "the batched prefill called, not replayed as CUDA graphs (as before 2026-12-02f)",
    "one-program-grouping": "the decode step's experts grouped in one program (ALIGN_ONE_PROGRAM_MAX_ROWS 8192, "
                            "before 2026-11-30's seventh session), its graphs captured again",
}


def prefill_description(engine: OCREngine) -> str:
    prefill = engine.server.batch.prefill
    if prefill.mode == "graphs":
        return (f"CUDA graphs of {len(prefill.buckets)} token counts up to {prefill.buckets[-1]:,}, attention by "
                "the Triton kernel over packed prompts")
    return "called, attention by " + ("the Triton kernel over packed prompts" if engine.device.type == "cuda"
                                      else "SDPA per prompt length")


def start_trial(engine: OCREngine, trial: str) -> Callable[[], None]:
    """Changes the running engine for a trial (taken from its next round on); returns what puts it back."""
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    server = engine.server
    if trial == "serving-priority-high":
        served = server.stream
        server.stream = torch.cuda.Stream(engine.device, priority=-1)
        return lambda: setattr(server, "stream", served)
    if trial == "no-launch-turn":
        served = server.launch_turn
        server.launch_turn = server.vision.launch_turn = contextlib.nullcontext()
        return lambda: (setattr(server, "launch_turn", served), setattr(server.vision, "launch_turn", served))
    if trial == "preprocess-workers-4":
        preprocessor = server.preprocessor
        served = preprocessor.pool, preprocessor.workers
        preprocessor.pool, preprocessor.workers = ThreadPoolExecutor(4, thread_name_prefix="trial-preprocess"), 4
        return lambda: (setattr(preprocessor, "pool", served[0]), setattr(preprocessor, "workers", served[1]))
    if trial == "vision-towers-called":
        served = server.vision.towers
        server.vision.towers = None
        return lambda: setattr(server.vision, "towers", served)
    if trial == "prefill-called":
        prefill = server.batch.prefill
        served = prefill.mode
        prefill.mode = "exact"
        return lambda: setattr(prefill, "mode", served)
    if trial == "one-program-grouping":
        from checkpoints import triton_moe
        batch, served_rows = server.batch, triton_moe.ALIGN_ONE_PROGRAM_MAX_ROWS
        served_graphs, batch._graphs = batch._graphs, {}
        triton_moe.ALIGN_ONE_PROGRAM_MAX_ROWS = 8192
        batch.capture_all()

        def undo():
            triton_moe.ALIGN_ONE_PROGRAM_MAX_ROWS = served_rows
            batch._graphs = served_graphs
        return undo
    if trial == "switch-interval-0.2ms":
        served = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        return lambda: sys.setswitchinterval(served)
    raise ValueError(trial)


def page_job(engine: OCREngine, pages: int, tokens: int, on_start: Callable[[], None] = lambda: None) -> dict:
    """One job of `pages` A4 pages, with what the engine did during it: busy seconds per stage (the encoder
    works beside prefill and decode), vision passes and their mean size, prompt tokens prefilled per second
    of prefill. `on_start()` is called as the job is submitted."""
    images = [a4_page(seed=i % 8) for i in range(pages)]
    gundam = engine.resolution(GUNDAM)
    engine.run_pages(images[:2], PROMPT, gundam, 4)  # warm-up
    sync()
    reset_peak()
    before = engine.server.work_done()
    on_start()
    started = time.perf_counter()
    results = engine.run_pages(images, PROMPT, gundam, tokens)
    elapsed = time.perf_counter() - started
    produced = sum(len(r.token_ids) for r in results)
    return {"pages": pages, "pages_s": pages / elapsed, "seconds": elapsed, "tokens": produced,
            "tok_s": produced / elapsed,
            "peak_allocated_gib": peak_gib("allocated"),
            "peak_reserved_gib": peak_gib("reserved"),
            "first_token_p50_s": sorted(r.first_token_s for r in results)[len(results) // 2],
            **work_since(engine, before, pages)}


def agreement(engine: OCREngine, pages: int, tokens: int, first_seed: int = 0) -> dict:
    """Greedy tokens of the batched engine against the model's plain generate_tokens, same rules."""
    images = [a4_page(seed=first_seed + i) for i in range(pages)]
    same, compared = 0, 0
    prefixes = []  # each page's tokens in common, from the first
    partings = []  # where a page parts: the plain path's margin there (parting_margin)
    for inputs, plain, batched in both_paths(engine, PROMPT, images, engine.resolution(GUNDAM), tokens,
                                             SERVING_NO_REPEAT_RULE):
        prefix = common_prefix(plain, batched)
        same += prefix
        compared += tokens
        prefixes.append(prefix)
        if prefix < min(len(plain), len(batched)):
            partings.append(parting_margin(engine.model, inputs, plain[:prefix], plain[prefix], batched[prefix]))
    return {"same": same, "compared": compared, "prefixes": prefixes, "partings": partings}


def bf16_step(value: float) -> float:
    """The spacing of bf16 numbers at `value` (8 significant bits): how far apart two rounded logits of that
    size can be and still differ."""
    return 2.0 ** (math.floor(math.log2(abs(value))) - 7) if value else 2.0 ** -133


@torch.inference_mode()
def parting_margin(model, inputs, common: list, plain_token: int, engine_token: int) -> dict:
    """Where a page's tokens part: the plain path's own logits at that token, replayed as generate_tokens
    computes them (the prompt, then each token in common through the KV cache, the n-gram ban applied), and
    how far its choice stood above the engine's, in steps of bf16 at that size. A gap of a step or two is a
    tie at the logits' precision, which any other rounding order may turn either way."""
    device = model.lm_head.weight.device
    embeds = model.model.embed_prompt(inputs.input_ids.to(device)[None], inputs.image_mask.to(device)[None],
                                      [inputs.images])
    cache = KVCache(model.config.num_hidden_layers)
    guard = NoRepeatNGramGuard(SERVING_NO_REPEAT_RULE, inputs.input_ids.tolist())
    hidden = model.model.decode(embeds, cache=cache)
    for token in common:
        guard.append(token)
        hidden = model.model.decode(model.model.embed_tokens(torch.tensor([[token]], device=device)), cache=cache)
    logits = guard.mask_banned(model.lm_head(hidden[:, -1]).float()[0])
    chosen, other = float(logits[plain_token]), float(logits[engine_token])
    return {"at": len(common), "plain_logit": chosen, "engine_choice_logit": other,
            "gap_bf16_steps": (chosen - other) / bf16_step(chosen),
            "banned_tokens": int(torch.isinf(logits).sum()),  # the n-gram ban's doing at this token
            "replay_matches": int(logits.argmax()) == plain_token}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default="ocr",
                        help="ocr: DeepSeek-OCR; ocr2: DeepSeek-OCR 2")
    parser.add_argument("--size", choices=["full", "tiny"], default="full",
                        help="of the random checkpoint: tiny is a smoke test of the script (CPU)")
    parser.add_argument("--checkpoint", type=Path, help="default: /tmp/bench-checkpoint (ocr), "
                        "/tmp/bench-ocr2-checkpoint (ocr2); -tiny appended for --size tiny")
    parser.add_argument("--positions", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--job-pages", type=int, nargs="+", default=[128, 256], help="a job of each size, in order")
    parser.add_argument("--job-tokens", type=int, default=1024)
    parser.add_argument("--agreement-pages", type=int, default=4)
    parser.add_argument("--original", help="folder with the original remote-code .py files")
    parser.add_argument("--original-site", help="site-packages folder with transformers 4.46.3 for the original")
    parser.add_argument("--original-tokens", type=int, default=128)
    parser.add_argument("--original-timeout", type=int, default=300)
    parser.add_argument("--profile", type=Path, help="folder for kernel profiles of one step (batch 1 and 128)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["job", "agreement", "steps", "priority-trial",
                                                                  "exactness"],
                        help="priority-trial: no second run of the jobs with the vision stream ahead of the decode's")
    parser.add_argument("--trial", nargs="*", default=[], choices=sorted(TRIALS),
                        help="the largest job once more with one thing changed: " + "; ".join(
                            f"{name}: {what}" for name, what in TRIALS.items()))
    parser.add_argument("--trial-pages", type=int, nargs="*", help="the job sizes each --trial runs (default: the "
                        "largest of --job-pages)")
    parser.add_argument("--timeline", type=Path, help="folder: the largest job once more with a window of it "
                        "under the profiler (benchmarks/timeline.py), its trace and GPU time by stage")
    parser.add_argument("--timeline-window", type=float, nargs=2, default=[3.0, 2.0], metavar=("START_S", "LENGTH_S"))
    parser.add_argument("--b1-variants", nargs="*", default=["pdl-off", "shared-apart"], metavar="VARIANT",
                        help=STEP_VARIANT_HELP)
    parser.add_argument("--agreement-groups", type=int, default=4,
                        help="runs of --agreement-pages pages for the greedy agreement, each on pages of their own")
    parser.add_argument("--agreement-variants", nargs="*", default=[], metavar="VARIANT",
                        help="the greedy agreement measured again with each of these step variants (as --b1-variants)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ceilings = measure_ceilings()
    print("ceilings", json.dumps(ceilings), flush=True)
    bandwidth = ceilings["copy_bytes_s"]
    if args.checkpoint is None:
        default = default_checkpoint(args.model)
        args.checkpoint = default if args.size == "full" else default.with_name(default.name + "-tiny")
    random_checkpoint(args.checkpoint, size=args.size, model=args.model)
    theirs = run_original(args, args.checkpoint) if args.original else {}

    settings = Settings.from_env()
    card = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    default_rows, _ = settings.rows_and_budget(card)  # the rows this card gets by default, or as set
    settings = settings.replace(stop_loops=False, max_rows=max(args.batches + [default_rows]))
    started = time.perf_counter()
    engine = OCREngine(args.checkpoint, settings, ignore_eos=True)
    load_s = time.perf_counter() - started
    ours = {"load_s": load_s}
    if "steps" not in args.skip:
        ours["b1"] = decode_steps(engine, 1, 1000, 256, bandwidth)
        print("b1", json.dumps({k: v for k, v in ours["b1"].items() if k != "floor_bytes"}), flush=True)
        for name in args.b1_variants if engine.device.type == "cuda" else []:  # the same step, changed
            ours.setdefault("b1_variants", {})[name] = with_step_variant(
                engine, name, lambda: decode_steps(engine, 1, 1000, 256, bandwidth))
            print(f"b1, variant {name}", json.dumps({k: v for k, v in ours["b1_variants"][name].items()
                                                      if k != "floor_bytes"}), flush=True)
        for batch in args.batches:
            ours[f"b{batch}"] = decode_steps(engine, batch, args.positions, args.steps, bandwidth)
            print(batch, json.dumps({k: v for k, v in ours[f"b{batch}"].items() if k != "floor_bytes"}), flush=True)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        profile_step(engine, 1, 1000, args.profile / "profile_b1.txt")
        profile_step(engine, 128, args.positions, args.profile / "profile_b128.txt")
    ours["vision"] = vision_pass(engine, 16, args.profile / "profile_vision.txt" if args.profile else None)
    print("vision", json.dumps(ours["vision"]), flush=True)
    if engine.device.type == "cuda":  # 16 prompts of a Gundam A4 page's length, alone on the GPU
        ours["prefill"] = {k: v for k, v in prefill(engine.model, 16, 920).items() if k != "table"}
        print("prefill", json.dumps(ours["prefill"]), flush=True)
    if "job" not in args.skip:
        ours["jobs"] = {}
        for pages in args.job_pages:
            ours["jobs"][str(pages)] = page_job(engine, pages, args.job_tokens)
            print("job", json.dumps(ours["jobs"][str(pages)]), flush=True)
        ours["job"] = ours["jobs"][str(args.job_pages[0])]  # the first size: what page_cost.py reads
        if "priority-trial" not in args.skip and engine.device.type == "cuda":
            # A trial: the vision passes on a stream of higher priority than the decode's
            # (VisionWorker.STREAM_PRIORITY is the decode's own)
            vision = engine.server.vision
            served_stream = vision.stream
            vision.stream = torch.cuda.Stream(engine.device, priority=-1)
            ours["jobs_vision_priority_high"] = {}
            try:
                for pages in args.job_pages:
                    ours["jobs_vision_priority_high"][str(pages)] = page_job(engine, pages, args.job_tokens)
                    print("job, vision ahead of decode", json.dumps(ours["jobs_vision_priority_high"][str(pages)]),
                          flush=True)
            finally:
                vision.stream = served_stream
    for trial in args.trial:
        # Trials, each on the largest job (or --trial-pages): something the serving loop does, changed for one job
        # and put back
        for pages in args.trial_pages or [max(args.job_pages)]:
            key = trial if not args.trial_pages else f"{trial}, {pages} pages"
            undo = start_trial(engine, trial)
            try:
                ours.setdefault("trials", {})[key] = {"trial": trial, **page_job(engine, pages, args.job_tokens)}
            finally:
                undo()
            print(f"job, trial {key}", json.dumps(ours["trials"][key]), flush=True)
    if args.timeline:
        from benchmarks.timeline import print_summary, profile_window

        args.timeline.mkdir(parents=True, exist_ok=True)
        pages = max(args.job_pages)
        start_s, length_s = args.timeline_window
        ours["timeline"] = profile_window(lambda started: page_job(engine, pages, args.job_tokens, started),
                                          start_s, length_s,
                                          args.timeline / f"timeline-job{pages}.json.gz")
        try:
            print_summary(ours["timeline"], f"a {pages}-page job, {length_s:g} s from {start_s:g} s")
        except Exception as error:  # the trace is kept: it can be read again elsewhere
            print(f"reading the timeline failed: {error!r}", flush=True)
    if engine.device.type == "cuda" and "exactness" not in args.skip:
        ours["graphs_match_eager"] = {}
        for name in [None] + args.agreement_variants:
            for batch in (1, 4):
                def check():
                    return graph_replays_match_eager_steps(engine, batch, 1000, 64)
                key = f"{name or 'served'} b{batch}"
                ours["graphs_match_eager"][key] = check() if name is None else with_step_variant(engine, name, check)
                print("decode graphs = eager steps,", key, ours["graphs_match_eager"][key], flush=True)
    if "agreement" not in args.skip:
        ours["agreement"] = agreement(engine, args.agreement_pages, 64)
        print("agreement", json.dumps(ours["agreement"]), flush=True)
        for group in range(1, args.agreement_groups):  # more pages, in runs of the same size (seeds after those)
            ours.setdefault("agreement_groups", []).append(
                agreement(engine, args.agreement_pages, 64, first_seed=group * args.agreement_pages))
            print(f"agreement, group {group}", json.dumps(ours["agreement_groups"][-1]), flush=True)
        for name in args.agreement_variants if engine.device.type == "cuda" else []:
            ours.setdefault("agreement_variants", {})[name] = [with_step_variant(
                engine, name, lambda: agreement(engine, args.agreement_pages, 64, first_seed=group * args.agreement_pages))
                for group in range(args.agreement_groups)]
            print(f"agreement, variant {name}", json.dumps(ours["agreement_variants"][name]), flush=True)
    # what the process's own attention (the decoder's prefill) may use once the towers are compiled and captured
    ours["sdpa_after_run"] = {"cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                              "flash": torch.backends.cuda.flash_sdp_enabled()}
    report = {"model": args.model, "size": args.size, "ours": ours, "original": theirs, "device": device_name(),
              "torch": torch.__version__, "ceilings": ceilings}
    print(json.dumps(report, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))

    print(f"\n{engine.served.title}, {report['device']}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{engine.settings.dtype}, {args.size} random weights; KV cache paged ({engine.server.batch.block_size}-position blocks), decode attention: "
          f"Triton paged kernel; prefill: {prefill_description(engine)}\n")
    matmul = ceilings["matmul_flops"]
    print(f"| measure | ours | original | floor (bytes ÷ {bandwidth / 1e12:.2f} TB/s, FLOPs ÷ {matmul / 1e12:.0f} "
          "TFLOP/s, both measured) | target |\n|---|---|---|---|---|")
    if "b1" in ours:
        b1 = ours["b1"]
        print(f"| batch 1, tokens/s (~1,000 positions) | {b1['tok_s']:.0f} ({b1['step_ms']:.2f} ms) | "
              f"{theirs.get('tok_s_b1', float('nan')):.1f} | {1e3 / b1['floor_ms']:.0f} ({b1['floor_ms']:.2f} ms) "
              f"| ≥ 1,500 |")
    for name, variant in ours.get("b1_variants", {}).items():
        print(f"| trial: batch 1, variant `{name}` | {variant['tok_s']:.0f} ({variant['step_ms']:.3f} ms) | – | – | |")
    targets = {32: "≤ 3.36 ms (no slower)", 64: "≤ 4.82 ms (no slower)", 128: "≤ 6.87 ms (no slower)"}
    for batch in args.batches:
        row = ours.get(f"b{batch}")
        if row:
            print(f"| step, {batch} sequences at ~{args.positions} positions | {row['step_ms']:.2f} ms "
                  f"({row['tok_s']:.0f} tokens/s) | one at a time | {row['floor_ms']:.2f} ms | "
                  f"{targets.get(batch, '')} |")
    if "vision" in ours:
        vision = ours["vision"]
        print(f"| vision encoding of an A4 Gundam page alone (median of 5 passes of 16 pages), ms | "
              f"{vision['encode_ms_per_page']:.1f} | – | {vision['flops_per_page'] / matmul * 1e3:.1f} "
              f"({vision['flops_per_page'] / 1e12:.2f} TFLOP) | ≤ 8 |")
        print(f"| preprocessing of that page, one CPU thread, ms | {vision['preprocess_ms_per_page']:.0f} | – | – | |")
    if "prefill" in ours:
        alone = ours["prefill"]
        per_token = alone["flops"] / (alone["prompts"] * alone["length"])
        print(f"| prefill alone, {alone['prompts']} prompts of {alone['length']} tokens, tokens/s | "
              f"{alone['tokens_s']:,.0f} | – | {matmul / per_token:,.0f} ({per_token / 1e9:.1f} GFLOP a token) | |")
        if "tokens_s_graphs" in alone:
            print(f"| … replayed as its CUDA graph (as served), tokens/s | {alone['tokens_s_graphs']:,.0f} | – | – | |")
    job_targets = {128: "≥ 16", 256: "≥ 20"}
    for pages, job in ours.get("jobs", {}).items():
        pages = int(pages)
        original_pages = (1 / (theirs["ttft_s"] + args.job_tokens / theirs["tok_s_b1"])) if theirs else float("nan")
        print(f"| {pages}-page job, Gundam A4, {args.job_tokens} tokens/page: pages/s | {job['pages_s']:.2f} | "
              f"{original_pages:.3f} (one page at a time) | – | {job_targets.get(pages, '')} |")
        print(f"| … its prefill, prompt tokens per second of prefill | {job['prefill_tokens_s']:,.0f} | – | – | "
              f"≥ 150,000 |")
        print(f"| … its prefills: {job['prefills']}, {job['pages_per_prefill']:.1f} pages and "
              f"{job['prefill_ms_each']:.0f} ms each | – | – | – | |")
        print(f"| … its vision encoding beside decoding, ms a page (passes of {job['vision_pages_per_pass']:.1f} pages "
              f"on average) | {job['encode_ms_per_page']:.1f} | – | – | |")
        busy = job["busy_s"]
        print(f"| … busy seconds: encode / prefill / decode, of {job['seconds']:.1f} s | {busy['encode']:.1f} / "
              f"{busy['prefill']:.1f} / {busy['decode']:.1f} | – | – | |")
        print(f"| … peak GPU memory, GiB (allocated / reserved) | {job['peak_allocated_gib']:.1f} / "
              f"{job['peak_reserved_gib']:.1f} | {theirs.get('peak_gib', float('nan')):.1f} (batch 1) | – | "
              f"within the default budget |")
    for pages, job in ours.get("jobs_vision_priority_high", {}).items():
        print(f"| trial: {pages}-page job with the vision passes at a higher stream priority than decode, pages/s | "
              f"{job['pages_s']:.2f} (vision {job['encode_ms_per_page']:.1f} ms a page, prefill "
              f"{job['prefill_tokens_s']:,.0f} tokens/s) | – | – | |")
    for job in ours.get("trials", {}).values():
        print(f"| trial: {job['pages']}-page job, {TRIALS[job['trial']]}, pages/s | {job['pages_s']:.2f} (prefill "
              f"{job['prefill_tokens_s']:,.0f} tokens/s, {job['prefill_ms_each']:.0f} ms each; vision "
              f"{job['encode_ms_per_page']:.1f} ms a page, passes of {job['vision_pages_per_pass']:.1f}) | – | – | |")
    def agreements(runs):
        partings = [p for run in runs for p in run.get("partings", [])]
        return (" / ".join(f"{run['same']}/{run['compared']}" for run in runs) + " (per page: "
                + "; ".join(" ".join(map(str, run["prefixes"])) for run in runs) + ")"
                + ("; where pages parted, the plain path's choice above the engine's by "
                   + ", ".join(f"{p['gap_bf16_steps']:.0f} bf16 steps at token {p['at']}"
                               + (" (after the n-gram ban)" if p["banned_tokens"] else "") for p in partings)
                   if partings else ""))

    if "agreement" in ours:
        print(f"| bf16 greedy tokens, batched engine = plain generate_tokens | "
              f"{agreements([ours['agreement']] + ours.get('agreement_groups', []))} | – | – | ≥ 250/256 |")
    for name, runs in ours.get("agreement_variants", {}).items():
        print(f"| trial: the same with variant `{name}` | {agreements(runs)} | – | – | |")
    for key, same in ours.get("graphs_match_eager", {}).items():
        print(f"| 64 decode steps from one state replayed as CUDA graphs = run eagerly, {key} | {same} | – | – | True |")



if __name__ == "__main__":
    main()
