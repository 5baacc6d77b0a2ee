"""Triton kernels of the routed experts in `fused_moe.py`, and the function that launches them.

Few (token, expert) pairs read their experts' rows directly (a GEMV per pair); many are grouped by
expert and each expert's weights are read once per block of pairs (grouped GEMMs), then the K
outputs of each token are weighted and summed. `triton_common.py` says what all the families share.
Triton's interpreter mishandles bfloat16 in its matrix product, so under it the grouped GEMMs
multiply in float32 (exact for bfloat16 inputs).

Shapes in comments: N tokens, D hidden, E experts, K experts per token, I expert width,
P = N·K (token, expert) pairs.
"""

from typing import Optional

import torch

from .triton_common import (_INTERPRETED, _cdiv, _next_power_of_2, _rows, _wait_for_previous, available,  # noqa: F401
                            launch_options, tl, triton)

# Mixture of experts: up to this many (token, expert) pairs each pair reads its expert's rows
# directly (GEMV, no sorting); above it the pairs are grouped by expert and each expert's weights are
# read once per block of pairs (grouped GEMM). 96 pairs = 16 tokens at K = 6, about where the two
# paths cost the same (benchmarks/bench_kernels.py compares them).
GEMV_MAX_PAIRS = 96
# Grouping the pairs by expert runs in one program (one launch) while the padded pair array is at
# most this long; longer arrays use a counting launch and a parallel one. One program walks the whole
# padded array serially: at a 256-row decode step (3,584 rows with 64 experts) it took ~120 µs a layer,
# 20% of the step's kernel time on the H200, and the parallel launches 16 µs; from the smallest grouped
# batch (17 tokens) the parallel mode is faster (`bench_kernels.py --ops grouping`,
# benchmarks/results/h200-2026-11-30g). With 64 experts every grouped batch pads past 1,024 rows, so one
# program is left to small models (tests) and to that comparison.
ALIGN_ONE_PROGRAM_MAX_ROWS = 1024
# Launch configurations (block sizes are constexprs: each distinct value is one more compilation).
# Few-token experts: gate/up GEMV over (pair, I tile), down GEMV + K-sum over (token, D tile). Chosen among
# 17 tiles by the batch-1 step on the H200 (`bench_engine.py --b1-variants`, benchmarks/results/h200-2026-11-30j):
# gate/up 8 rows a program instead of 16 took the step from 0.840 to 0.823 ms, down 256 columns of I a step
# instead of 128 to 0.828.
GEMV_GATE_UP = dict(BLOCK_I=8, BLOCK_D=256, num_warps=4)
GEMV_DOWN = dict(BLOCK_D=4, BLOCK_I=256, num_warps=4)
# Many-token experts, by block height (rows of one expert): (BLOCK_N, BLOCK_K, num_warps, num_stages)
# of the gate/up GEMM and of the down GEMM.
GROUPED_TILES = {
    16: dict(gate_up=(64, 128, 4, 4), down=(64, 128, 4, 4)),
    32: dict(gate_up=(64, 128, 4, 4), down=(64, 128, 4, 4)),
    128: dict(gate_up=(128, 64, 8, 3), down=(128, 64, 8, 3)),
}
# The grouped path's last step, out = Σ_k weight · per_pair (+ add), `_weighted_sum_kernel` by named launch
# configuration (benchmarks/bench_kernels.py --ops weighted_sum times each at prefill sizes; the default
# was the fastest there, with most others within a few percent): BLOCK_T tokens a program, a BLOCK_D tile of
# D (`whole_row`: every tile of the row, one after another), slots added one after another. Keys: BLOCK_T,
# BLOCK_D, whole_row, num_warps. (The first kernel, one token a program with its slots padded to a tile and
# reduced by tl.sum, ran at a tenth of the bandwidth: benchmarks/results/h200-2026-11-30b/weighted-sum.log.)
WEIGHTED_SUM_VARIANTS = {
    "tokens1_d256_warps1": dict(BLOCK_T=1, BLOCK_D=256, whole_row=False, num_warps=1),
    "tokens4_d256_warps4": dict(BLOCK_T=4, BLOCK_D=256, whole_row=False, num_warps=4),
    "tokens8_d256_warps4": dict(BLOCK_T=8, BLOCK_D=256, whole_row=False, num_warps=4),
    "tokens16_d256_warps8": dict(BLOCK_T=16, BLOCK_D=256, whole_row=False, num_warps=8),
    "tokens4_d512_warps4": dict(BLOCK_T=4, BLOCK_D=512, whole_row=False, num_warps=4),
    "tokens8_d512_warps8": dict(BLOCK_T=8, BLOCK_D=512, whole_row=False, num_warps=8),
    "tokens2_d1024_warps4": dict(BLOCK_T=2, BLOCK_D=1024, whole_row=False, num_warps=4),
    "tokens1_d2048_warps8": dict(BLOCK_T=1, BLOCK_D=2048, whole_row=False, num_warps=8),
    "tokens2_row_d256_warps2": dict(BLOCK_T=2, BLOCK_D=256, whole_row=True, num_warps=2),
    "tokens4_row_d256_warps4": dict(BLOCK_T=4, BLOCK_D=256, whole_row=True, num_warps=4),
}
WEIGHTED_SUM_VARIANT = "tokens4_d256_warps4"


