"""Triton kernels of the paged key/value cache in `paged_attention.py`: writing keys and values into
their slots, decode attention read from the blocks in place (one program per sequence, head and
split of the sequence, then a reduction of the splits), and the prefill's causal attention of packed
prompts over their own tokens (one program per block of a prompt's queries and head, the prompts'
bounds read from a table on the device, so that a CUDA graph of the prefill serves prompts of any
lengths). Each kernel sits beside the function that launches it; `triton_common.py` says what all the
families share.

Shapes in comments: T tokens, H heads, Hkv key/value heads, Dh head dim, B sequences.
"""

from typing import Optional

import torch

from .triton_common import (_INTERPRETED, _cdiv, _multiprocessors, _next_power_of_2, _wait_for_previous,  # noqa: F401
                            available, launch_options, tl, triton)

# Paged decode: positions per loop step of one program (at most the cache block size), its warps,
# how many programs to aim for per multiprocessor when choosing how many splits each sequence gets,
# and whether each step reads the next step's keys and values ahead.
DECODE_CHUNK = 32
DECODE_WARPS = 8
DECODE_PROGRAMS_PER_SM = 2
DECODE_PREFETCH = True
# A step of at most DECODE_FEW_ROWS sequences walks smaller chunks with fewer warps: at batch 1 (~27 splits
# of ~1,000 positions) chunks of 16 with 4 warps took the step from 0.840 to 0.824 ms on the H200, and with 2
# warps from 0.671 (chunks of 32, 8 warps) to 0.646 once the projections were GEMVs of their own
# (benchmarks/results/h200-2026-11-30j, `bench_engine.py --b1-variants`); larger steps keep the above.
DECODE_FEW_ROWS = 4
DECODE_FEW_CHUNK = 16
DECODE_FEW_WARPS = 2


# ---------------------------------------------------------------- writing the cache


if triton is not None:

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, keys_ptr, values_ptr, slots_ptr,
                         k_row_stride, k_head_stride, v_row_stride, v_head_stride,
                         keys_block_stride, keys_head_stride, keys_pos_stride,
                         values_block_stride, values_head_stride, values_pos_stride,
                         heads, head_dim, block_size,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PROGRAMMATIC: tl.constexpr):
        _wait_for_previous(PROGRAMMATIC)
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
        BLOCK_H=_next_power_of_2(heads), BLOCK_D=_next_power_of_2(head_dim), num_warps=4,
        **launch_options(k.device))


# ---------------------------------------------------------------- decode attention


if triton is not None:

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
                             ONE_SPLIT: tl.constexpr, PREFETCH: tl.constexpr, PROGRAMMATIC: tl.constexpr):
        """Program (sequence, head, split): online softmax over its share of the sequence's positions.

        Each of the CHUNK lanes keeps its own running maximum, sum and weighted values, so the loop
        has no reduction across lanes; the lanes are combined once at the end. With one split the
        program writes the output; otherwise it writes its unnormalised output and (max, sum) for
        `_combine_splits_kernel`.
        """
        _wait_for_previous(PROGRAMMATIC)
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
                               heads, head_dim, num_splits, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                               PROGRAMMATIC: tl.constexpr):
        _wait_for_previous(PROGRAMMATIC)
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
    few = batch <= DECODE_FEW_ROWS
    chunk = min(DECODE_FEW_CHUNK if few else DECODE_CHUNK, block_size)
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
        num_warps=DECODE_FEW_WARPS if few else DECODE_WARPS, **launch_options(q.device))
    if not one_split:
        _combine_splits_kernel[(batch, heads)](
            partial_out, partial_stats, out, out.stride(0), out.stride(1), heads, head_dim, splits,
            BLOCK_S=_next_power_of_2(splits), BLOCK_D=block_d, num_warps=4, **launch_options(q.device))
    return out


# ---------------------------------------------------------------- prefill attention

# Queries a program, keys a step, warps and stages of the prefill kernel. A page's prompt (~920 tokens) is
# ~15 blocks of queries; its attention is ~2% of a prefill's arithmetic (the experts' GEMMs are the rest).
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
PREFILL_WARPS = 4
PREFILL_STAGES = 3
_WORK_COLUMNS = 3  # a work row: (first token of the prompt, its end, the program's first query)


