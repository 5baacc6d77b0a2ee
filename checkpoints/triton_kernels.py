"""Triton kernels for the decoder's fused operations, on CUDA.

Each public function takes the arguments and returns the results of the PyTorch definition it
replaces (`fused_ops.py`, `fused_moe.py`, `paged_attention.py`); those definitions are the
specification and the tests' reference. Every kernel computes in float32 and rounds once when it
stores, except where the definition names a rounding point (the residual sum and the normalised
value of RMSNorm; each expert's output and the routed sum of the mixture of experts), which is
reproduced.

All of it can be captured in a CUDA graph: nothing waits for the device, nothing reads a tensor's
values on the host, and every launch size (grid, splits, block sizes) follows from shapes alone.
Kernels take strides, so views such as q and k cut out of one fused projection need no copy.

Triton is optional: this module imports without it (`available()` is then False and the callers keep
to PyTorch). Its import sits in a try block, which also keeps the Hugging Face remote-code loader from
demanding the package. `TRITON_INTERPRET=1` set before Triton is imported runs the kernels on CPU
tensors (the tests do so); the interpreter's matrix product mishandles bfloat16, so under it the
grouped expert GEMMs multiply in float32 (exact for bfloat16 inputs).

Shapes in comments: N tokens, D hidden, H heads, Hkv key/value heads, Dh head dim, E experts,
K experts per token, I expert width, P = N·K (token, expert) pairs, B sequences.
"""

import functools
import os
from typing import Optional

import torch

try:  # optional dependency: without it the PyTorch definitions run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None


def available() -> bool:
    """Whether Triton imported, i.e. whether the functions below can run."""
    return triton is not None


_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Mixture of experts: up to this many (token, expert) pairs each pair reads its expert's rows
# directly (GEMV, no sorting); above it the pairs are grouped by expert and each expert's weights are
# read once per block of pairs (grouped GEMM). 96 pairs = 16 tokens at K = 6, about where the two
# paths cost the same (benchmarks/bench_kernels.py compares them).
GEMV_MAX_PAIRS = 96
# Grouping the pairs by expert runs in one program (one launch) while the padded pair array is at
# most this long (decode batches); longer arrays (prefill) use a counting launch and a parallel one.
ALIGN_ONE_PROGRAM_MAX_ROWS = 8192
# Launch configurations (block sizes are constexprs: each distinct value is one more compilation).
# Few-token experts: gate/up GEMV over (pair, I tile), down GEMV + K-sum over (token, D tile).
GEMV_GATE_UP = dict(BLOCK_I=16, BLOCK_D=256, num_warps=4)
GEMV_DOWN = dict(BLOCK_D=4, BLOCK_I=128, num_warps=4)
# Many-token experts, by block height (rows of one expert): (BLOCK_N, BLOCK_K, num_warps, num_stages)
# of the gate/up GEMM and of the down GEMM.
GROUPED_TILES = {
    16: dict(gate_up=(64, 128, 4, 4), down=(64, 128, 4, 4)),
    32: dict(gate_up=(64, 128, 4, 4), down=(64, 128, 4, 4)),
    128: dict(gate_up=(128, 64, 8, 3), down=(128, 64, 8, 3)),
}
# Paged decode: positions per loop step of one program (at most the cache block size), its warps,
# how many programs to aim for per multiprocessor when choosing how many splits each sequence gets,
# and whether each step reads the next step's keys and values ahead.
DECODE_CHUNK = 32
DECODE_WARPS = 8
DECODE_PROGRAMS_PER_SM = 2
DECODE_PREFETCH = True


def _next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """[..., width] → [rows, width] with unit stride along the width (a view whenever one exists)."""
    rows = tensor.reshape(-1, width)
    return rows if rows.stride(-1) == 1 or width == 1 else rows.contiguous()


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter on the CPU: an H100's count, so the tests take the GPU's launch shapes


