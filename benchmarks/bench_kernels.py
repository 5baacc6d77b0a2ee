"""Speed and accuracy of the Triton kernels (checkpoints/triton_*.py) at DeepSeek-OCR's sizes.

Prints one table: for each operation and size, each variant's time (median of CUDA-event timings, the
L2 cache flushed before each run): `eager` launches it from Python, `graph` replays it from a CUDA
graph (decode sizes, where the engine's step is a graph: launch overhead excluded). Beside it the
bandwidth floor (bytes that must move ÷ this GPU's copy bandwidth, measured at the start; for the experts
also FLOPs ÷ its measured bf16 matmul rate when that is larger), the error against the PyTorch definition in bfloat16 and in float32 (max |a − b| / max |b|),
and, for the Triton variant at decode sizes, whether a CUDA graph captured on one input replays
correctly on another (`graph ok`). A variant that fails prints its error in its row; the rest go on.

Variants: `triton` (the module's choice), `triton gemv` / `triton grouped` (the experts' two paths
forced), `pytorch` (the definition, i.e. the CPU/reference branch run on the GPU), `grouped_mm`
(the experts through torch._grouped_mm, tokens sorted by expert; Hopper, bfloat16).

`--ops grouping` times the experts' grouping by expert alone, in one program against in parallel.

`--ops weighted_sum` (in the default list) prints a table of its own: the grouped experts' last step
(out = Σ_k weight · per_pair + add) under every launch variant of triton_moe.WEIGHTED_SUM_VARIANTS at
prefill sizes, each variant's GB/s beside this GPU's measured copy bandwidth, whether its bits equal
the sequential float32 sum (`acc + weight_k · output_k`, k = 0 first, in PyTorch). The fastest variant
that equals the sequential sum is the candidate for triton_moe.WEIGHTED_SUM_VARIANT.

On the GPU machine (README "Performance"):
    python benchmarks/bench_kernels.py --json bench_kernels.json
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# The floors' rates: this GPU's copy bandwidth and bf16 matmul rate, measured when the run starts (main).
BANDWIDTH = 3.0e12  # B/s, until measured
MATMUL_RATE = 800e12  # FLOP/s, until measured

# DeepSeek-OCR's decoder.
HIDDEN, HEADS, HEAD_DIM = 1280, 10, 128
EXPERTS, EXPERT_WIDTH, TOP_K = 64, 896, 6
SHARED_WIDTH, DENSE_WIDTH = 1792, 6848
BLOCK_SIZE = 64
DTYPE = torch.bfloat16


sys.path.insert(0, str(REPO))

from benchmarks.ceilings import measure_ceilings  # noqa: E402
from checkpoints import fused_moe, fused_ops, paged_attention  # noqa: E402
from checkpoints import triton_attention, triton_common, triton_moe  # noqa: E402


@contextlib.contextmanager
def pytorch_branch():
    """The dispatching functions take their PyTorch branch while this is open."""
    saved = os.environ.get("DEEPSEEK_OCR_TRITON")
    os.environ["DEEPSEEK_OCR_TRITON"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["DEEPSEEK_OCR_TRITON"]
        else:
            os.environ["DEEPSEEK_OCR_TRITON"] = saved


def on_pytorch(function):
    def run(*args):
        with pytorch_branch():
            return function(*args)
    return run


# ---------------------------------------------------------------- timing


class Timer:
    def __init__(self, reps: int, warmup: int):
        self.reps, self.warmup = reps, warmup
        # Read (not written) before each run: the L2 then holds clean lines, as after a layer's weights,
        # and the timed kernel pays no write-back of someone else's dirty lines.
        self.flush_buffer = torch.ones(64 * 2**20, dtype=torch.float32, device="cuda")  # 256 MB > the 50 MB L2

    def _median(self, run) -> float:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for start, end in zip(starts, ends):
            self.flush_buffer.amax()
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3  # µs

    def eager(self, fn, inputs) -> float:
        for _ in range(self.warmup):
            fn(*inputs)
        torch.cuda.synchronize()
        return self._median(lambda: fn(*inputs))

    def graph(self, fn, inputs) -> float:
        graph = capture(fn, inputs)[0]
        return self._median(graph.replay)


def capture(fn, inputs):
    """(graph, its outputs) of fn on inputs, warmed up on a side stream as CUDA graphs require."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*inputs)
    return graph, outputs