def prefill_work(prompt_lengths, rows: Optional[int] = None) -> torch.Tensor:
    """The prefill kernel's table for packed prompts of these lengths: a row per block of PREFILL_BLOCK_M
    queries of a prompt, (prompt's first token, its end, the block's first query), int64 on the host; padded
    to `rows` rows of (0, 0, 0), which do nothing (`prefill_work_rows` bounds how many a layout needs)."""
    table = []
    start = 0
    for length in prompt_lengths:
        end = start + int(length)
        table.extend((start, end, first) for first in range(start, end, PREFILL_BLOCK_M))
        start = end
    if rows is not None:
        if len(table) > rows:
            raise ValueError(f"prefill_work: {len(table)} blocks of queries do not fit in {rows} rows")
        table.extend([(0, 0, 0)] * (rows - len(table)))
    return torch.tensor(table, dtype=torch.long).reshape(-1, _WORK_COLUMNS)


def prefill_work_rows(tokens: int, prompts: int) -> int:
    """The most work rows `prompts` prompts of `tokens` tokens in all can need (each prompt's last block may be
    partial)."""
    return tokens // PREFILL_BLOCK_M + prompts


if triton is not None:

    @triton.jit
    def _prefill_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, work_ptr,
                                  q_token, q_head, k_token, k_head, v_token, v_head, out_token, out_head,
                                  queries_per_kv, head_dim, scale_log2,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                  DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr):
        """Program (work row, head): a block of one prompt's queries against that prompt's keys up to the
        block's last query (causal), an online softmax a step of BLOCK_N keys. A row of (0, 0, 0) does nothing."""
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        start = tl.load(work_ptr + row * 3)
        end = tl.load(work_ptr + row * 3 + 1)
        first = tl.load(work_ptr + row * 3 + 2)
        if first < end:
            kv_head = head // queries_per_kv
            query = first + tl.arange(0, BLOCK_M)
            is_query = query < end
            dim = tl.arange(0, BLOCK_D)
            is_dim = dim < head_dim
            q = tl.load(q_ptr + query[:, None] * q_token + head * q_head + dim[None, :],
                        mask=is_query[:, None] & is_dim[None, :], other=0.0)
            if DOT_IN_FP32:
                q = q.to(tl.float32)
            best = tl.full([BLOCK_M], float("-inf"), tl.float32)
            total = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            stop = tl.minimum(first + BLOCK_M, end)  # past the block's last query nothing is visible to it
            for key_start in range(start, stop, BLOCK_N):
                key = key_start + tl.arange(0, BLOCK_N)
                is_key = key < stop
                k = tl.load(k_ptr + key[:, None] * k_token + kv_head * k_head + dim[None, :],
                            mask=is_key[:, None] & is_dim[None, :], other=0.0)
                v = tl.load(v_ptr + key[:, None] * v_token + kv_head * v_head + dim[None, :],
                            mask=is_key[:, None] & is_dim[None, :], other=0.0)
                if DOT_IN_FP32:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # log2 units: exp2 below
                visible = (key[None, :] <= query[:, None]) & is_key[None, :]
                scores = tl.where(visible, scores, float("-inf"))
                # A query's first step always sees the prompt's first key: its maximum is finite from there on
                # (the rows past the prompt's end, never stored, may not be).
                new_best = tl.maximum(best, tl.max(scores, 1))
                weights = tl.exp2(scores - new_best[:, None])
                decay = tl.exp2(best - new_best)
                total = total * decay + tl.sum(weights, 1)
                acc = tl.dot(weights.to(v.dtype), v, acc * decay[:, None], input_precision=PRECISION)
                best = new_best
            out = acc / total[:, None]
            tl.store(out_ptr + query[:, None] * out_token + head * out_head + dim[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=is_query[:, None] & is_dim[None, :])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Causal attention of packed prompts over their own tokens: q [T, H, Dh], k/v [T, Hkv, Dh] → [T, H, Dh];
    `work` [rows, 3] on q's device (`prefill_work`) names the prompts. Tokens no row covers (a CUDA graph's
    padding beyond its prompts, when the caller leaves them out) are left unwritten."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"prefill_attention: {heads} query heads do not divide into {kv_heads} key/value heads")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    work = work.contiguous()
    out = torch.empty(tokens, heads, head_dim, dtype=q.dtype, device=q.device)
    if tokens == 0 or work.shape[0] == 0:
        return out
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _prefill_attention_kernel[(work.shape[0], heads)](
        q, k, v, out, work, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), heads // kv_heads, head_dim, 1.4426950408889634 / head_dim ** 0.5,
        BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, BLOCK_D=max(_next_power_of_2(head_dim), 16),
        DOT_IN_FP32=_INTERPRETED, PRECISION=precision, num_warps=PREFILL_WARPS, num_stages=PREFILL_STAGES)
    return out