if triton is not None:

    # ------------------------------------------------------------ RMSNorm with the residual add

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr,
                             x_row_stride, residual_row_stride, hidden, eps,
                             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < hidden
        summed = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=inside, other=0.0)
            # The sum is rounded: it is the residual stream, and the statistics are taken on it.
            rounded = (summed + residual.to(tl.float32)).to(summed_ptr.dtype.element_ty)
            tl.store(summed_ptr + row * hidden + cols, rounded, mask=inside)
            summed = rounded.to(tl.float32)
        variance = tl.sum(summed * summed, axis=0) / hidden
        normed = (summed * tl.math.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * hidden + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=inside)

    # ------------------------------------------------------------ SiLU-gated product

    @triton.jit
    def _silu_and_mul_kernel(gate_up_ptr, out_ptr, row_stride, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        gate = tl.load(gate_up_ptr + row * row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * row_stride + width + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * width + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty),
                 mask=inside)

    # ------------------------------------------------------------ CLIP's quick GELU

    @triton.jit
    def _quick_gelu_kernel(x_ptr, out_ptr, count, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (x * tl.sigmoid(1.702 * x)).to(out_ptr.dtype.element_ty), mask=inside)

    # ------------------------------------------------------------ rotary embedding

    @triton.jit
    def _rotate_heads(src_ptr, head_stride, dst_ptr, heads, half, cos_lo, cos_hi, sin_lo, sin_hi,
                      BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """One token's heads [heads, 2·half] → rotated, written contiguously at dst."""
        head = tl.arange(0, BLOCK_H)[:, None]
        dim = tl.arange(0, BLOCK_HALF)[None, :]
        inside = (head < heads) & (dim < half)
        src = src_ptr + head * head_stride + dim
        lo = tl.load(src, mask=inside, other=0.0).to(tl.float32)
        hi = tl.load(src + half, mask=inside, other=0.0).to(tl.float32)
        dst = dst_ptr + head * (2 * half) + dim
        # rotate_half(x) = (-hi, lo): dimension i pairs with i + Dh/2.
        tl.store(dst, (lo * cos_lo - hi * sin_lo).to(dst_ptr.dtype.element_ty), mask=inside)
        tl.store(dst + half, (hi * cos_hi + lo * sin_hi).to(dst_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                       q_row_stride, q_head_stride, k_row_stride, k_head_stride, cos_row_stride, sin_row_stride,
                       q_heads, k_heads, half,
                       BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        dim = tl.arange(0, BLOCK_HALF)
        inside = dim < half
        cos_lo = tl.load(cos_ptr + row * cos_row_stride + dim, mask=inside, other=0.0).to(tl.float32)[None, :]
        cos_hi = tl.load(cos_ptr + row * cos_row_stride + half + dim, mask=inside, other=0.0).to(tl.float32)[None, :]
        sin_lo = tl.load(sin_ptr + row * sin_row_stride + dim, mask=inside, other=0.0).to(tl.float32)[None, :]
        sin_hi = tl.load(sin_ptr + row * sin_row_stride + half + dim, mask=inside, other=0.0).to(tl.float32)[None, :]
        _rotate_heads(q_ptr + row * q_row_stride, q_head_stride, q_out_ptr + row * q_heads * 2 * half, q_heads, half,
                      cos_lo, cos_hi, sin_lo, sin_hi, BLOCK_HQ, BLOCK_HALF)
        _rotate_heads(k_ptr + row * k_row_stride, k_head_stride, k_out_ptr + row * k_heads * 2 * half, k_heads, half,
                      cos_lo, cos_hi, sin_lo, sin_hi, BLOCK_HK, BLOCK_HALF)

    # ------------------------------------------------------------ router

    @triton.jit
    def _route_top_k_kernel(logits_ptr, ids_ptr, weights_ptr, row_stride, experts, scaling,
                            TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                            BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        expert = tl.arange(0, BLOCK_E)
        inside = expert < experts
        logits = tl.load(logits_ptr + row * row_stride + expert, mask=inside, other=float("-inf")).to(tl.float32)
        exps = tl.where(inside, tl.exp(logits - tl.max(logits, axis=0)), 0.0)
        scores = exps / tl.sum(exps, axis=0)
        # Greedy top-k: K rounds of argmax, each removing its winner (scores are ≥ 0, so -1 is "gone").
        remaining = tl.where(inside, scores, -1.0)
        slot = tl.arange(0, BLOCK_K)
        chosen = tl.zeros([BLOCK_K], dtype=tl.int32)
        chosen_weights = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            best = tl.argmax(remaining, axis=0)
            chosen = tl.where(slot == k, best, chosen)
            chosen_weights = tl.where(slot == k, tl.max(remaining, axis=0), chosen_weights)
            remaining = tl.where(expert == best, -1.0, remaining)
        if RENORMALIZE:
            chosen_weights = chosen_weights / (tl.sum(chosen_weights, axis=0) + 1e-20)
        used = slot < TOP_K
        tl.store(ids_ptr + row * TOP_K + slot, chosen.to(tl.int64), mask=used)
        tl.store(weights_ptr + row * TOP_K + slot, chosen_weights * scaling, mask=used)

    # ------------------------------------------------------------ routed experts, few tokens (GEMV)

    @triton.jit
    def _experts_gate_up_gemv_kernel(x_ptr, w13_ptr, ids_ptr, h_ptr,
                                     x_row_stride, w13_expert_stride, w13_row_stride, top_k, inter,
                                     HIDDEN: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (pair, tile of I): h[pair, tile] = silu(gate) · up of the pair's token and expert.

        The loop over D is unrolled (D is a compile-time constant), so every load of the tile can be in
        flight at once: with a few tokens this kernel is bound by the latency of reading weights.
        """
        pair = tl.program_id(0)
        token = (pair // top_k).to(tl.int64)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        rows_inside = rows < inter
        gate_rows = w13_ptr + expert * w13_expert_stride + rows[:, None] * w13_row_stride
        up_rows = gate_rows + inter * w13_row_stride
        # Products accumulate per lane and are reduced once at the end, not at every step.
        gate_acc = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
        up_acc = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
        for start in tl.static_range(0, HIDDEN, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            cols_inside = cols < HIDDEN
            xs = tl.load(x_ptr + token * x_row_stride + cols, mask=cols_inside, other=0.0).to(tl.float32)[None, :]
            tile_inside = rows_inside[:, None] & cols_inside[None, :]
            gate_acc += tl.load(gate_rows + cols[None, :], mask=tile_inside, other=0.0).to(tl.float32) * xs
            up_acc += tl.load(up_rows + cols[None, :], mask=tile_inside, other=0.0).to(tl.float32) * xs
        gate = tl.sum(gate_acc, axis=1)
        up = tl.sum(up_acc, axis=1)
        tl.store(h_ptr + pair.to(tl.int64) * inter + rows, (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty),
                 mask=rows_inside)

    @triton.jit
    def _experts_down_sum_gemv_kernel(h_ptr, w2_ptr, ids_ptr, weights_ptr, add_ptr, out_ptr,
                                      w2_expert_stride, w2_row_stride, add_row_stride, top_k, hidden,
                                      INTER: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_K: tl.constexpr,
                                      BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr):
        """Program (token, tile of D): the K experts' down projections of that tile, each rounded,
        weighted and summed in float32, rounded, plus `add`. The loop over I is unrolled, as above."""
        token = tl.program_id(0).to(tl.int64)
        slot = tl.arange(0, BLOCK_K)
        slot_used = slot < top_k
        pair = token * top_k + slot
        expert = tl.load(ids_ptr + pair, mask=slot_used, other=0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cols_inside = cols < hidden
        rows = w2_ptr + expert[:, None, None] * w2_expert_stride + cols[None, :, None] * w2_row_stride  # [K, D, 1]
        rows_inside = slot_used[:, None, None] & cols_inside[None, :, None]
        acc = tl.zeros([BLOCK_K, BLOCK_D, BLOCK_I], dtype=tl.float32)
        for start in tl.static_range(0, INTER, BLOCK_I):
            inner = start + tl.arange(0, BLOCK_I)
            inner_inside = inner < INTER
            h = tl.load(h_ptr + pair[:, None] * INTER + inner[None, :], mask=slot_used[:, None] & inner_inside[None, :],
                        other=0.0).to(tl.float32)
            w = tl.load(rows + inner[None, None, :], mask=rows_inside & inner_inside[None, None, :], other=0.0)
            acc += w.to(tl.float32) * h[:, None, :]
        per_expert = tl.sum(acc, axis=2).to(out_ptr.dtype.element_ty).to(tl.float32)  # [K, D], rounded
        weight = tl.load(weights_ptr + pair, mask=slot_used, other=0.0).to(tl.float32)
        routed = tl.sum(per_expert * weight[:, None], axis=0).to(out_ptr.dtype.element_ty)
        if HAS_ADD:
            extra = tl.load(add_ptr + token * add_row_stride + cols, mask=cols_inside, other=0.0).to(tl.float32)
            routed = (routed.to(tl.float32) + extra).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + token * hidden + cols, routed, mask=cols_inside)

    # ------------------------------------------------------------ routed experts, many tokens (grouped)

    @triton.jit
    def _count_experts_kernel(ids_ptr, counts_ptr, pairs, experts, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
        """counts[e] += how many of this program's pairs chose expert e."""
        pair = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
        expert = tl.arange(0, BLOCK_E)
        ids = tl.load(ids_ptr + pair, mask=pair < pairs, other=-1)
        counts = tl.sum((ids[:, None] == expert[None, :]).to(tl.int32), axis=0)
        tl.atomic_add(counts_ptr + expert, counts, mask=(expert < experts) & (counts > 0))

    @triton.jit
    def _group_by_expert_kernel(ids_ptr, counts_ptr, cursor_ptr, sorted_pairs_ptr, block_expert_ptr,
                                pairs, experts, rows,
                                BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
                                ONE_PROGRAM: tl.constexpr):
        """Lay the pairs out by expert, each expert's run padded to whole blocks of BLOCK_M rows:
        sorted_pairs [rows] holds pair indices (`pairs` in padding rows), block_expert [rows / BLOCK_M]
        each block's expert (`experts` for blocks past the last used one).

        Which row of its expert's run a pair lands in does not change any result (rows of a matrix
        product are independent), so programs claim rows with atomics; ONE_PROGRAM does everything
        in one program (for short arrays: one launch, no counting pass).
        """
        expert = tl.arange(0, BLOCK_E)
        expert_inside = expert < experts
        if ONE_PROGRAM:
            counts = tl.zeros([BLOCK_E], dtype=tl.int32)
            for start in range(0, pairs, CHUNK):
                pair = start + tl.arange(0, CHUNK)
                ids = tl.load(ids_ptr + pair, mask=pair < pairs, other=-1)
                counts += tl.sum((ids[:, None] == expert[None, :]).to(tl.int32), axis=0)
            pair_begin, pair_end = 0, pairs
            row_begin, row_end = 0, rows
        else:
            counts = tl.load(counts_ptr + expert, mask=expert_inside, other=0)
            pair_begin = tl.program_id(0) * CHUNK
            pair_end = tl.minimum(pair_begin + CHUNK, pairs)
            row_begin = tl.program_id(0) * CHUNK
            row_end = tl.minimum(row_begin + CHUNK, rows)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        run_end = tl.cumsum(padded, axis=0)
        run_start = run_end - padded
        claimed = tl.zeros([BLOCK_E], dtype=tl.int32)
        for start in range(pair_begin, pair_end, CHUNK):
            pair = start + tl.arange(0, CHUNK)
            pair_inside = pair < pair_end
            ids = tl.load(ids_ptr + pair, mask=pair_inside, other=-1)
            onehot = ((ids[:, None] == expert[None, :]) & pair_inside[:, None]).to(tl.int32)  # [CHUNK, E]
            chunk_counts = tl.sum(onehot, axis=0)
            if ONE_PROGRAM:
                base = run_start + claimed
                claimed += chunk_counts
            else:
                base = run_start + tl.atomic_add(cursor_ptr + expert, chunk_counts,
                                                 mask=expert_inside & (chunk_counts > 0))
            rank = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of the chunk with the same expert
            row = tl.sum(onehot * (base[None, :] + rank), axis=1)
            tl.store(sorted_pairs_ptr + row, pair, mask=pair_inside)
        filled_end = run_start + counts
        for start in range(row_begin, row_end, CHUNK):
            row = start + tl.arange(0, CHUNK)
            row_inside = row < row_end
            # The run a row falls in: how many runs end at or before it (`experts` past the last run).
            owner = tl.sum(((run_end[None, :] <= row[:, None]) & expert_inside[None, :]).to(tl.int32), axis=1)
            owner_filled_end = tl.sum(tl.where(owner[:, None] == expert[None, :], filled_end[None, :], 0), axis=1)
            tl.store(sorted_pairs_ptr + row, tl.zeros_like(row) + pairs, mask=row_inside & (row >= owner_filled_end))
            tl.store(block_expert_ptr + row // BLOCK_M, owner, mask=row_inside & (row % BLOCK_M == 0))

    @triton.jit
    def _grouped_gate_up_kernel(x_ptr, w13_ptr, sorted_pairs_ptr, block_expert_ptr, h_ptr,
                                x_row_stride, w13_expert_stride, w13_row_stride,
                                pairs, top_k, hidden, inter, experts,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """Program (tile of I, block of pairs): h[rows, tile] = silu(x·gateᵀ) · (x·upᵀ) for the block's expert."""
        block = tl.program_id(1)
        expert = tl.load(block_expert_ptr + block)
        if expert < experts:
            rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
            pair = tl.load(sorted_pairs_ptr + rows)
            pair_inside = pair < pairs
            token = (pair // top_k).to(tl.int64)
            cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            cols_inside = cols < inter
            depth = tl.arange(0, BLOCK_K)
            a_ptrs = x_ptr + token[:, None] * x_row_stride + depth[None, :]
            gate_ptrs = (w13_ptr + expert.to(tl.int64) * w13_expert_stride + cols[None, :] * w13_row_stride
                         + depth[:, None])  # [BLOCK_K, BLOCK_N]: rows of w13 read as columns
            up_ptrs = gate_ptrs + inter * w13_row_stride
            gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, hidden, BLOCK_K):
                depth_inside = start + depth < hidden
                a = tl.load(a_ptrs, mask=pair_inside[:, None] & depth_inside[None, :], other=0.0)
                wg = tl.load(gate_ptrs, mask=depth_inside[:, None] & cols_inside[None, :], other=0.0)
                wu = tl.load(up_ptrs, mask=depth_inside[:, None] & cols_inside[None, :], other=0.0)
                if DOT_IN_FP32:
                    a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
                gate = tl.dot(a, wg, gate, input_precision=PRECISION)
                up = tl.dot(a, wu, up, input_precision=PRECISION)
                a_ptrs += BLOCK_K
                gate_ptrs += BLOCK_K
                up_ptrs += BLOCK_K
            h = (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + rows.to(tl.int64)[:, None] * inter + cols[None, :], h, mask=cols_inside[None, :])

    @triton.jit
    def _grouped_down_kernel(h_ptr, w2_ptr, sorted_pairs_ptr, block_expert_ptr, per_pair_ptr,
                             w2_expert_stride, w2_row_stride,
                             pairs, hidden, inter, experts,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """Program (tile of D, block of pairs): per_pair[pair, tile] = h · downᵀ, rounded, for each real pair."""
        block = tl.program_id(1)
        expert = tl.load(block_expert_ptr + block)
        if expert < experts:
            rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
            pair = tl.load(sorted_pairs_ptr + rows)
            pair_inside = pair < pairs
            cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            cols_inside = cols < hidden
            depth = tl.arange(0, BLOCK_K)
            a_ptrs = h_ptr + rows.to(tl.int64)[:, None] * inter + depth[None, :]
            b_ptrs = (w2_ptr + expert.to(tl.int64) * w2_expert_stride + cols[None, :] * w2_row_stride
                      + depth[:, None])
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, inter, BLOCK_K):
                depth_inside = start + depth < inter
                a = tl.load(a_ptrs, mask=depth_inside[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=depth_inside[:, None] & cols_inside[None, :], other=0.0)
                if DOT_IN_FP32:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
            tl.store(per_pair_ptr + pair.to(tl.int64)[:, None] * hidden + cols[None, :],
                     acc.to(per_pair_ptr.dtype.element_ty), mask=pair_inside[:, None] & cols_inside[None, :])

    @triton.jit
    def _weighted_sum_kernel(per_pair_ptr, weights_ptr, add_ptr, out_ptr, add_row_stride, top_k, hidden,
                             HAS_ADD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[token] = round(Σ_k weight · per_pair[token, k]) (+ add), the sum in float32."""
        token = tl.program_id(0).to(tl.int64)
        slot = tl.arange(0, BLOCK_K)
        slot_used = slot < top_k
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cols_inside = cols < hidden
        pair = token * top_k + slot
        outputs = tl.load(per_pair_ptr + pair[:, None] * hidden + cols[None, :],
                          mask=slot_used[:, None] & cols_inside[None, :], other=0.0).to(tl.float32)
        weight = tl.load(weights_ptr + pair, mask=slot_used, other=0.0).to(tl.float32)
        routed = tl.sum(outputs * weight[:, None], axis=0).to(out_ptr.dtype.element_ty)
        if HAS_ADD:
            extra = tl.load(add_ptr + token * add_row_stride + cols, mask=cols_inside, other=0.0).to(tl.float32)
            routed = (routed.to(tl.float32) + extra).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + token * hidden + cols, routed, mask=cols_inside)

    # ------------------------------------------------------------ paged key/value cache

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, keys_ptr, values_ptr, slots_ptr,
                         k_row_stride, k_head_stride, v_row_stride, v_head_stride,
                         keys_block_stride, keys_head_stride, keys_pos_stride,
                         values_block_stride, values_head_stride, values_pos_stride,
                         heads, head_dim, block_size,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        slot = tl.load(slots_ptr + token).to(tl.int64)
        block, offset = slot // block_size, slot % block_size
        head = tl.arange(0, BLOCK_H)[:, None]
        dim = tl.arange(0, BLOCK_D)[None, :]
        inside = (head < heads) & (dim < head_dim)
        k = tl.load(k_ptr + token * k_row_stride + head * k_head_stride + dim, mask=inside)
        v = tl.load(v_ptr + token * v_row_stride + head * v_head_stride + dim, mask=inside)
        tl.store(keys_ptr + block * keys_block_stride + head * keys_head_stride + offset * keys_pos_stride + dim,
                 k.to(keys_ptr.dtype.element_ty), mask=inside)
        tl.store(values_ptr + block * values_block_stride + head * values_head_stride + offset * values_pos_stride
                 + dim, v.to(values_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _load_kv_chunk(chunk, last, length, table, keys_base, values_base, keys_block_stride, keys_pos_stride,
                       values_block_stride, values_pos_stride, dim, dim_inside,
                       BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr):
        """Keys and values [CHUNK, Dh] of one chunk of a sequence's positions, and which positions exist
        (none when chunk ≥ last: nothing is read)."""
        start = chunk * CHUNK
        exists = chunk < last
        block = tl.load(table + start // BLOCK_SIZE, mask=exists, other=0).to(tl.int64)
        lane = tl.arange(0, CHUNK)
        within = start % BLOCK_SIZE + lane
        visible = (start + lane < length) & exists
        inside = visible[:, None] & dim_inside[None, :]
        k = tl.load(keys_base + block * keys_block_stride + within[:, None] * keys_pos_stride + dim[None, :],
                    mask=inside, other=0.0)
        v = tl.load(values_base + block * values_block_stride + within[:, None] * values_pos_stride + dim[None, :],
                    mask=inside, other=0.0)
        return k, v, visible

    @triton.jit
    def _attend_chunk(k, v, visible, q, lane_max, lane_sum, lane_out):
        """One online-softmax step per lane (position modulo CHUNK): no reduction across lanes."""
        score = tl.where(visible, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        new_max = tl.maximum(lane_max, score)
        rescale = tl.exp2(lane_max - new_max)
        p = tl.exp2(score - new_max)
        lane_sum = lane_sum * rescale + p
        lane_out = lane_out * rescale[:, None] + p[:, None] * v.to(tl.float32)
        return new_max, lane_sum, lane_out

    @triton.jit
    def _paged_decode_kernel(q_ptr, keys_ptr, values_ptr, tables_ptr, seq_lens_ptr,
                             out_ptr, partial_out_ptr, partial_stats_ptr,
                             q_batch_stride, q_head_stride,
                             keys_block_stride, keys_head_stride, keys_pos_stride,
                             values_block_stride, values_head_stride, values_pos_stride,
                             table_row_stride, heads, queries_per_kv, head_dim, max_positions, num_splits,
                             scale_log2,
                             BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                             ONE_SPLIT: tl.constexpr, PREFETCH: tl.constexpr):
        """Program (sequence, head, split): online softmax over its share of the sequence's positions.

        Each of the CHUNK lanes keeps its own running maximum, sum and weighted values, so the loop
        has no reduction across lanes; the lanes are combined once at the end. With one split the
        program writes the output; otherwise it writes its unnormalised output and (max, sum) for
        `_combine_splits_kernel`.
        """
        seq = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        split = tl.program_id(2)
        kv_head = (head // queries_per_kv).to(tl.int64)
        length = tl.minimum(tl.load(seq_lens_ptr + seq), max_positions)
        chunks = tl.cdiv(length, CHUNK)
        per_split = tl.cdiv(chunks, num_splits)
        first = split * per_split
        last = tl.minimum(first + per_split, chunks)

        dim = tl.arange(0, BLOCK_D)
        dim_inside = dim < head_dim
        q = tl.load(q_ptr + seq * q_batch_stride + head * q_head_stride + dim, mask=dim_inside, other=0.0)
        q = q.to(tl.float32) * scale_log2  # scores in log2 units: exp2 below
        lane_max = tl.full([CHUNK], -1e30, dtype=tl.float32)  # finite: a lane that sees nothing stays NaN-free
        lane_sum = tl.zeros([CHUNK], dtype=tl.float32)
        lane_out = tl.zeros([CHUNK, BLOCK_D], dtype=tl.float32)
        keys_base = keys_ptr + kv_head * keys_head_stride
        values_base = values_ptr + kv_head * values_head_stride
        table = tables_ptr + seq * table_row_stride
        if PREFETCH:
            # The next chunk's block id, keys and values are read while this chunk is computed.
            k, v, visible = _load_kv_chunk(first, last, length, table, keys_base, values_base, keys_block_stride,
                                           keys_pos_stride, values_block_stride, values_pos_stride, dim, dim_inside,
                                           BLOCK_SIZE, CHUNK)
            for chunk in range(first, last):
                next_k, next_v, next_visible = _load_kv_chunk(
                    chunk + 1, last, length, table, keys_base, values_base, keys_block_stride, keys_pos_stride,
                    values_block_stride, values_pos_stride, dim, dim_inside, BLOCK_SIZE, CHUNK)
                lane_max, lane_sum, lane_out = _attend_chunk(k, v, visible, q, lane_max, lane_sum, lane_out)
                k, v, visible = next_k, next_v, next_visible
        else:
            for chunk in range(first, last):
                k, v, visible = _load_kv_chunk(chunk, last, length, table, keys_base, values_base, keys_block_stride,
                                               keys_pos_stride, values_block_stride, values_pos_stride, dim,
                                               dim_inside, BLOCK_SIZE, CHUNK)
                lane_max, lane_sum, lane_out = _attend_chunk(k, v, visible, q, lane_max, lane_sum, lane_out)
        top = tl.max(lane_max, axis=0)
        lane_weight = tl.exp2(lane_max - top)
        total = tl.sum(lane_sum * lane_weight, axis=0)
        out = tl.sum(lane_out * lane_weight[:, None], axis=0)
        if ONE_SPLIT:
            out = out / tl.where(total > 0, total, 1.0)  # no position (length 0): zeros
            tl.store(out_ptr + (seq * heads + head) * head_dim + dim, out.to(out_ptr.dtype.element_ty),
                     mask=dim_inside)
        else:
            partial = (seq * heads + head) * num_splits + split
            tl.store(partial_out_ptr + partial * head_dim + dim, out, mask=dim_inside)
            tl.store(partial_stats_ptr + partial * 2, top)
            tl.store(partial_stats_ptr + partial * 2 + 1, total)

    @triton.jit
    def _combine_splits_kernel(partial_out_ptr, partial_stats_ptr, out_ptr, out_batch_stride, out_head_stride,
                               heads, head_dim, num_splits, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        seq = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        split = tl.arange(0, BLOCK_S)
        split_inside = split < num_splits
        partial = (seq * heads + head) * num_splits + split
        top = tl.load(partial_stats_ptr + partial * 2, mask=split_inside, other=-1e30)
        total = tl.load(partial_stats_ptr + partial * 2 + 1, mask=split_inside, other=0.0)
        weight = tl.exp2(top - tl.max(top, axis=0))
        total = tl.sum(total * weight, axis=0)
        dim = tl.arange(0, BLOCK_D)
        dim_inside = dim < head_dim
        outs = tl.load(partial_out_ptr + partial[:, None] * head_dim + dim[None, :],
                       mask=split_inside[:, None] & dim_inside[None, :], other=0.0)
        out = tl.sum(outs * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + seq * out_batch_stride + head * out_head_stride + dim, out.to(out_ptr.dtype.element_ty),
                 mask=dim_inside)


# ---------------------------------------------------------------- fused_ops.py


def add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float):
    """(RMSNorm(x + residual), x + residual), or (RMSNorm(x), x) without a residual: see fused_ops."""
    hidden = x.shape[-1]
    rows = _rows(x, hidden)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is None:
        summed, residual_rows = x, rows
    else:
        summed = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        residual_rows = _rows(residual.expand(x.shape), hidden)
    if rows.shape[0]:
        block = _next_power_of_2(hidden)
        _add_rms_norm_kernel[(rows.shape[0],)](
            rows, residual_rows, weight.contiguous(), out, summed, rows.stride(0), residual_rows.stride(0), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 8))
    return out, summed


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate then up) → silu(gate) · up [..., I]."""
    width = gate_up.shape[-1] // 2
    rows = _rows(gate_up, 2 * width)
    out = torch.empty(gate_up.shape[:-1] + (width,), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] and width:
        block = min(_next_power_of_2(width), 1024)
        _silu_and_mul_kernel[(rows.shape[0], _cdiv(width, block))](
            rows, out, rows.stride(0), width, BLOCK=block, num_warps=min(max(block // 256, 1), 4))
    return out


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x · sigmoid(1.702 · x) in float32, rounded once: one read and one write of x."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        block = 1024
        _quick_gelu_kernel[(_cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block, num_warps=4)
    return out


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Queries [..., T, H, Dh] and keys [..., T, Hkv, Dh] rotated by cos/sin [..., T, Dh] (half-split
    layout). Returns new contiguous tensors; q and k may be strided views (e.g. of a fused projection)."""
    *lead, q_heads, head_dim = q.shape
    k_heads = k.shape[-2]
    q_rows = q.reshape(-1, q_heads, head_dim)
    k_rows = k.reshape(-1, k_heads, head_dim)
    if q_rows.stride(-1) != 1:
        q_rows = q_rows.contiguous()
    if k_rows.stride(-1) != 1:
        k_rows = k_rows.contiguous()
    cos_rows = _rows(cos.expand(*lead, head_dim), head_dim)
    sin_rows = _rows(sin.expand(*lead, head_dim), head_dim)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q_rows.shape[0]:
        half = head_dim // 2
        _rotary_kernel[(q_rows.shape[0],)](
            q_rows, k_rows, cos_rows, sin_rows, q_out, k_out,
            q_rows.stride(0), q_rows.stride(1), k_rows.stride(0), k_rows.stride(1), cos_rows.stride(0),
            sin_rows.stride(0), q_heads, k_heads, half,
            BLOCK_HQ=_next_power_of_2(q_heads), BLOCK_HK=_next_power_of_2(k_heads),
            BLOCK_HALF=_next_power_of_2(half), num_warps=4)
    return q_out, k_out


def route_top_k(logits: torch.Tensor, top_k: int, renormalize: bool, scaling: float):
    """Router logits [N, E] → (expert ids [N, K] int64, weights [N, K] float32): see fused_ops."""
    tokens, experts = logits.shape
    rows = _rows(logits, experts)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    if tokens and top_k:
        _route_top_k_kernel[(tokens,)](
            rows, ids, weights, rows.stride(0), experts, float(scaling),
            TOP_K=top_k, RENORMALIZE=bool(renormalize and top_k > 1),
            BLOCK_E=_next_power_of_2(experts), BLOCK_K=_next_power_of_2(top_k), num_warps=1)
    return ids, weights


# ---------------------------------------------------------------- fused_moe.py


def _grouped_block_m(pairs: int, experts: int) -> int:
    """Height of the grouped GEMMs' blocks (rows of one expert). While the weights dominate (few pairs
    per expert) about an expert's share, so that few rows are padding: 16 (the matrix unit's minimum)
    or 32; beyond that 128, the most efficient tile (measured faster than 64 from a few dozen pairs per
    expert up to the largest prefills)."""
    per_expert = pairs / max(experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 128


def routed_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, expert_ids: torch.Tensor,
                   expert_weights: torch.Tensor, add: Optional[torch.Tensor] = None, *,
                   path: Optional[str] = None) -> torch.Tensor:
    """x [N, D], w13 [E, 2I, D], w2 [E, D, I], expert_ids [N, K], expert_weights [N, K]
    → Σ_k weight · expert_k(x) (+ add) [N, D]: see fused_moe.

    `path` forces "gemv" or "grouped" (tests and benchmarks); by default GEMV up to GEMV_MAX_PAIRS pairs.
    """
    tokens, hidden = x.shape
    top_k = expert_ids.shape[1]
    experts, inter = w13.shape[0], w13.shape[1] // 2
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("routed_experts: w13 and w2 must be contiguous along their last dimension")
    pairs = tokens * top_k
    if pairs == 0:  # no token, or no expert per token: the routed sum is zero
        routed = torch.zeros(tokens, hidden, dtype=x.dtype, device=x.device)
        return routed if add is None else routed + add
    out_dtype = x.dtype if add is None else torch.promote_types(x.dtype, add.dtype)
    out = torch.empty(tokens, hidden, dtype=out_dtype, device=x.device)
    x = _rows(x, hidden)
    ids = expert_ids.reshape(-1).contiguous()
    weights = expert_weights.reshape(-1).to(torch.float32).contiguous()
    add_rows = _rows(add.expand(tokens, hidden), hidden) if add is not None else out
    block_k = _next_power_of_2(top_k)
    path = path or ("gemv" if pairs <= GEMV_MAX_PAIRS else "grouped")
    if path == "gemv":
        h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
        # Pairs vary fastest across programs: pairs that share an expert read its rows together (L2).
        _experts_gate_up_gemv_kernel[(pairs, _cdiv(inter, GEMV_GATE_UP["BLOCK_I"]))](
            x, w13, ids, h, x.stride(0), w13.stride(0), w13.stride(1), top_k, inter, HIDDEN=hidden, **GEMV_GATE_UP)
        _experts_down_sum_gemv_kernel[(tokens, _cdiv(hidden, GEMV_DOWN["BLOCK_D"]))](
            h, w2, ids, weights, add_rows, out, w2.stride(0), w2.stride(1), add_rows.stride(0), top_k, hidden,
            INTER=inter, HAS_ADD=add is not None, BLOCK_K=block_k, **GEMV_DOWN)
        return out
    if path != "grouped":
        raise ValueError(f"routed_experts: path must be 'gemv' or 'grouped', not {path!r}")

    block_m = _grouped_block_m(pairs, experts)
    tiles = GROUPED_TILES[block_m]
    # Static bound on the padded layout: each used expert adds less than one block of padding.
    max_blocks = _cdiv(pairs, block_m) + min(experts, pairs)
    rows = max_blocks * block_m
    sorted_pairs = torch.empty(rows, dtype=torch.int32, device=x.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=x.device)
    block_e = _next_power_of_2(experts)
    chunk = 128 if block_e <= 64 else 64
    if rows <= ALIGN_ONE_PROGRAM_MAX_ROWS:
        _group_by_expert_kernel[(1,)](
            ids, ids, ids, sorted_pairs, block_expert, pairs, experts, rows,
            BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=chunk, ONE_PROGRAM=True, num_warps=4)
    else:
        tallies = torch.zeros(2, experts, dtype=torch.int32, device=x.device)  # counts, claimed rows
        _count_experts_kernel[(_cdiv(pairs, chunk),)](ids, tallies[0], pairs, experts, BLOCK_E=block_e, CHUNK=chunk,
                                                      num_warps=4)
        _group_by_expert_kernel[(_cdiv(rows, chunk),)](
            ids, tallies[0], tallies[1], sorted_pairs, block_expert, pairs, experts, rows,
            BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=chunk, ONE_PROGRAM=False, num_warps=4)

    # float32 (not the model's case): exact products, and half the depth per stage to fit shared memory.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    depth_divisor = max(x.element_size() // 2, 1)
    h = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    block_n, block_kd, warps, stages = tiles["gate_up"]
    # Tiles of one block vary fastest: the block's rows of x stay in L2 while its tiles run.
    _grouped_gate_up_kernel[(_cdiv(inter, block_n), max_blocks)](
        x, w13, sorted_pairs, block_expert, h, x.stride(0), w13.stride(0), w13.stride(1),
        pairs, top_k, hidden, inter, experts,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=max(block_kd // depth_divisor, 16), DOT_IN_FP32=_INTERPRETED,
        PRECISION=precision, num_warps=warps, num_stages=stages)
    per_pair = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    block_n, block_kd, warps, stages = tiles["down"]
    _grouped_down_kernel[(_cdiv(hidden, block_n), max_blocks)](
        h, w2, sorted_pairs, block_expert, per_pair, w2.stride(0), w2.stride(1), pairs, hidden, inter, experts,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=max(block_kd // depth_divisor, 16), DOT_IN_FP32=_INTERPRETED,
        PRECISION=precision, num_warps=warps, num_stages=stages)
    block_d = min(_next_power_of_2(hidden), 256)
    _weighted_sum_kernel[(tokens, _cdiv(hidden, block_d))](
        per_pair, weights, add_rows, out, add_rows.stride(0), top_k, hidden,
        HAS_ADD=add is not None, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)
    return out


# ---------------------------------------------------------------- paged_attention.py


def store_kv(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Write k/v [T, Hkv, Dh] into one layer's blocks [num_blocks, Hkv, block_size, Dh] at flat `slots` [T]."""
    tokens, heads, head_dim = k.shape
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("store_kv: the cache blocks must be contiguous along the head dimension")
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if tokens == 0:
        return
    slots = slots.contiguous()
    _store_kv_kernel[(tokens,)](
        k, v, keys, values, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        heads, head_dim, keys.shape[2],
        BLOCK_H=_next_power_of_2(heads), BLOCK_D=_next_power_of_2(head_dim), num_warps=4)


def decode_splits(batch: int, heads: int, table_width: int, block_size: int, device: torch.device) -> int:
    """How many programs share each (sequence, head): enough programs to fill the GPU at small
    batches, one at large ones. A function of shapes only (a CUDA graph replays it unchanged)."""
    chunks = table_width * block_size // min(DECODE_CHUNK, block_size)
    target = DECODE_PROGRAMS_PER_SM * _multiprocessors(device)
    return max(1, min(_cdiv(target, max(batch * heads, 1)), chunks, 64))


def paged_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, *, num_splits: Optional[int] = None) -> torch.Tensor:
    """q [B, H, Dh] over one layer's blocks [num_blocks, Hkv, block_size, Dh] → [B, H, Dh]: see paged_attention.

    `num_splits` overrides the split count (tests and benchmarks).
    """
    batch, heads, head_dim = q.shape
    kv_heads, block_size = keys.shape[1], keys.shape[2]
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("paged_decode_attention: the cache blocks must be contiguous along the head dimension")
    if heads % kv_heads:
        raise ValueError(f"paged_decode_attention: {heads} query heads do not divide into {kv_heads} key/value heads")
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    table_width = block_tables.shape[1]
    chunk = min(DECODE_CHUNK, block_size)
    if block_size % chunk:
        raise ValueError(f"paged_decode_attention: block size {block_size} must be a multiple of {chunk}")
    splits = num_splits or decode_splits(batch, heads, table_width, block_size, q.device)
    block_d = _next_power_of_2(head_dim)
    one_split = splits == 1
    if one_split:
        partial_out = partial_stats = out  # unused
    else:
        partial_out = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
        partial_stats = torch.empty(batch, heads, splits, 2, dtype=torch.float32, device=q.device)
    scale_log2 = 1.4426950408889634 / head_dim ** 0.5  # log2(e) / sqrt(Dh): SDPA's default scale
    _paged_decode_kernel[(batch, heads, splits)](
        q, keys, values, block_tables, seq_lens, out, partial_out, partial_stats,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), block_tables.stride(0),
        heads, heads // kv_heads, head_dim, table_width * block_size, splits, scale_log2,
        BLOCK_SIZE=block_size, CHUNK=chunk, BLOCK_D=block_d, ONE_SPLIT=one_split, PREFETCH=DECODE_PREFETCH,
        num_warps=DECODE_WARPS)
    if not one_split:
        _combine_splits_kernel[(batch, heads)](
            partial_out, partial_stats, out, out.stride(0), out.stride(1), heads, head_dim, splits,
            BLOCK_S=_next_power_of_2(splits), BLOCK_D=block_d, num_warps=4)
    return out