def as_list(result):
    if result is None:
        return []
    return list(result) if isinstance(result, (tuple, list)) else [result]


def graph_replays_correctly(fn, make_inputs, observed=None) -> str:
    """Capture on inputs of seed 1, copy inputs of seed 2 into them, replay, and compare with an eager
    run on seed 2. `observed(inputs)` names what to compare for in-place operations."""
    static = make_inputs(1)
    graph, outputs = capture(fn, static)
    fresh = make_inputs(2)
    for target, source in zip(static, fresh):
        if torch.is_tensor(target):
            target.copy_(source)
    graph.replay()
    replayed = [t.clone() for t in (observed(static) if observed else as_list(outputs))]
    eager_outputs = fn(*fresh)
    expected = observed(fresh) if observed else as_list(eager_outputs)
    worst = max((relative_error(a, b) for a, b in zip(replayed, expected)), default=0.0)
    return "ok" if all(torch.equal(a, b) for a, b in zip(replayed, expected)) else f"differs ({worst:.1e})"


def relative_error(actual, expected) -> float:
    actual, expected = actual.float(), expected.float()
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


# ---------------------------------------------------------------- the table


class Table:
    COLUMNS = ("op", "size", "variant", "eager_us", "graph_us", "floor_us", "of_floor", "err_bf16", "err_fp32",
               "graph_ok", "note")

    def __init__(self, timer: Timer):
        self.timer, self.rows = timer, []

    def case(self, op, size, make_inputs, variants, floor_us, floor_what, decode=False, compare=None,
             observed=None, reference_fp32=None):
        """variants: name → (fn, capturable). The first variant named 'pytorch' is the reference."""
        compare = compare or (lambda out, ref: max(relative_error(a, b) for a, b in zip(as_list(out), as_list(ref))))
        inputs = make_inputs(0)
        reference = None
        if "pytorch" in variants:
            with contextlib.suppress(Exception):
                result = variants["pytorch"][0](*inputs)
                reference = [t.clone() for t in (observed(inputs) if observed else as_list(result))]
        fp32 = None
        if reference_fp32 is not None:
            with contextlib.suppress(Exception):
                fp32 = [t.clone() for t in as_list(reference_fp32(inputs))]
        for name, (fn, capturable) in variants.items():
            row = dict(op=op, size=size, variant=name, floor_us=round(floor_us, 2), note=floor_what if
                       name == next(iter(variants)) else "")
            try:
                inputs = make_inputs(0)
                result = fn(*inputs)
                got = observed(inputs) if observed else as_list(result)
                if reference is not None and name != "pytorch":
                    row["err_bf16"] = number_or_text(compare(got, reference))
                if fp32 is not None:
                    row["err_fp32"] = number_or_text(compare(got, fp32))
                row["eager_us"] = round(self.timer.eager(fn, inputs), 1)
                best = row["eager_us"]
                if decode and capturable:
                    row["graph_us"] = round(self.timer.graph(fn, inputs), 1)
                    best = min(best, row["graph_us"])
                    if name.startswith("triton"):
                        row["graph_ok"] = graph_replays_correctly(fn, make_inputs, observed)
                row["of_floor"] = f"{floor_us / best:.0%}" if best else ""
            except Exception as error:  # one failing variant must not stop the table
                row["note"] = f"FAILED {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
                traceback.print_exc(file=sys.stderr)
            torch.cuda.synchronize()
            self.rows.append(row)
            self.print_row(row)

    def print_header(self):
        print(" | ".join(f"{c:>9}" if c not in ("op", "size", "variant", "note") else c for c in self.COLUMNS),
              flush=True)

    @staticmethod
    def print_row(row):
        cells = []
        for column in Table.COLUMNS:
            value = row.get(column, "")
            cells.append(f"{value:>9}" if column not in ("op", "size", "variant", "note") else str(value))
        print(" | ".join(cells), flush=True)


def number_or_text(value):
    return value if isinstance(value, str) else f"{value:.1e}"


def floor(bytes_moved, flops=0.0):
    return max(bytes_moved / BANDWIDTH, flops / MATMUL_RATE) * 1e6


