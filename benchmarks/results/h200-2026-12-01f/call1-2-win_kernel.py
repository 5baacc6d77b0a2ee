"""Exploration: a kernel for SAM's windows alone, one program per (window, view·head), its queries walked in
blocks of 64 then a small tail block (a 14 × 14 window: 3 × 64 + 16 where the general kernel pays 4 × 64),
keys either as two 8 × 16 rectangles (terms gathered per rectangle row and column) or as 1-D runs of the
window's keys (128 + 64 + 16, terms gathered per key)."""
import math

import torch
import triton
import triton.language as tl

_LOG2_E = 1.4426950408889634


@triton.jit
def _key_tile(q, k_at, v_at, by_row, by_col, row_offset, col_offset, first_row, first_col, width, k_token, v_token,
              best, total, acc, score_scale, dim, start,
              WINDOW: tl.constexpr, ENTRIES: tl.constexpr, SIZE: tl.constexpr, ROWS: tl.constexpr,
              COLS: tl.constexpr, LINEAR: tl.constexpr, BLOCK_M: tl.constexpr):
    if LINEAR:
        j = start + tl.arange(0, SIZE)
        key_row, key_col = j // WINDOW, j % WINDOW
        is_key = j < WINDOW * WINDOW
        row_index = tl.minimum(tl.maximum(row_offset[:, None] - key_row[None, :], 0), ENTRIES - 1)
        col_index = tl.minimum(tl.maximum(col_offset[:, None] - key_col[None, :], 0), ENTRIES - 1)
        terms = tl.gather(by_row, row_index, 1) + tl.gather(by_col, col_index, 1)
    else:
        slot = tl.arange(0, ROWS * COLS)
        key_row, key_col = start + slot // COLS, slot % COLS
        is_key = (key_row < WINDOW) & (key_col < WINDOW)
        rect_row = start + tl.arange(0, ROWS)
        rect_col = tl.arange(0, COLS)
        row_index = tl.minimum(tl.maximum(row_offset[:, None] - rect_row[None, :], 0), ENTRIES - 1)
        col_index = tl.minimum(tl.maximum(col_offset[:, None] - rect_col[None, :], 0), ENTRIES - 1)
        terms = tl.reshape(tl.gather(by_row, row_index, 1)[:, :, None] + tl.gather(by_col, col_index, 1)[:, None, :],
                           [BLOCK_M, ROWS * COLS])
    key = (first_row + key_row) * width + first_col + key_col
    k = tl.load(k_at + key[:, None] * k_token + dim[None, :], mask=is_key[:, None], other=0.0)
    v = tl.load(v_at + key[:, None] * v_token + dim[None, :], mask=is_key[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(k)) * score_scale + terms
    scores = tl.where(is_key[None, :], scores, float("-inf"))
    new_best = tl.maximum(best, tl.max(scores, 1))
    weights = tl.exp2(scores - new_best[:, None])
    decay = tl.exp2(best - new_best)
    total = total * decay + tl.sum(weights, 1)
    acc = tl.dot(weights.to(v.dtype), v, acc * decay[:, None])
    return new_best, total, acc


@triton.jit
def _rect_load(k_at, v_at, first_row, first_col, width, k_token, v_token, dim, start,
               WINDOW: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    slot = tl.arange(0, ROWS * COLS)
    key_row, key_col = start + slot // COLS, slot % COLS
    is_key = (key_row < WINDOW) & (key_col < WINDOW)
    key = (first_row + key_row) * width + first_col + key_col
    k = tl.load(k_at + key[:, None] * k_token + dim[None, :], mask=is_key[:, None], other=0.0)
    v = tl.load(v_at + key[:, None] * v_token + dim[None, :], mask=is_key[:, None], other=0.0)
    return k, v, is_key


@triton.jit
def _rect_step(q, k, v, is_key, by_row, by_col, row_offset, col_offset, best, total, acc, score_scale, start,
               ENTRIES: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_M: tl.constexpr):
    rect_row = start + tl.arange(0, ROWS)
    rect_col = tl.arange(0, COLS)
    row_index = tl.minimum(tl.maximum(row_offset[:, None] - rect_row[None, :], 0), ENTRIES - 1)
    col_index = tl.minimum(tl.maximum(col_offset[:, None] - rect_col[None, :], 0), ENTRIES - 1)
    terms = tl.reshape(tl.gather(by_row, row_index, 1)[:, :, None] + tl.gather(by_col, col_index, 1)[:, None, :],
                       [BLOCK_M, ROWS * COLS])
    scores = tl.dot(q, tl.trans(k)) * score_scale + terms
    scores = tl.where(is_key[None, :], scores, float("-inf"))
    new_best = tl.maximum(best, tl.max(scores, 1))
    weights = tl.exp2(scores - new_best[:, None])
    decay = tl.exp2(best - new_best)
    total = total * decay + tl.sum(weights, 1)
    acc = tl.dot(weights.to(v.dtype), v, acc * decay[:, None])
    return new_best, total, acc


@triton.jit
def _query_block(q_at, k_at, v_at, out_at, rel_h, rel_w, first_row, first_col, width, written_width, valid_width,
                 count, start, q_token, k_token, v_token, out_token, score_scale, term_scale,
                 HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, ENTRIES: tl.constexpr, BLOCK_M: tl.constexpr,
                 LINEAR: tl.constexpr, PREFETCH: tl.constexpr):
    local = start + tl.arange(0, BLOCK_M)
    is_query = local < count
    query_row, query_col = local // valid_width, local % valid_width
    query = (first_row + query_row) * width + first_col + query_col
    written = (first_row + query_row) * written_width + first_col + query_col
    dim = tl.arange(0, HEAD_DIM)
    q = tl.load(q_at + query[:, None] * q_token + dim[None, :], mask=is_query[:, None], other=0.0)
    if PREFETCH:
        k0, v0, is_key0 = _rect_load(k_at, v_at, first_row, first_col, width, k_token, v_token, dim, 0, WINDOW, 8, 16)
        k1, v1, is_key1 = _rect_load(k_at, v_at, first_row, first_col, width, k_token, v_token, dim, 8, WINDOW, 8, 16)
    by_row = tl.dot(q, tl.trans(rel_h)) * term_scale
    by_col = tl.dot(q, tl.trans(rel_w)) * term_scale
    row_offset = tl.minimum(query_row, WINDOW - 1) + WINDOW - 1
    col_offset = query_col + WINDOW - 1
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if PREFETCH:
        best, total, acc = _rect_step(q, k0, v0, is_key0, by_row, by_col, row_offset, col_offset, best, total, acc,
                                      score_scale, 0, ENTRIES, 8, 16, BLOCK_M)
        best, total, acc = _rect_step(q, k1, v1, is_key1, by_row, by_col, row_offset, col_offset, best, total, acc,
                                      score_scale, 8, ENTRIES, 8, 16, BLOCK_M)
    elif LINEAR:
        best, total, acc = _key_tile(q, k_at, v_at, by_row, by_col, row_offset, col_offset, first_row, first_col,
                                     width, k_token, v_token, best, total, acc, score_scale, dim, 0,
                                     WINDOW, ENTRIES, 128, 1, 1, True, BLOCK_M)
        best, total, acc = _key_tile(q, k_at, v_at, by_row, by_col, row_offset, col_offset, first_row, first_col,
                                     width, k_token, v_token, best, total, acc, score_scale, dim, 128,
                                     WINDOW, ENTRIES, 64, 1, 1, True, BLOCK_M)
        best, total, acc = _key_tile(q, k_at, v_at, by_row, by_col, row_offset, col_offset, first_row, first_col,
                                     width, k_token, v_token, best, total, acc, score_scale, dim, 192,
                                     WINDOW, ENTRIES, 16, 1, 1, True, BLOCK_M)
    else:
        best, total, acc = _key_tile(q, k_at, v_at, by_row, by_col, row_offset, col_offset, first_row, first_col,
                                     width, k_token, v_token, best, total, acc, score_scale, dim, 0,
                                     WINDOW, ENTRIES, 128, 8, 16, False, BLOCK_M)
        best, total, acc = _key_tile(q, k_at, v_at, by_row, by_col, row_offset, col_offset, first_row, first_col,
                                     width, k_token, v_token, best, total, acc, score_scale, dim, 8,
                                     WINDOW, ENTRIES, 128, 8, 16, False, BLOCK_M)
    acc = acc / total[:, None]
    tl.store(out_at + written[:, None] * out_token + dim[None, :], acc.to(out_at.dtype.element_ty),
             mask=is_query[:, None])


@triton.jit
def _window_attention_kernel(q_ptr, k_ptr, v_ptr, rel_h_ptr, rel_w_ptr, out_ptr,
                             q_view, q_head, q_token, k_view, k_head, k_token, v_view, v_head, v_token,
                             out_view, out_token, out_head, heads, width, windows_across, written_height,
                             written_width, score_scale, term_scale,
                             HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, ENTRIES: tl.constexpr,
                             BLOCK_M: tl.constexpr, TAIL: tl.constexpr, LINEAR: tl.constexpr,
                             PREFETCH: tl.constexpr):
    window = tl.program_id(0)
    view_head = tl.program_id(1).to(tl.int64)
    view, head = view_head // heads, view_head % heads
    first_row = (window // windows_across) * WINDOW
    first_col = (window % windows_across) * WINDOW
    valid_height = tl.minimum(written_height - first_row, WINDOW)
    valid_width = tl.minimum(written_width - first_col, WINDOW)
    count = valid_height * valid_width
    q_at = q_ptr + view * q_view + head * q_head
    k_at = k_ptr + view * k_view + head * k_head
    v_at = v_ptr + view * v_view + head * v_head
    out_at = out_ptr + view * out_view + head * out_head
    dim = tl.arange(0, HEAD_DIM)
    entry = tl.arange(0, ENTRIES)
    rel_h = tl.load(rel_h_ptr + entry[:, None] * HEAD_DIM + dim[None, :], mask=(entry < 2 * WINDOW - 1)[:, None],
                    other=0.0)
    rel_w = tl.load(rel_w_ptr + entry[:, None] * HEAD_DIM + dim[None, :], mask=(entry < 2 * WINDOW - 1)[:, None],
                    other=0.0)
    full = count // BLOCK_M
    for block in range(0, full):
        _query_block(q_at, k_at, v_at, out_at, rel_h, rel_w, first_row, first_col, width, written_width,
                     valid_width, count, block * BLOCK_M, q_token, k_token, v_token, out_token, score_scale,
                     term_scale, HEAD_DIM, WINDOW, ENTRIES, BLOCK_M, LINEAR, PREFETCH)
    for start in range(full * BLOCK_M, count, TAIL):
        _query_block(q_at, k_at, v_at, out_at, rel_h, rel_w, first_row, first_col, width, written_width,
                     valid_width, count, start, q_token, k_token, v_token, out_token, score_scale,
                     term_scale, HEAD_DIM, WINDOW, ENTRIES, TAIL, LINEAR, PREFETCH)


def window_attention(q, k, v, tables, height, width, window, written, block=64, tail=16, linear=False, warps=4,
                     stages=2, prefetch=False):
    batch, heads, tokens, head_dim = q.shape
    rel_h, rel_w = (t.to(q.dtype).contiguous() for t in tables)
    written_height, written_width = written
    out = q.new_empty(batch, written_height * written_width, heads, head_dim)
    windows_across = width // window
    windows = (height // window) * windows_across
    _window_attention_kernel[(windows, batch * heads)](
        q, k, v, rel_h, rel_w, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, width, windows_across, written_height, written_width,
        _LOG2_E / math.sqrt(head_dim), _LOG2_E,
        HEAD_DIM=head_dim, WINDOW=window, ENTRIES=max(16, triton.next_power_of_2(2 * window - 1)),
        BLOCK_M=block, TAIL=tail, LINEAR=linear, PREFETCH=prefetch, num_warps=warps, num_stages=stages)
    return out