if triton is not None:

    # ------------------------------------------------------------ routed experts, few tokens (GEMV)

    @triton.jit
    def _experts_gate_up_gemv_kernel(x_ptr, w13_ptr, ids_ptr, shared_ptr, h_ptr,
                                     x_row_stride, w13_expert_stride, w13_row_stride, shared_row_stride,
                                     pairs, top_k, inter, shared_width,
                                     HIDDEN: tl.constexpr, SHARED_PARTS: tl.constexpr, BLOCK_I: tl.constexpr,
                                     BLOCK_D: tl.constexpr, PROGRAMMATIC: tl.constexpr):
        """Program (row of h, tile of I): h[row, tile] = silu(gate) · up. Rows below `pairs` are the (token, expert)
        pairs; the rest, SHARED_PARTS a token, are the shared experts cut into parts of the experts' width I
        (part p: rows p·I.. of their gate and of their up projection), so that a token's parts lie one after
        another in h as the shared experts' own intermediate row.

        The loop over D is unrolled (D is a compile-time constant), so every load of the tile can be in
        flight at once: with a few tokens this kernel is bound by the latency of reading weights.
        """
        _wait_for_previous(PROGRAMMATIC)
        program = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        rows_inside = rows < inter
        if program < pairs:
            token = (program // top_k).to(tl.int64)
            expert = tl.load(ids_ptr + program).to(tl.int64)
            gate_rows = w13_ptr + expert * w13_expert_stride + rows[:, None] * w13_row_stride
            up_rows = gate_rows + inter * w13_row_stride
        else:
            part = program - pairs
            token = (part // SHARED_PARTS).to(tl.int64)
            gate_rows = shared_ptr + ((part % SHARED_PARTS) * inter + rows[:, None]).to(tl.int64) * shared_row_stride
            up_rows = gate_rows + shared_width * shared_row_stride
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
        tl.store(h_ptr + program.to(tl.int64) * inter + rows,
                 (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty), mask=rows_inside)

    @triton.jit
    def _experts_down_sum_gemv_kernel(h_ptr, w2_ptr, ids_ptr, weights_ptr, add_ptr, shared_down_ptr, out_ptr,
                                      w2_expert_stride, w2_row_stride, add_row_stride, shared_down_row_stride,
                                      pairs, top_k, hidden,
                                      INTER: tl.constexpr, HAS_ADD: tl.constexpr, SHARED_WIDTH: tl.constexpr,
                                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr,
                                      PROGRAMMATIC: tl.constexpr):
        """Program (token, tile of D): the K experts' down projections of that tile, each rounded,
        weighted and summed in float32, rounded; plus the shared experts' down projection of their
        intermediate row (SHARED_WIDTH wide, after the pairs' rows in h), rounded, or plus `add`. The loops
        over I are unrolled, as above."""
        _wait_for_previous(PROGRAMMATIC)
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
        if SHARED_WIDTH > 0:
            shared_h = h_ptr + pairs.to(tl.int64) * INTER + token * SHARED_WIDTH  # the token's parts, in order
            shared_rows = shared_down_ptr + cols[:, None].to(tl.int64) * shared_down_row_stride  # [D, 1]
            shared_acc = tl.zeros([BLOCK_D, BLOCK_I], dtype=tl.float32)
            for start in tl.static_range(0, SHARED_WIDTH, BLOCK_I):
                inner = start + tl.arange(0, BLOCK_I)
                inner_inside = inner < SHARED_WIDTH
                h = tl.load(shared_h + inner, mask=inner_inside, other=0.0).to(tl.float32)
                w = tl.load(shared_rows + inner[None, :], mask=cols_inside[:, None] & inner_inside[None, :], other=0.0)
                shared_acc += w.to(tl.float32) * h[None, :]
            shared = tl.sum(shared_acc, axis=1).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded, as added
            routed = (routed.to(tl.float32) + shared).to(out_ptr.dtype.element_ty)
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
    def _weighted_sum_kernel(per_pair_ptr, weights_ptr, add_ptr, out_ptr, add_row_stride, tokens, hidden,
                             TOP_K: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_D: tl.constexpr, ROW_TILES: tl.constexpr):
        """Program (block of BLOCK_T tokens, ROW_TILES tiles of D): out = round(Σ_k weight · per_pair) (+ add).

        Each product is rounded to float32 and added onto +0 one slot after another, k = 0 first: the
        bits of PyTorch's `acc = acc + per_pair[:, k].float() * weight[:, k]` in float32, on any device,
        provided the launch turns FMA contraction off (enable_fp_fusion=False). The K loads of a tile
        are unrolled (K is a compile-time constant), so all of them can be in flight at once; no
        padding slot is read.
        """
        token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        token_inside = token < tokens
        first_pair = token.to(tl.int64) * TOP_K  # [T]; pair · D passes 2³¹ near 280,000 tokens
        for tile in tl.static_range(ROW_TILES):
            cols = (tl.program_id(1) * ROW_TILES + tile) * BLOCK_D + tl.arange(0, BLOCK_D)
            inside = token_inside[:, None] & (cols < hidden)[None, :]
            acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
            for slot in tl.static_range(TOP_K):
                pair = first_pair + slot
                weight = tl.load(weights_ptr + pair, mask=token_inside, other=0.0)
                output = tl.load(per_pair_ptr + pair[:, None] * hidden + cols[None, :], mask=inside, other=0.0)
                acc = acc + output.to(tl.float32) * weight[:, None]
            routed = acc.to(out_ptr.dtype.element_ty)
            if HAS_ADD:
                extra = tl.load(add_ptr + token.to(tl.int64)[:, None] * add_row_stride + cols[None, :], mask=inside,
                                other=0.0)
                routed = (routed.to(tl.float32) + extra.to(tl.float32)).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + token.to(tl.int64)[:, None] * hidden + cols[None, :], routed, mask=inside)


def weighted_sum(per_pair: torch.Tensor, weights: torch.Tensor, top_k: int, add: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None, *, variant: Optional[str] = None) -> torch.Tensor:
    """per_pair [N·K, D] (each token's K expert outputs, slot k of token n in row n·K + k), weights
    [N·K] float32, add [N, D] or None → out [N, D] = round(Σ_k weight · per_pair) (+ add, after that
    rounding), in `out` if given (its dtype), else in per_pair's dtype.

    `variant` names an entry of WEIGHTED_SUM_VARIANTS (default WEIGHTED_SUM_VARIANT).
    """
    pairs, hidden = per_pair.shape
    tokens = pairs // top_k
    if out is None:
        out = torch.empty(tokens, hidden, dtype=per_pair.dtype, device=per_pair.device)
    if per_pair.stride(-1) != 1 or per_pair.stride(0) != hidden or not out.is_contiguous():
        raise ValueError("weighted_sum: per_pair and out must be contiguous")
    if add is not None and add.stride(-1) != 1:
        raise ValueError("weighted_sum: add must be contiguous along its last dimension")
    if tokens == 0:
        return out
    name = variant or WEIGHTED_SUM_VARIANT
    config = dict(WEIGHTED_SUM_VARIANTS[name])
    add_rows = add if add is not None else out
    block_t, block_d = config.pop("BLOCK_T"), min(_next_power_of_2(hidden), config.pop("BLOCK_D"))
    row_tiles = _cdiv(hidden, block_d) if config.pop("whole_row") else 1
    _weighted_sum_kernel[(_cdiv(tokens, block_t), _cdiv(hidden, block_d * row_tiles))](
        per_pair, weights, add_rows, out, add_rows.stride(0), tokens, hidden,
        TOP_K=top_k, HAS_ADD=add is not None, BLOCK_T=block_t, BLOCK_D=block_d, ROW_TILES=row_tiles,
        enable_fp_fusion=False, **config)
    return out


def _grouped_block_m(pairs: int, experts: int) -> int:
    """Height of the grouped GEMMs' blocks (rows of one expert). While the weights dominate (few pairs
    per expert) about an expert's share, so that few rows are padding: 16 (the matrix unit's minimum)
    or 32; beyond that 128, the most efficient tile (measured faster than 64 from a few dozen pairs per
    expert up to the largest prefills)."""
    per_expert = pairs / max(experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 128


def group_by_expert(ids: torch.Tensor, experts: int, block_m: int,
                    one_program: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [P] (each pair's expert) → (sorted_pairs [R], block_expert [R / block_m]): the layout of
    `_group_by_expert_kernel`, R a static bound (each used expert adds less than one block of padding),
    so that a captured graph replays it for any routing. `one_program` forces the one-launch or the
    parallel mode (benchmarks); by default one program up to ALIGN_ONE_PROGRAM_MAX_ROWS rows."""
    pairs = ids.numel()
    max_blocks = _cdiv(pairs, block_m) + min(experts, pairs)
    rows = max_blocks * block_m
    sorted_pairs = torch.empty(rows, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=ids.device)
    block_e = _next_power_of_2(experts)
    chunk = 128 if block_e <= 64 else 64
    if one_program if one_program is not None else rows <= ALIGN_ONE_PROGRAM_MAX_ROWS:
        _group_by_expert_kernel[(1,)](
            ids, ids, ids, sorted_pairs, block_expert, pairs, experts, rows,
            BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=chunk, ONE_PROGRAM=True, num_warps=4)
    else:
        tallies = torch.zeros(2, experts, dtype=torch.int32, device=ids.device)  # counts, claimed rows
        _count_experts_kernel[(_cdiv(pairs, chunk),)](ids, tallies[0], pairs, experts, BLOCK_E=block_e, CHUNK=chunk,
                                                      num_warps=4)
        _group_by_expert_kernel[(_cdiv(rows, chunk),)](
            ids, tallies[0], tallies[1], sorted_pairs, block_expert, pairs, experts, rows,
            BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=chunk, ONE_PROGRAM=False, num_warps=4)
    return sorted_pairs, block_expert


def gemv_takes(tokens: int, top_k: int) -> bool:
    """Whether `routed_experts` reads the experts of `tokens` tokens by GEMVs (the path that takes `shared`)."""
    return tokens * top_k <= GEMV_MAX_PAIRS


def takes_shared(tokens: int, top_k: int, inter: int, shared_width: int) -> bool:
    """Whether `routed_experts` computes shared experts of `shared_width` beside these tokens' experts of width
    `inter`: on the GEMV path, with at least one expert a token, in whole parts of the experts' width."""
    return tokens > 0 and top_k > 0 and gemv_takes(tokens, top_k) and shared_width % inter == 0


def routed_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, expert_ids: torch.Tensor,
                   expert_weights: torch.Tensor, add: Optional[torch.Tensor] = None, *,
                   shared: Optional[tuple] = None, path: Optional[str] = None) -> torch.Tensor:
    """x [N, D], w13 [E, 2I, D], w2 [E, D, I], expert_ids [N, K], expert_weights [N, K]
    → Σ_k weight · expert_k(x) (+ add) [N, D]: see fused_moe.

    `shared` = (gate_up [2S, D], down [D, S]): the shared experts (width S, a multiple of I), computed inside the
    two GEMV kernels and added as `add` would be (GEMV path only; not with `add`).
    `path` forces "gemv" or "grouped" (tests and benchmarks); by default GEMV up to GEMV_MAX_PAIRS pairs.
    """
    tokens, hidden = x.shape
    top_k = expert_ids.shape[1]
    experts, inter = w13.shape[0], w13.shape[1] // 2
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("routed_experts: w13 and w2 must be contiguous along their last dimension")
    pairs = tokens * top_k
    if pairs == 0:  # no token, or no expert per token: the routed sum is zero
        if shared is not None and tokens:
            raise ValueError("routed_experts: the shared experts are computed beside at least one expert a token")
        routed = torch.zeros(tokens, hidden, dtype=x.dtype, device=x.device)
        return routed if add is None else routed + add
    out_dtype = x.dtype if add is None else torch.promote_types(x.dtype, add.dtype)
    out = torch.empty(tokens, hidden, dtype=out_dtype, device=x.device)
    x = _rows(x, hidden)
    ids = expert_ids.reshape(-1).contiguous()
    weights = expert_weights.reshape(-1).to(torch.float32).contiguous()
    add_rows = _rows(add.expand(tokens, hidden), hidden) if add is not None else out
    block_k = _next_power_of_2(top_k)
    path = path or ("gemv" if gemv_takes(tokens, top_k) else "grouped")
    if shared is not None:
        shared_gate_up, shared_down = shared
        width = shared_down.shape[1]
        if path != "gemv" or add is not None:
            raise ValueError("routed_experts: the shared experts are computed on the GEMV path only, without add")
        if (not takes_shared(tokens, top_k, inter, width) or tuple(shared_gate_up.shape) != (2 * width, hidden)
                or shared_down.shape[0] != hidden or shared_gate_up.stride(-1) != 1 or shared_down.stride(-1) != 1):
            raise ValueError(f"routed_experts: shared experts of gate/up {tuple(shared_gate_up.shape)} and down "
                             f"{tuple(shared_down.shape)} do not go beside {tokens} token(s) of {top_k} experts of "
                             f"width {inter} (at most {GEMV_MAX_PAIRS} pairs, in whole parts of that width)")
        parts = width // inter
    else:
        shared_gate_up = shared_down = w13  # not read
        width, parts = 0, 1
    if path == "gemv":
        h = torch.empty(pairs + (tokens * parts if width else 0), inter, dtype=x.dtype, device=x.device)
        # Pairs vary fastest across programs: pairs that share an expert read its rows together (L2).
        _experts_gate_up_gemv_kernel[(h.shape[0], _cdiv(inter, GEMV_GATE_UP["BLOCK_I"]))](
            x, w13, ids, shared_gate_up, h, x.stride(0), w13.stride(0), w13.stride(1), shared_gate_up.stride(0),
            pairs, top_k, inter, width, HIDDEN=hidden, SHARED_PARTS=parts, **GEMV_GATE_UP,
            **launch_options(x.device))
        _experts_down_sum_gemv_kernel[(tokens, _cdiv(hidden, GEMV_DOWN["BLOCK_D"]))](
            h, w2, ids, weights, add_rows, shared_down, out, w2.stride(0), w2.stride(1), add_rows.stride(0),
            shared_down.stride(0), pairs, top_k, hidden, INTER=inter, HAS_ADD=add is not None, SHARED_WIDTH=width,
            BLOCK_K=block_k, **GEMV_DOWN, **launch_options(x.device))
        return out
    if path != "grouped":
        raise ValueError(f"routed_experts: path must be 'gemv' or 'grouped', not {path!r}")

    block_m = _grouped_block_m(pairs, experts)
    tiles = GROUPED_TILES[block_m]
    sorted_pairs, block_expert = group_by_expert(ids, experts, block_m)
    rows, max_blocks = sorted_pairs.numel(), block_expert.numel()

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
    return weighted_sum(per_pair, weights, top_k, add_rows if add is not None else None, out)