def generator_for(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def randn(*shape, seed, scale=1.0, dtype=DTYPE):
    return (torch.randn(*shape, generator=generator_for(seed), device="cuda") * scale).to(dtype)


def upcast(inputs):
    return [t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]


# ---------------------------------------------------------------- operations


def bench_small_ops(table, token_counts):
    size_bytes = torch.empty((), dtype=DTYPE).element_size()
    for tokens in token_counts:
        decode = tokens <= 256

        def norm_inputs(seed, tokens=tokens):
            return [randn(tokens, HIDDEN, seed=seed), randn(tokens, HIDDEN, seed=seed + 100),
                    randn(HIDDEN, seed=seed + 200, scale=0.1).add(1), 1e-6]

        table.case("add_rms_norm", f"N={tokens}", norm_inputs,
                   {"triton": (fused_ops.add_rms_norm, True), "pytorch": (on_pytorch(fused_ops.add_rms_norm), True)},
                   floor((4 * tokens * HIDDEN + HIDDEN) * size_bytes), "x, residual, weight in; out, sum out",
                   decode=decode, reference_fp32=lambda i: on_pytorch(fused_ops.add_rms_norm)(*upcast(i)))

        for width in (SHARED_WIDTH, DENSE_WIDTH):
            def silu_inputs(seed, tokens=tokens, width=width):
                return [randn(tokens, 2 * width, seed=seed, scale=3)]

            table.case("silu_and_mul", f"N={tokens} I={width}", silu_inputs,
                       {"triton": (fused_ops.silu_and_mul, True), "pytorch": (on_pytorch(fused_ops.silu_and_mul), True)},
                       floor(3 * tokens * width * size_bytes), "gate/up in, product out", decode=decode,
                       reference_fp32=lambda i: on_pytorch(fused_ops.silu_and_mul)(*upcast(i)))

        def rotary_inputs(seed, tokens=tokens):
            qkv = randn(tokens, 3 * HEADS * HEAD_DIM, seed=seed)
            q = qkv[:, :HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)  # strided views, as the model has them
            k = qkv[:, HEADS * HEAD_DIM:2 * HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
            angles = torch.rand(tokens, HEAD_DIM // 2, generator=generator_for(seed + 1), device="cuda") * 100
            angles = torch.cat((angles, angles), dim=-1)
            return [q, k, angles.cos().to(DTYPE), angles.sin().to(DTYPE)]

        table.case("apply_rotary", f"T={tokens}", rotary_inputs,
                   {"triton": (fused_ops.apply_rotary, True), "pytorch": (on_pytorch(fused_ops.apply_rotary), True)},
                   floor((4 * tokens * HEADS * HEAD_DIM + 2 * tokens * HEAD_DIM) * size_bytes),
                   "q, k, cos, sin in; q, k out", decode=decode,
                   reference_fp32=lambda i: on_pytorch(fused_ops.apply_rotary)(*upcast(i)))

        def router_inputs(seed, tokens=tokens):
            return [randn(tokens, EXPERTS, seed=seed, scale=2), TOP_K, True, 1.0]

        def compare_routes(out, ref):
            ids, weights = out
            ref_ids, ref_weights = ref
            ids, order = ids.sort(dim=-1)
            ref_ids, ref_order = ref_ids.sort(dim=-1)
            same = (ids == ref_ids).all(dim=-1)
            differing = int((~same).sum())  # rows whose choice differs (ties among bfloat16 logits)
            error = relative_error(weights.gather(1, order)[same], ref_weights.gather(1, ref_order)[same]) \
                if same.any() else float("nan")
            return f"{error:.1e}" + (f", {differing} rows differ" if differing else "")

        table.case("route_top_k", f"N={tokens} E={EXPERTS} K={TOP_K}", router_inputs,
                   {"triton": (fused_ops.route_top_k, True), "pytorch": (on_pytorch(fused_ops.route_top_k), True)},
                   floor(tokens * EXPERTS * size_bytes + tokens * TOP_K * 12), "logits in; ids, weights out",
                   decode=decode, compare=compare_routes)

    for tokens in (t for t in token_counts if t <= 256):
        def kv_inputs(seed, tokens=tokens):
            blocks = max(tokens // BLOCK_SIZE + 8, 16)
            keys = torch.zeros(blocks, HEADS, BLOCK_SIZE, HEAD_DIM, dtype=DTYPE, device="cuda")
            values = torch.zeros_like(keys)
            qkv = randn(tokens, 3 * HEADS * HEAD_DIM, seed=seed)
            k = qkv[:, HEADS * HEAD_DIM:2 * HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
            v = qkv[:, 2 * HEADS * HEAD_DIM:].view(tokens, HEADS, HEAD_DIM)
            slots = torch.randperm(blocks * BLOCK_SIZE, generator=generator_for(seed), device="cuda")[:tokens]
            return [keys, values, k, v, slots]

        table.case("store_kv", f"T={tokens}", kv_inputs,
                   {"triton": (paged_attention.store_kv, True), "pytorch": (on_pytorch(paged_attention.store_kv), True)},
                   floor(4 * tokens * HEADS * HEAD_DIM * size_bytes), "k, v in; cache slots out", decode=True,
                   observed=lambda inputs: [inputs[0], inputs[1]])


def bench_decode_attention(table, batches, positions):
    size_bytes = torch.empty((), dtype=DTYPE).element_size()
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        lengths = torch.randint(int(positions * 0.9), int(positions * 1.1) + 1, (batch,), generator=generator)
        width = math.ceil(int(lengths.max()) / BLOCK_SIZE)
        num_blocks = batch * width + 1  # block 0 is never a sequence's
        tables = (torch.randperm(num_blocks - 1, generator=generator)[:batch * width] + 1).view(batch, width)
        cached = int(lengths.sum())

        def decode_inputs(seed, batch=batch, tables=tables, lengths=lengths, num_blocks=num_blocks):
            keys = randn(num_blocks, HEADS, BLOCK_SIZE, HEAD_DIM, seed=seed)
            values = randn(num_blocks, HEADS, BLOCK_SIZE, HEAD_DIM, seed=seed + 1)
            q = randn(batch, 3 * HEADS * HEAD_DIM, seed=seed + 2)[:, :HEADS * HEAD_DIM].view(batch, HEADS, HEAD_DIM)
            return [q, keys, values, tables.to(torch.int32).cuda(), lengths.to(torch.int32).cuda()]

        splits = triton_attention.decode_splits(batch, HEADS, width, BLOCK_SIZE, torch.device("cuda"))
        table.case("paged_decode", f"B={batch} ~{positions} pos", decode_inputs,
                   {"triton": (paged_attention.paged_decode_attention, True),
                    "pytorch": (on_pytorch(paged_attention.paged_decode_attention), True)},
                   floor(2 * cached * HEADS * HEAD_DIM * size_bytes + 2 * batch * HEADS * HEAD_DIM * size_bytes),
                   f"K+V of {cached} positions read, q in, out; {splits} splits", decode=True,
                   reference_fp32=lambda i: on_pytorch(paged_attention.paged_decode_attention)(*upcast(i)))


def grouped_mm_experts(x, w13, w2, expert_ids, expert_weights, add):
    """The routed experts through torch._grouped_mm: pairs sorted by expert, two grouped GEMMs."""
    tokens, top_k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = counts.cumsum(0, dtype=torch.int32)
    gate_up = torch._grouped_mm(x[order // top_k], w13.transpose(1, 2), offs=offsets)
    down = torch._grouped_mm(fused_ops.silu_and_mul(gate_up), w2.transpose(1, 2), offs=offsets)
    per_pair = torch.empty_like(down)
    per_pair[order] = down
    routed = (per_pair.view(tokens, top_k, -1).float() * expert_weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
    return routed + add


def bench_routed_experts(table, token_counts):
    size_bytes = torch.empty((), dtype=DTYPE).element_size()
    w13 = randn(EXPERTS, 2 * EXPERT_WIDTH, HIDDEN, seed=7, scale=HIDDEN ** -0.5)
    w2 = randn(EXPERTS, HIDDEN, EXPERT_WIDTH, seed=8, scale=EXPERT_WIDTH ** -0.5)
    for tokens in token_counts:
        def moe_inputs(seed, tokens=tokens):
            logits = randn(tokens, EXPERTS, seed=seed + 3, scale=2)
            ids, weights = on_pytorch(fused_ops.route_top_k)(logits, TOP_K, True, 1.0)
            return [randn(tokens, HIDDEN, seed=seed), w13, w2, ids, weights, randn(tokens, HIDDEN, seed=seed + 4)]

        ids = moe_inputs(0)[3]
        used = int(ids.unique().numel())
        pairs = tokens * TOP_K
        weight_bytes = used * 3 * EXPERT_WIDTH * HIDDEN * size_bytes
        flops = 2 * pairs * 3 * HIDDEN * EXPERT_WIDTH
        path = "gemv" if pairs <= triton_moe.GEMV_MAX_PAIRS else "grouped"
        variants = {f"triton ({path})": (fused_moe.routed_experts, True)}
        if tokens <= 128:
            other = "grouped" if path == "gemv" else "gemv"
            variants[f"triton {other}"] = (
                lambda *args, other=other: triton_moe.routed_experts(*args, path=other), True)
        variants["pytorch"] = (on_pytorch(fused_moe.routed_experts), False)  # host loop: syncs, not capturable
        if hasattr(torch, "_grouped_mm"):
            variants["grouped_mm"] = (grouped_mm_experts, True)
        table.case("routed_experts", f"N={tokens} ({used} experts)", moe_inputs, variants,
                   floor(weight_bytes + 3 * tokens * HIDDEN * size_bytes, flops),
                   f"{used} experts' weights ({weight_bytes / 1e6:.0f} MB) or {flops / 1e9:.0f} GFLOP",
                   decode=tokens <= 256,
                   reference_fp32=lambda i: on_pytorch(fused_moe.routed_experts)(*upcast(i)))


def bench_grouping(table, token_counts):
    """The routed experts' first step, pairs laid out by expert, in one program or in parallel (a counting
    launch and a claiming one): which is faster at each size sets ALIGN_ONE_PROGRAM_MAX_ROWS. No `graph ok`
    column: in parallel the pairs of one expert take its rows in the order the programs claim them, so two
    correct runs differ (tests/test_triton_kernels.py checks the layout of both modes)."""
    for tokens in token_counts:
        pairs = tokens * TOP_K
        block_m = triton_moe._grouped_block_m(pairs, EXPERTS)

        def ids_input(seed, tokens=tokens):
            logits = randn(tokens, EXPERTS, seed=seed + 3, scale=2)
            ids, _ = on_pytorch(fused_ops.route_top_k)(logits, TOP_K, True, 1.0)
            return [ids.reshape(-1).contiguous()]

        rows = (triton_moe._cdiv(pairs, block_m) + min(EXPERTS, pairs)) * block_m
        variants = {name: (lambda ids, one=one, block_m=block_m: triton_moe.group_by_expert(ids, EXPERTS, block_m,
                                                                                             one_program=one), True)
                    for name, one in (("one program", True), ("parallel", False))}
        table.case("group_by_expert", f"N={tokens} ({rows} rows)", ids_input, variants,
                   floor(pairs * 8 + rows * 4), f"ids read, rows written ({rows} rows of block {block_m})",
                   decode=True)


def sequential_weighted_sum(per_pair, weights, add):
    """The routed sum in PyTorch float32, slot after slot onto +0: what the Triton variants must equal."""
    tokens = per_pair.shape[0] // TOP_K
    outputs, slot_weights = per_pair.view(tokens, TOP_K, -1), weights.view(tokens, TOP_K)
    acc = torch.zeros(tokens, per_pair.shape[1], dtype=torch.float32, device=per_pair.device)
    for slot in range(TOP_K):
        acc = acc + outputs[:, slot].float() * slot_weights[:, slot, None]
    return (acc.to(per_pair.dtype).float() + add.float()).to(per_pair.dtype)


def bench_weighted_sum(table, token_counts):
    copy_rate = BANDWIDTH
    size_bytes = torch.empty((), dtype=DTYPE).element_size()
    print(f"\nweighted_sum (K={TOP_K}, D={HIDDEN}, with add): copy bandwidth {copy_rate / 1e9:.0f} GB/s; "
          f"default variant {triton_moe.WEIGHTED_SUM_VARIANT}", flush=True)
    print(f"{'tokens':>7} | {'variant':<24} | {'us':>8} | {'GB/s':>6} | {'of copy':>7} | "
          f"{'= sequential':>12}", flush=True)
    for tokens in token_counts:
        per_pair = randn(tokens * TOP_K, HIDDEN, seed=11)
        weights = torch.rand(tokens * TOP_K, generator=generator_for(12), device="cuda")
        add = randn(tokens, HIDDEN, seed=13)
        bytes_moved = tokens * HIDDEN * (TOP_K + 2) * size_bytes + tokens * TOP_K * weights.element_size()
        sequential = sequential_weighted_sum(per_pair, weights, add)
        for name in triton_moe.WEIGHTED_SUM_VARIANTS:
            row = dict(op="weighted_sum", size=f"N={tokens}", variant=name)
            try:
                out = torch.empty_like(add)

                def run(name=name, out=out):
                    return triton_moe.weighted_sum(per_pair, weights, TOP_K, add, out, variant=name)

                run()
                row["equals_sequential"] = bool(torch.equal(out.view(torch.int16), sequential.view(torch.int16)))
                row["eager_us"] = round(table.timer.eager(run, []), 1)
                row["gb_s"] = round(bytes_moved / (row["eager_us"] * 1e-6) / 1e9, 1)
                row["of_copy"] = f"{bytes_moved / (row['eager_us'] * 1e-6) / copy_rate:.0%}"
                print(f"{tokens:>7} | {name:<24} | {row['eager_us']:>8} | {row['gb_s']:>6.0f} | {row['of_copy']:>7} | "
                      f"{'yes' if row['equals_sequential'] else 'NO':>12}", flush=True)
            except Exception as error:  # one failing variant must not stop the table
                row["note"] = f"FAILED {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
                print(f"{tokens:>7} | {name:<24} | {row['note']}", flush=True)
                traceback.print_exc(file=sys.stderr)
            torch.cuda.synchronize()
            table.rows.append(row)
    table.rows.append(dict(op="weighted_sum", size="ceiling", variant="copy", gb_s=round(copy_rate / 1e9, 1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    parser.add_argument("--ops", nargs="+", default=["small", "decode", "experts", "grouping", "weighted_sum"],
                        choices=["small", "decode", "experts", "grouping", "weighted_sum"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 256, 16384],
                        help="token counts of the small operations")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--positions", type=int, default=2000, help="cached positions per sequence (±10%%)")
    parser.add_argument("--expert-tokens", type=int, nargs="+", default=[1, 8, 16, 32, 128, 1024, 8192])
    parser.add_argument("--grouping-tokens", type=int, nargs="+", default=[17, 32, 64, 128, 256, 1024, 8192],
                        help="token counts of group_by_expert (decode batches, then prefills)")
    parser.add_argument("--sum-tokens", type=int, nargs="+", default=[1024, 8192, 14720, 32768],
                        help="token counts of weighted_sum (14,720: the profiled prefill, 16 prompts of 920 tokens)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available() or not triton_common.available():
        sys.exit("bench_kernels needs a CUDA GPU and Triton")
    torch.backends.cuda.matmul.allow_tf32 = False
    global BANDWIDTH, MATMUL_RATE
    ceilings = measure_ceilings()
    BANDWIDTH, MATMUL_RATE = ceilings["copy_bytes_s"], ceilings["matmul_flops"]
    device = torch.cuda.get_device_properties(0)
    print(f"{device.name}, {device.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton_common.triton.__version__}; floors at {BANDWIDTH / 1e12:.2f} TB/s and "
          f"{MATMUL_RATE / 1e12:.0f} TFLOP/s (measured here); errors are "
          f"max|a-b|/max|b| against the PyTorch definition (bf16, and fp32 inputs upcast)", flush=True)
    table = Table(Timer(args.reps, args.warmup))
    table.print_header()
    with torch.inference_mode():
        if "small" in args.ops:
            bench_small_ops(table, args.tokens)
        if "decode" in args.ops:
            bench_decode_attention(table, args.batches, args.positions)
        if "experts" in args.ops:
            bench_routed_experts(table, args.expert_tokens)
        if "grouping" in args.ops:
            bench_grouping(table, args.grouping_tokens)
        if "weighted_sum" in args.ops:
            bench_weighted_sum(table, args.sum_tokens)
    if args.json:
        args.json.write_text(json.dumps(dict(device=device.name, torch=torch.__version__,
                                             triton=triton_common.triton.__version__, rows=table.rows), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
