"""Exploration (not served): variants of the grid kernel's rectangle terms and of table_terms."""
import math
import sys
import os
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
import importlib, importlib.machinery, importlib.util
if "checkpoints" not in sys.modules:
    _spec = importlib.machinery.ModuleSpec("checkpoints", None, is_package=True)
    _package = importlib.util.module_from_spec(_spec)
    _package.__path__ = [os.path.join(REPO, "checkpoints")]
    sys.modules["checkpoints"] = _package
import torch
from checkpoints.triton_common import _INTERPRETED, _cdiv, tl, triton
from checkpoints import triton_relative_attention as tra
from checkpoints.triton_relative_attention import _softmax_step, _LOG2_E, key_tiles, TILE_KEYS, BLOCK_QUERIES, WARPS, STAGES


@triton.jit
def _grid_kernel_dot(q_ptr, k_ptr, v_ptr, rows_ptr, cols_ptr, out_ptr,
                     q_view, q_head, q_token, k_view, k_head, k_token, v_view, v_head, v_token,
                     rows_view, rows_head, rows_token, cols_view, cols_head, cols_token,
                     out_view, out_token, out_head,
                     heads, height, width, score_scale, term_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, TILE_ROWS: tl.constexpr,
                     TILE_COLS: tl.constexpr, TERM_K: tl.constexpr, AHEAD: tl.constexpr,
                     DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr, COVERED: tl.constexpr):
    # rectangles only: each rectangle's row and column entries loaded as one [BLOCK_M, TERM_K] tile, spread over
    # the rectangle's keys by one product with a fixed one-hot [TERM_K, keys] matrix
    block = tl.program_id(0)
    view_head = tl.program_id(1).to(tl.int64)
    view, head = view_head // heads, view_head % heads
    query = block * BLOCK_M + tl.arange(0, BLOCK_M)
    is_query = query < height * width
    dim = tl.arange(0, HEAD_DIM)
    slot = tl.arange(0, TILE_ROWS * TILE_COLS)
    slot_row, slot_col = slot // TILE_COLS, slot % TILE_COLS
    q = tl.load(q_ptr + view * q_view + head * q_head + query[:, None] * q_token + dim[None, :],
                mask=is_query[:, None], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    k_at = k_ptr + view * k_view + head * k_head
    v_at = v_ptr + view * v_view + head * v_head
    rows_at = rows_ptr + view * rows_view + head * rows_head + query * rows_token
    cols_at = cols_ptr + view * cols_view + head * cols_head + query * cols_token
    entry = tl.arange(0, TERM_K)
    is_row_entry = entry < TILE_ROWS
    is_col_entry = (entry >= TILE_ROWS) & (entry < TILE_ROWS + TILE_COLS)
    one_hot = (((entry[:, None] == slot_row[None, :]) & is_row_entry[:, None])
               | ((entry[:, None] == TILE_ROWS + slot_col[None, :]) & is_col_entry[:, None]))
    one_hot = one_hot.to(q.dtype)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    tiles_across = tl.cdiv(width, TILE_COLS)
    if AHEAD:
        entries = _term_entries(rows_at, cols_at, is_query, 0, 0, height, width, entry, is_row_entry, is_col_entry,
                                TILE_ROWS)
    for tile in range(0, tl.cdiv(height, TILE_ROWS) * tiles_across):
        tile_row = (tile // tiles_across) * TILE_ROWS
        tile_col = (tile % tiles_across) * TILE_COLS
        key_row, key_col = tile_row + slot_row, tile_col + slot_col
        is_key = (key_row < height) & (key_col < width)
        key = key_row * width + key_col
        k = tl.load(k_at + key[:, None] * k_token + dim[None, :], mask=is_key[:, None], other=0.0)
        v = tl.load(v_at + key[:, None] * v_token + dim[None, :], mask=is_key[:, None], other=0.0)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if AHEAD:
            these = entries
            following = tile + 1
            entries = _term_entries(rows_at, cols_at, is_query, (following // tiles_across) * TILE_ROWS,
                                    (following % tiles_across) * TILE_COLS, height, width, entry, is_row_entry,
                                    is_col_entry, TILE_ROWS)
        else:
            these = _term_entries(rows_at, cols_at, is_query, tile_row, tile_col, height, width, entry, is_row_entry,
                                  is_col_entry, TILE_ROWS)
        if DOT_IN_FP32:
            these = these.to(tl.float32)
        terms = tl.dot(these, one_hot, input_precision=PRECISION) * term_scale
        products = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        scores = products * score_scale + terms
        if not COVERED:
            scores = tl.where(is_key[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        total, acc = _softmax_step(scores, new_best, best, new_best, total, acc, v, PRECISION)
        best = new_best
    acc = acc / total[:, None]
    tl.store(out_ptr + view * out_view + query[:, None] * out_token + head * out_head + dim[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=is_query[:, None])


@triton.jit
def _term_entries(rows_at, cols_at, is_query, tile_row, tile_col, height, width, entry, is_row_entry, is_col_entry,
                  TILE_ROWS: tl.constexpr):
    row_line = tile_row + entry
    col_line = tile_col + entry - TILE_ROWS
    valid = (is_row_entry & (row_line < height)) | (is_col_entry & (col_line < width))
    where = tl.where(is_row_entry[None, :], rows_at[:, None] + row_line[None, :], cols_at[:, None] + col_line[None, :])
    return tl.load(where, mask=is_query[:, None] & valid[None, :], other=0.0)


def grid_attention_dot(q, k, v, row_terms, col_terms, height, width, ahead=False, tiles=None):
    batch, heads, tokens, head_dim = q.shape
    tile_rows, tile_cols = key_tiles(height, width, TILE_KEYS)
    assert tile_rows > 1
    block_queries, warps, stages = tiles or (BLOCK_QUERIES, WARPS, STAGES)
    out = q.new_empty(batch, tokens, heads, head_dim)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               row_terms.stride(0), row_terms.stride(1), row_terms.stride(2),
               col_terms.stride(0), col_terms.stride(1), col_terms.stride(2))
    _grid_kernel_dot[(_cdiv(tokens, block_queries), batch * heads)](
        q, k, v, row_terms, col_terms, out, *strides, out.stride(0), out.stride(1), out.stride(2),
        heads, height, width, _LOG2_E / math.sqrt(head_dim), _LOG2_E, HEAD_DIM=head_dim, BLOCK_M=block_queries,
        TILE_ROWS=tile_rows, TILE_COLS=tile_cols, TERM_K=max(16, triton.next_power_of_2(tile_rows + tile_cols)),
        AHEAD=ahead, DOT_IN_FP32=_INTERPRETED, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        COVERED=height % tile_rows == 0 and width % tile_cols == 0, num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _raster_terms_kernel(q_ptr, rel_h_ptr, rel_w_ptr, rows_ptr, cols_ptr, q_view, q_head, q_token,
                         out_view, out_head, out_token, heads, tokens, width, walk_height, walk_width,
                         HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ENTRIES: tl.constexpr,
                         DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # A block of tokens in raster order: q read once, each token against every entry of both tables (one product
    # each), every product stored where its key line lies: entry e of a token at place p meets key line
    # p − e + s − 1 (kept where that is within 0 .. s − 1).
    token = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    view_head = tl.program_id(1).to(tl.int64)
    view, head = view_head // heads, view_head % heads
    is_token = token < tokens
    dim = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + view * q_view + head * q_head + token[:, None] * q_token + dim[None, :],
                mask=is_token[:, None], other=0.0)
    entry = tl.arange(0, ENTRIES)
    h_table = tl.load(rel_h_ptr + entry[:, None] * HEAD_DIM + dim[None, :],
                      mask=(entry < 2 * walk_height - 1)[:, None], other=0.0)
    w_table = tl.load(rel_w_ptr + entry[:, None] * HEAD_DIM + dim[None, :],
                      mask=(entry < 2 * walk_width - 1)[:, None], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
        h_table = h_table.to(tl.float32)
        w_table = w_table.to(tl.float32)
    out_at = view * out_view + head * out_head + token[:, None] * out_token
    by_row = tl.dot(q, tl.trans(h_table), input_precision=PRECISION)
    line = (token // width) % walk_height
    key_line = line[:, None] - entry[None, :] + walk_height - 1
    tl.store(rows_ptr + out_at + key_line, by_row.to(rows_ptr.dtype.element_ty),
             mask=is_token[:, None] & (key_line >= 0) & (key_line < walk_height))
    by_col = tl.dot(q, tl.trans(w_table), input_precision=PRECISION)
    line = (token % width) % walk_width
    key_line = line[:, None] - entry[None, :] + walk_width - 1
    tl.store(cols_ptr + out_at + key_line, by_col.to(cols_ptr.dtype.element_ty),
             mask=is_token[:, None] & (key_line >= 0) & (key_line < walk_width))


def raster_terms(q, rel_h, rel_w, height, width, window=0, block=64, warps=4):
    batch, heads, tokens, head_dim = q.shape
    walk_height, walk_width = (window, window) if window else (height, width)
    rel_h = rel_h.to(q.dtype).contiguous()
    rel_w = rel_w.to(q.dtype).contiguous()
    pad = _cdiv(max(walk_height, walk_width), 8) * 8
    rows = q.new_empty(batch, heads, tokens, _cdiv(walk_height, 8) * 8)
    cols = q.new_empty(batch, heads, tokens, _cdiv(walk_width, 8) * 8)
    assert rows.stride() == cols.stride() or True
    out_strides = rows.stride()
    assert rows.stride() == cols.stride(), "same padding for both tables in this variant"
    _raster_terms_kernel[(_cdiv(tokens, block), batch * heads)](
        q, rel_h, rel_w, rows, cols, q.stride(0), q.stride(1), q.stride(2), *out_strides[:3], heads, tokens, width,
        walk_height, walk_width, HEAD_DIM=head_dim, BLOCK=block,
        ENTRIES=max(16, triton.next_power_of_2(2 * max(walk_height, walk_width) - 1)), DOT_IN_FP32=_INTERPRETED,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps)
    return rows, cols


@triton.jit
def _row_walk_kernel(q_ptr, k_ptr, v_ptr, rows_ptr, cols_ptr, out_ptr,
                     q_view, q_head, q_token, k_view, k_head, k_token, v_view, v_head, v_token,
                     rows_view, rows_head, rows_token, cols_view, cols_head, cols_token,
                     out_view, out_token, out_head,
                     heads, height, width, score_scale, term_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, TILE_COLS: tl.constexpr,
                     WS: tl.constexpr, STAGES_LOOP: tl.constexpr, DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # the grid kernel's whole-row walk, its loop a tl.range (warp specialisation, loop stages)
    block = tl.program_id(0)
    view_head = tl.program_id(1).to(tl.int64)
    view, head = view_head // heads, view_head % heads
    query = block * BLOCK_M + tl.arange(0, BLOCK_M)
    is_query = query < height * width
    dim = tl.arange(0, HEAD_DIM)
    slot_col = tl.arange(0, TILE_COLS)
    q = tl.load(q_ptr + view * q_view + head * q_head + query[:, None] * q_token + dim[None, :],
                mask=is_query[:, None], other=0.0)
    k_at = k_ptr + view * k_view + head * k_head
    v_at = v_ptr + view * v_view + head * v_head
    rows_at = rows_ptr + view * rows_view + head * rows_head + query * rows_token
    cols_at = cols_ptr + view * cols_view + head * cols_head + query * cols_token
    col_terms = tl.load(cols_at[:, None] + slot_col[None, :], mask=is_query[:, None] & (slot_col < width)[None, :],
                        other=0.0).to(tl.float32) * term_scale
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for tile_row in tl.range(0, height, warp_specialize=WS, num_stages=STAGES_LOOP):
        key = tile_row * width + slot_col
        k = tl.load(k_at + key[:, None] * k_token + dim[None, :])
        v = tl.load(v_at + key[:, None] * v_token + dim[None, :])
        row_term = tl.load(rows_at + tile_row, mask=is_query, other=0.0).to(tl.float32) * term_scale
        products = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        scores = products * score_scale + col_terms
        new_best = tl.maximum(best, tl.max(scores, 1) + row_term)
        total, acc = _softmax_step(scores, new_best - row_term, best, new_best, total, acc, v, PRECISION)
        best = new_best
    acc = acc / total[:, None]
    tl.store(out_ptr + view * out_view + query[:, None] * out_token + head * out_head + dim[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=is_query[:, None])


def row_walk(q, k, v, row_terms, col_terms, height, width, ws=False, stages=3, tiles=None):
    batch, heads, tokens, head_dim = q.shape
    block_queries, warps, _ = tiles or (BLOCK_QUERIES, WARPS, STAGES)
    out = q.new_empty(batch, tokens, heads, head_dim)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               row_terms.stride(0), row_terms.stride(1), row_terms.stride(2),
               col_terms.stride(0), col_terms.stride(1), col_terms.stride(2))
    _row_walk_kernel[(_cdiv(tokens, block_queries), batch * heads)](
        q, k, v, row_terms, col_terms, out, *strides, out.stride(0), out.stride(1), out.stride(2),
        heads, height, width, _LOG2_E / math.sqrt(head_dim), _LOG2_E, HEAD_DIM=head_dim, BLOCK_M=block_queries,
        TILE_COLS=width, WS=ws, STAGES_LOOP=stages, DOT_IN_FP32=_INTERPRETED,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _row_walk_tma_kernel(q_ptr, k_desc, v_desc, rows_ptr, cols_ptr, out_ptr,
                         q_view, q_head, q_token, rows_view, rows_head, rows_token, cols_view, cols_head, cols_token,
                         out_view, out_token, out_head,
                         heads, height, width, score_scale, term_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, TILE_COLS: tl.constexpr,
                         WS: tl.constexpr, STAGES_LOOP: tl.constexpr, PRECISION: tl.constexpr):
    # the whole-row walk with k and v read by TMA: descriptors over [views, tokens, heads, d]
    block = tl.program_id(0)
    view_head = tl.program_id(1)
    view, head = view_head // heads, view_head % heads
    query = block * BLOCK_M + tl.arange(0, BLOCK_M)
    is_query = query < height * width
    dim = tl.arange(0, HEAD_DIM)
    slot_col = tl.arange(0, TILE_COLS)
    view64 = view.to(tl.int64)
    head64 = head.to(tl.int64)
    q = tl.load(q_ptr + view64 * q_view + head64 * q_head + query[:, None] * q_token + dim[None, :],
                mask=is_query[:, None], other=0.0)
    rows_at = rows_ptr + view64 * rows_view + head64 * rows_head + query * rows_token
    cols_at = cols_ptr + view64 * cols_view + head64 * cols_head + query * cols_token
    col_terms = tl.load(cols_at[:, None] + slot_col[None, :], mask=is_query[:, None] & (slot_col < width)[None, :],
                        other=0.0).to(tl.float32) * term_scale
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for tile_row in tl.range(0, height, warp_specialize=WS, num_stages=STAGES_LOOP):
        k = k_desc.load([view, tile_row * width, head, 0]).reshape(TILE_COLS, HEAD_DIM)
        v = v_desc.load([view, tile_row * width, head, 0]).reshape(TILE_COLS, HEAD_DIM)
        row_term = tl.load(rows_at + tile_row, mask=is_query, other=0.0).to(tl.float32) * term_scale
        products = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        scores = products * score_scale + col_terms
        new_best = tl.maximum(best, tl.max(scores, 1) + row_term)
        total, acc = _softmax_step(scores, new_best - row_term, best, new_best, total, acc, v, PRECISION)
        best = new_best
    acc = acc / total[:, None]
    tl.store(out_ptr + view64 * out_view + query[:, None] * out_token + head64 * out_head + dim[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=is_query[:, None])


def row_walk_tma(q, k, v, row_terms, col_terms, height, width, ws=False, stages=3, tiles=None):
    """k, v: [B, n, N, d] views whose token stride and head stride are those of a fused [B, N, 3, n, d]."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    batch, heads, tokens, head_dim = q.shape
    block_queries, warps, _ = tiles or (BLOCK_QUERIES, WARPS, STAGES)
    out = q.new_empty(batch, tokens, heads, head_dim)

    def described(x):
        return TensorDescriptor(x, [batch, tokens, heads, head_dim], [x.stride(0), x.stride(2), x.stride(1), 1],
                                [1, width, 1, head_dim])
    _row_walk_tma_kernel[(_cdiv(tokens, block_queries), batch * heads)](
        q, described(k), described(v), row_terms, col_terms, out, q.stride(0), q.stride(1), q.stride(2),
        row_terms.stride(0), row_terms.stride(1), row_terms.stride(2),
        col_terms.stride(0), col_terms.stride(1), col_terms.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, height, width, _LOG2_E / math.sqrt(head_dim), _LOG2_E, HEAD_DIM=head_dim, BLOCK_M=block_queries,
        TILE_COLS=width, WS=ws, STAGES_LOOP=stages, PRECISION="tf32", num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _line_terms_multi_kernel(q_ptr, table_ptr, out_ptr, q_view, q_head, q_token, out_view, out_head, out_token,
                             heads, view_heads, length, line_step, along_step, walk,
                             HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ENTRIES: tl.constexpr, GROUP: tl.constexpr,
                             STAGES_LOOP: tl.constexpr, PRECISION: tl.constexpr):
    # _line_terms_kernel for GROUP view·heads a program: the line's table entries loaded once, the view·heads'
    # queries in a pipelined loop
    along = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    line = tl.program_id(1)
    first = tl.program_id(2) * GROUP
    is_token = along < length
    token = line * line_step + along * along_step
    dim = tl.arange(0, HEAD_DIM)
    key = tl.arange(0, ENTRIES)
    is_key = key < walk
    entry = tl.where(is_key, line % walk - key + walk - 1, 0)
    table = tl.load(table_ptr + entry[:, None] * HEAD_DIM + dim[None, :], mask=is_key[:, None], other=0.0)
    for view_head in tl.range(first, tl.minimum(first + GROUP, view_heads), num_stages=STAGES_LOOP):
        vh = tl.cast(view_head, tl.int64)
        view, head = vh // heads, vh % heads
        q = tl.load(q_ptr + view * q_view + head * q_head + token[:, None] * q_token + dim[None, :],
                    mask=is_token[:, None], other=0.0)
        terms = tl.dot(q, tl.trans(table), input_precision=PRECISION)
        tl.store(out_ptr + view * out_view + head * out_head + token[:, None] * out_token + key[None, :],
                 terms.to(out_ptr.dtype.element_ty), mask=is_token[:, None] & is_key[None, :])


def table_terms_multi(q, rel_h, rel_w, height, width, window=0, group=12, stages=3, warps=4):
    batch, heads, tokens, head_dim = q.shape
    walk_height, walk_width = (window, window) if window else (height, width)
    terms = []
    for table, walk, lines, length, line_step, along_step in ((rel_h, walk_height, height, width, width, 1),
                                                               (rel_w, walk_width, width, height, 1, width)):
        table = table.to(q.dtype).contiguous()
        out = q.new_empty(batch, heads, tokens, _cdiv(walk, 8) * 8)
        block = max(16, min(64, triton.next_power_of_2(length)))
        _line_terms_multi_kernel[(_cdiv(length, block), lines, _cdiv(batch * heads, group))](
            q, table, out, q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
            heads, batch * heads, length, line_step, along_step, walk,
            HEAD_DIM=head_dim, BLOCK=block, ENTRIES=max(16, triton.next_power_of_2(walk)), GROUP=group,
            STAGES_LOOP=stages, PRECISION="tf32", num_warps=warps, num_stages=stages)
        terms.append(out)
    return tuple(terms)
