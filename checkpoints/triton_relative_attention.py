"""Triton kernels of SAM's attention with its decomposed relative positions added inside the kernel:
softmax(q·kᵀ/√d + row_terms[i, r] + col_terms[i, c])·v over a height × width grid, where key (r, c) is
the key of grid row r and column c and the terms are `deepencoder`'s q·rel_h and q·rel_w. The grid kernel
serves the global blocks (a whole view's grid: 64 × 64 for a 1024 view, 40 × 40 for a 640 tile), the window
kernel the windowed ones (each 14 × 14 window a grid of its own).

The folded path (`deepencoder.folded_relative_attention`) gives a fused attention kernel the same sum by
widening q and k with the terms and one-hot positions: for a 1024-pixel view (64 × 64 grid) the head
dimension grows from 64 to 192 and v is padded to match, so its attention does three times the work of
plain attention, and the widened tensors are written and read once more (in a 256-page job the widened
kernel was 30% of the vision pass's GPU time). Here each program holds a block of queries and walks the
keys one tile of the grid at a time, adding two terms to each score.

Key tiles (`key_tiles`): a grid whose width is a power of two from 16 is walked a whole row at a time
(64 keys of a 1024 view): a row's column terms are the same block of values for every row, loaded once,
and its row term is one value per query. Other grids are walked in rectangles of 64 keys that cover them
with the fewest padded keys (8 × 8 for a 640 tile's 40 × 40 grid: none; in windows, rectangles of 128 keys:
8 × 16 for a 14 × 14 window);
a rectangle's terms are its few rows' and columns' entries of the two tables, summed into it: for a rectangle
of at most 16 rows and columns (a 640 tile's 8 × 8) by a product of those entries with a one-hot matrix, which
leaves the sums in the scores' layout; otherwise by broadcasting. (Gathering each score's two terms from the
tables instead took 6.2 ms for one pass's 640 tiles against 3.5, H200.)
The grid's terms are read from tables computed before the kernel (by `table_terms`, a product for each line of
the grid, reading q where it lies in the fused projection; einsums over gathered tables cost copies of q in and
of the terms out): computing them in the kernel, with a look-up in every step of its loop over the keys, cost
more than it saved (h200-2026-12-01).

Windows are read where they lie in a grid of whole windows (`window`): SAM pads the grid to whole windows
with zero tokens after its norm, and `SamBlock` does so before the qkv projection, so the padded tokens' keys
and values are the projection's; the window kernel writes only the queries of the grid before its padding
(`written`). The copies that cut the windows out and put them back are not needed. Or (`padding`, SamBlock's
opt-in) the grid is left as it is and the window kernel reads the keys and values past it at the padding's row
(the projection's bias): each key row's address is chosen, so the tiles are the padded grid's, the same bits.
(The grid kernel's windows once made that padding up with selects in every step, 2.36–2.52 ms a pass's windows
against 1.82–1.93 in the padded grid, h200-2026-12-01e; a select over the window kernel's loaded tiles 1.77
against 1.44; the rows' addresses chosen 1.44 against 1.47, h200-2026-12-01g calls 1-2.) A window is one program:
its queries of the written part in blocks of 64, each block against the window's two key rectangles. Its terms
are computed in the kernel from SAM's two relative-position tables (`tables`): each query against every entry
(2·s − 1 of them) by one small product, and for each key the entry of its offset from the query looked up with
tl.gather (no terms written, no copies of q for their products: one pass's windows 2.4 ms against 3.1 on the
H200, in the grid kernel of h200-2026-12-01), or read from tables computed first.

Shapes: B views, n heads, N = height·width tokens, d head dim.
"""

import math

import torch

from .triton_common import _INTERPRETED, _cdiv, tl, triton  # noqa: F401

# 64 queries a program, 4 warps, 3 stages: one pass's global attention over 16 views of 1024 in 2.6 ms on the
# H200, against 4.4 with 128 queries and 8 warps (`bench_vision.py --steps attention-options`).
BLOCK_QUERIES = 64
WARPS = 4
STAGES = 3
# keys in a rectangle of a grid walked by rectangles (`key_tiles`)
TILE_KEYS = 64
# ... and of a window in a grid of whole windows: 8 × 16, two rectangles a 14 × 14 window (one 16-page pass's
# windows 1.82 ms against 2.17 with 4 × 16, h200-2026-12-01e call 1)
WINDOW_TILE_KEYS = 128
# A grid's rectangles of keys whose rows and columns number at most this many take their terms by a product
# (`_spread_terms`): a 640 tile's 8 × 8 rectangles, one pass's global attention over its tiles 2.98 ms against
# 3.22 with the broadcast sum, the same bits; rectangles of 4 × 16 (a 1280 view's, OCR 2's 768 tiles), whose
# entries need a product of 32, ran slower (7.0–7.2 against 6.6–6.9; 5.6–5.7 against 5.2–5.4) and rounded a few
# scores differently (h200-2026-12-02c call 1).
TERM_ENTRIES = 16
# The window kernel: a program a window, its queries 64 at a time, 4 warps, no pipeline stages (its loop over query
# blocks gains nothing from them, and two stages cost shared memory): one 16-page pass's windows 1.50–1.62 ms
# against 1.90–1.93 for the grid kernel's windows, the same bits (h200-2026-12-01f calls 2 and 6; two stages
# 1.91, 32 queries 2.14, 8 warps 3.14, both rectangles' keys loaded first 1.74, the window's keys in runs of
# 128 + 64 + 16 with each key's terms gathered 2.18). A window's last 4 queries in a block of 16 rows instead of
# 64 (3 × 64 + 16 rows of products, not 4 × 64) ran no faster (1.63–1.69 against 1.62, call 6) and, rounding a
# little differently, moved the six-page numerics' Tiny figure to 1.435% from float32, past the original's 1.430
# (call 5): not kept.
WINDOW_BLOCK_QUERIES = 64
WINDOW_WARPS = 4
WINDOW_STAGES = 1
_LOG2_E = 1.4426950408889634


def key_tiles(height: int, width: int, keys: int = TILE_KEYS) -> tuple:
    """(rows, columns) of the rectangles of keys the kernel walks a height × width grid by: a whole row where
    the width is a power of two from 16, otherwise the rectangle of `keys` keys whose cover of the grid pads
    the fewest keys (the widest of those: its rows are longer runs of memory)."""
    if width >= 16 and width & (width - 1) == 0:
        return 1, width
    shapes = [(keys // columns, columns) for columns in (64, 32, 16, 8, 4, 2) if columns <= keys]
    return min(shapes, key=lambda s: (_cdiv(height, s[0]) * s[0] * _cdiv(width, s[1]) * s[1], -s[1]))


if triton is not None:

    @triton.jit
    def _softmax_step(scores, shift, best, new_best, total, acc, v, PRECISION: tl.constexpr):
        """One tile of keys in the online softmax (scores in log2 units): its weights exp2(scores − shift), added to
        the running sum and to the weighted values after both are rescaled from the old maximum to the new."""
        weights = tl.exp2(scores - shift[:, None])
        decay = tl.exp2(best - new_best)
        total = total * decay + tl.sum(weights, 1)
        acc = tl.dot(weights.to(v.dtype), v, acc * decay[:, None], input_precision=PRECISION)
        return total, acc

    @triton.jit
    def _relative_attention_kernel(q_ptr, k_ptr, v_ptr, rows_ptr, cols_ptr, out_ptr,
                                   q_view, q_head, q_token, k_view, k_head, k_token, v_view, v_head, v_token,
                                   rows_view, rows_head, rows_token, cols_view, cols_head, cols_token,
                                   out_view, out_token, out_head,
                                   heads, height, width, score_scale, term_scale,
                                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, TILE_ROWS: tl.constexpr,
                                   TILE_COLS: tl.constexpr, DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr,
                                   COVERED: tl.constexpr, TERM_ENTRIES: tl.constexpr = 0):
        # A block of queries of one view and head against every key of the grid, a tile of keys a step.
        # TERM_ENTRIES (rectangles only): a rectangle's row and column entries loaded as one tile of that many
        # columns and spread over its keys by a product with a one-hot matrix (`_spread_terms`); 0: summed by
        # broadcasting (`_rectangle_terms`).
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
        # Scores are kept in log2 units (exp2 below): the terms are scaled by log2(e), q·k by that and 1/√d.
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if TILE_ROWS == 1:
            # Whole rows, a row a step: every row's column terms are these; each query's row term is one value,
            # added to the row's maximum and taken off the shift of the exponent instead of to each score (an
            # addition a score fewer). The loop counts rows, and over a grid the rows cover (COVERED) the keys are
            # loaded unmasked: one pass's 1024 views 2.35–2.40 ms against 2.41–2.61 for the walk by tiles of
            # before, whose tile's row and column were a division and a remainder by a width known at run time
            # (h200-2026-12-02c call 4, alternating on the same inputs; 2.21 against 2.41–2.46 in call 3; the same
            # bits).
            is_col = slot_col < width
            col_terms = tl.load(cols_at[:, None] + slot_col[None, :], mask=is_query[:, None] & is_col[None, :],
                                other=0.0)
            col_terms = col_terms.to(tl.float32) * term_scale
            for key_row in range(0, height):
                k, v = _keys_and_values(k_at, v_at, key_row * width + slot_col, is_col, k_token, v_token, dim,
                                        COVERED, DOT_IN_FP32)
                row_term = tl.load(rows_at + key_row, mask=is_query, other=0.0).to(tl.float32) * term_scale
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * score_scale + col_terms
                if not COVERED:  # a row shorter than the tile
                    scores = tl.where(is_col[None, :], scores, float("-inf"))
                new_best = tl.maximum(best, tl.max(scores, 1) + row_term)
                total, acc = _softmax_step(scores, new_best - row_term, best, new_best, total, acc, v, PRECISION)
                best = new_best
        else:
            if TERM_ENTRIES:
                # entry e of a rectangle's term tile is its row e (e < TILE_ROWS), then its column e − TILE_ROWS:
                # key slot s takes the entries of its row and its column, the same two in every rectangle
                entry = tl.arange(0, TERM_ENTRIES)
                is_row_entry = entry < TILE_ROWS
                is_col_entry = (entry >= TILE_ROWS) & (entry < TILE_ROWS + TILE_COLS)
                spread = (((entry[:, None] == slot_row[None, :]) & is_row_entry[:, None])
                          | ((entry[:, None] == TILE_ROWS + slot_col[None, :]) & is_col_entry[:, None])).to(q.dtype)
            tiles_across = tl.cdiv(width, TILE_COLS)
            for tile in range(0, tl.cdiv(height, TILE_ROWS) * tiles_across):
                tile_row = (tile // tiles_across) * TILE_ROWS
                tile_col = (tile % tiles_across) * TILE_COLS
                key_row, key_col = tile_row + slot_row, tile_col + slot_col
                is_key = (key_row < height) & (key_col < width)
                k, v = _keys_and_values(k_at, v_at, key_row * width + key_col, is_key, k_token, v_token, dim,
                                        COVERED, DOT_IN_FP32)
                if TERM_ENTRIES:  # the rectangle's row and column entries spread over its keys by one product
                    terms = _spread_terms(rows_at, cols_at, is_query, tile_row, tile_col, height, width, entry,
                                          is_row_entry, is_col_entry, spread, term_scale, TILE_ROWS, DOT_IN_FP32,
                                          PRECISION)
                else:  # the rectangle's row terms and column terms, summed into it
                    terms = _rectangle_terms(rows_at, cols_at, is_query, tile_row, tile_col, height, width,
                                             term_scale, BLOCK_M, TILE_ROWS, TILE_COLS)
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * score_scale + terms
                if not COVERED:  # keys past the grid (rectangles that overhang it)
                    scores = tl.where(is_key[None, :], scores, float("-inf"))
                new_best = tl.maximum(best, tl.max(scores, 1))
                total, acc = _softmax_step(scores, new_best, best, new_best, total, acc, v, PRECISION)
                best = new_best
        acc = acc / total[:, None]
        tl.store(out_ptr + view * out_view + query[:, None] * out_token + head * out_head + dim[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=is_query[:, None])

    @triton.jit
    def _rectangle_terms(rows_at, cols_at, is_query, tile_row, tile_col, height, width, term_scale,
                         BLOCK_M: tl.constexpr, TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr):
        """The terms of a TILE_ROWS × TILE_COLS rectangle of keys from (tile_row, tile_col), read from the
        queries' tables (rows_at, cols_at: each query's row of each): [BLOCK_M, TILE_ROWS·TILE_COLS], log2 units."""
        rect_row = tile_row + tl.arange(0, TILE_ROWS)
        rect_col = tile_col + tl.arange(0, TILE_COLS)
        row_terms = tl.load(rows_at[:, None] + rect_row[None, :],
                            mask=is_query[:, None] & (rect_row < height)[None, :], other=0.0)
        col_terms = tl.load(cols_at[:, None] + rect_col[None, :],
                            mask=is_query[:, None] & (rect_col < width)[None, :], other=0.0)
        return tl.reshape(row_terms.to(tl.float32)[:, :, None] + col_terms.to(tl.float32)[:, None, :],
                          [BLOCK_M, TILE_ROWS * TILE_COLS]) * term_scale

    @triton.jit
    def _keys_and_values(k_at, v_at, key, is_key, k_token, v_token, dim, COVERED: tl.constexpr,
                         DOT_IN_FP32: tl.constexpr):
        """The keys' and values' tiles of a step: unmasked where the grid is covered by whole tiles (COVERED)."""
        if COVERED:
            k = tl.load(k_at + key[:, None] * k_token + dim[None, :])
            v = tl.load(v_at + key[:, None] * v_token + dim[None, :])
        else:
            k = tl.load(k_at + key[:, None] * k_token + dim[None, :], mask=is_key[:, None], other=0.0)
            v = tl.load(v_at + key[:, None] * v_token + dim[None, :], mask=is_key[:, None], other=0.0)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        return k, v

    @triton.jit
    def _spread_terms(rows_at, cols_at, is_query, tile_row, tile_col, height, width, entry, is_row_entry,
                      is_col_entry, spread, term_scale, TILE_ROWS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                      PRECISION: tl.constexpr):
        """The terms of the rectangle of keys from (tile_row, tile_col) as `_rectangle_terms` gives them, by a
        product: each query's entries of the rectangle's rows and columns, one [BLOCK_M, TERM_ENTRIES] tile, times
        `spread` (one-hot: a key slot's row entry and column entry) adds each key's two entries in the product's
        float32 sum, which lands in the scores' own layout (the broadcast sum is built in another and converted
        there in every step)."""
        row_line = tile_row + entry
        col_line = tile_col + entry - TILE_ROWS
        valid = (is_row_entry & (row_line < height)) | (is_col_entry & (col_line < width))
        at = tl.where(is_row_entry[None, :], rows_at[:, None] + row_line[None, :], cols_at[:, None] + col_line[None, :])
        entries = tl.load(at, mask=is_query[:, None] & valid[None, :], other=0.0)
        if DOT_IN_FP32:
            entries = entries.to(tl.float32)
            spread = spread.to(tl.float32)
        return tl.dot(entries, spread, input_precision=PRECISION) * term_scale

    @triton.jit
    def _window_query_block(q_at, k_at, v_at, out_at, rows_at, cols_at, rel_h, rel_w, padding_k, padding_v,
                            first_row, first_col, width, written_height, written_width, valid_width, count, start,
                            q_token, k_token, v_token, out_token, rows_token, cols_token, score_scale, term_scale,
                            HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, ENTRIES: tl.constexpr,
                            BLOCK_M: tl.constexpr, TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr,
                            TABLES: tl.constexpr, PADDING: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                            PRECISION: tl.constexpr):
        """Queries start .. start + BLOCK_M of a window's `count` (those of the grid's written part, row by row,
        valid_width a row) against the window's keys, rectangle by rectangle; their outputs stored. With PADDING
        the grid is the written part alone, and the window's keys past it are read at padding_k, padding_v (the
        head's padding key and value)."""
        local = start + tl.arange(0, BLOCK_M)
        is_query = local < count
        query_row, query_col = local // valid_width, local % valid_width  # in the window
        query = (first_row + query_row) * width + first_col + query_col
        written = (first_row + query_row) * written_width + first_col + query_col
        dim = tl.arange(0, HEAD_DIM)
        q = tl.load(q_at + query[:, None] * q_token + dim[None, :], mask=is_query[:, None], other=0.0)
        if DOT_IN_FP32:
            q = q.to(tl.float32)
        if TABLES:
            # each query against every entry of the two tables (one small product each), then for key row r the
            # entry of offset (query's row − r) (SAM's get_rel_pos: index row − r + window − 1); columns alike
            by_row = tl.dot(q, tl.trans(rel_h), input_precision=PRECISION) * term_scale
            by_col = tl.dot(q, tl.trans(rel_w), input_precision=PRECISION) * term_scale
            row_offset = query_row + WINDOW - 1
            col_offset = query_col + WINDOW - 1
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        slot = tl.arange(0, TILE_ROWS * TILE_COLS)
        rectangles_across: tl.constexpr = (WINDOW + TILE_COLS - 1) // TILE_COLS
        for tile in tl.static_range(((WINDOW + TILE_ROWS - 1) // TILE_ROWS) * rectangles_across):
            tile_row = (tile // rectangles_across) * TILE_ROWS
            tile_col = (tile % rectangles_across) * TILE_COLS
            key_row, key_col = tile_row + slot // TILE_COLS, tile_col + slot % TILE_COLS  # in the window
            is_key = (key_row < WINDOW) & (key_col < WINDOW)
            key = (first_row + key_row) * width + first_col + key_col
            if PADDING:
                # keys of the window past the grid read from the padding's row (and the rectangle's keys past the
                # window, masked below): the rows' addresses chosen, not the loaded values (a select over the
                # loaded tiles cost 1.77 ms a pass's windows against 1.44, h200-2026-12-01g call 1)
                in_grid = is_key & (first_row + key_row < written_height) & (first_col + key_col < written_width)
                k = tl.load(tl.where(in_grid, k_at + key * k_token, padding_k)[:, None] + dim[None, :])
                v = tl.load(tl.where(in_grid, v_at + key * v_token, padding_v)[:, None] + dim[None, :])
            else:  # the rectangle's keys past the window masked
                k, v = _keys_and_values(k_at, v_at, key, is_key, k_token, v_token, dim, False, False)
            if DOT_IN_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if TABLES:  # offsets of keys past the window (masked below) clamped into the table
                rect_row = tile_row + tl.arange(0, TILE_ROWS)
                rect_col = tile_col + tl.arange(0, TILE_COLS)
                row_index = tl.minimum(tl.maximum(row_offset[:, None] - rect_row[None, :], 0), ENTRIES - 1)
                col_index = tl.minimum(tl.maximum(col_offset[:, None] - rect_col[None, :], 0), ENTRIES - 1)
                terms = tl.reshape(tl.gather(by_row, row_index, 1)[:, :, None]
                                   + tl.gather(by_col, col_index, 1)[:, None, :], [BLOCK_M, TILE_ROWS * TILE_COLS])
            else:
                terms = _rectangle_terms(rows_at + query * rows_token, cols_at + query * cols_token, is_query,
                                         tile_row, tile_col, WINDOW, WINDOW, term_scale, BLOCK_M, TILE_ROWS,
                                         TILE_COLS)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * score_scale + terms
            scores = tl.where(is_key[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            total, acc = _softmax_step(scores, new_best, best, new_best, total, acc, v, PRECISION)
            best = new_best
        acc = acc / total[:, None]
        tl.store(out_at + written[:, None] * out_token + dim[None, :], acc.to(out_at.dtype.element_ty),
                 mask=is_query[:, None])

    @triton.jit
    def _window_attention_kernel(q_ptr, k_ptr, v_ptr, rows_ptr, cols_ptr, padding_ptr, out_ptr,
                                 q_view, q_head, q_token, k_view, k_head, k_token, v_view, v_head, v_token,
                                 rows_view, rows_head, rows_token, cols_view, cols_head, cols_token,
                                 out_view, out_token, out_head, heads, width, windows_across, written_height,
                                 written_width, score_scale, term_scale,
                                 HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr, ENTRIES: tl.constexpr,
                                 BLOCK_M: tl.constexpr, TILE_ROWS: tl.constexpr,
                                 TILE_COLS: tl.constexpr, TABLES: tl.constexpr, PADDING: tl.constexpr,
                                 DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr):
        # One window of one view and head a program (axis 0: the window; 1: view·head): its queries in the grid's
        # written part, BLOCK_M at a time. With PADDING, padding_ptr [2, heads, d]: the key and value of every
        # head's padding (the grid is not padded to whole windows: the window's keys past it are these).
        window = tl.program_id(0)
        view_head = tl.program_id(1).to(tl.int64)
        view, head = view_head // heads, view_head % heads
        first_row = (window // windows_across) * WINDOW
        first_col = (window % windows_across) * WINDOW
        valid_width = tl.minimum(written_width - first_col, WINDOW)
        count = tl.minimum(written_height - first_row, WINDOW) * valid_width
        q_at = q_ptr + view * q_view + head * q_head
        k_at = k_ptr + view * k_view + head * k_head
        v_at = v_ptr + view * v_view + head * v_head
        rows_at = rows_ptr + view * rows_view + head * rows_head
        cols_at = cols_ptr + view * cols_view + head * cols_head
        out_at = out_ptr + view * out_view + head * out_head
        rel_h = rows_ptr  # unused without TABLES
        rel_w = cols_ptr
        padding_k = padding_ptr + head * HEAD_DIM  # this head's padding key and value (read with PADDING)
        padding_v = padding_k + heads * HEAD_DIM
        if TABLES:  # rows_ptr, cols_ptr: SAM's two tables [2·window − 1, d], one for every head
            dim = tl.arange(0, HEAD_DIM)
            entry = tl.arange(0, ENTRIES)
            is_entry = (entry < 2 * WINDOW - 1)[:, None]
            rel_h = tl.load(rows_ptr + entry[:, None] * HEAD_DIM + dim[None, :], mask=is_entry, other=0.0)
            rel_w = tl.load(cols_ptr + entry[:, None] * HEAD_DIM + dim[None, :], mask=is_entry, other=0.0)
            if DOT_IN_FP32:
                rel_h = rel_h.to(tl.float32)
                rel_w = rel_w.to(tl.float32)
        for start in range(0, count, BLOCK_M):
            _window_query_block(q_at, k_at, v_at, out_at, rows_at, cols_at, rel_h, rel_w, padding_k, padding_v,
                                first_row, first_col, width, written_height, written_width, valid_width, count,
                                start, q_token, k_token, v_token, out_token, rows_token, cols_token, score_scale,
                                term_scale, HEAD_DIM, WINDOW, ENTRIES, BLOCK_M, TILE_ROWS, TILE_COLS, TABLES,
                                PADDING, DOT_IN_FP32, PRECISION)

    @triton.jit
    def _line_terms_kernel(q_ptr, table_ptr, out_ptr, q_view, q_head, q_token, out_view, out_head, out_token,
                           heads, length, line_step, along_step, walk,
                           HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ENTRIES: tl.constexpr,
                           DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr):
        # One line of the grid (program axis 1: a row for the row terms, a column for the column terms), a block
        # of its tokens: every token there has the same place in the walked part (line % walk), so all of them
        # meet the same table entries, (place − key + walk − 1) for key 0..walk − 1: their terms are one product.
        along = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        line = tl.program_id(1)
        view_head = tl.program_id(2).to(tl.int64)
        view, head = view_head // heads, view_head % heads
        is_token = along < length
        token = line * line_step + along * along_step
        dim = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + view * q_view + head * q_head + token[:, None] * q_token + dim[None, :],
                    mask=is_token[:, None], other=0.0)
        key = tl.arange(0, ENTRIES)
        is_key = key < walk
        entry = tl.where(is_key, line % walk - key + walk - 1, 0)
        table = tl.load(table_ptr + entry[:, None] * HEAD_DIM + dim[None, :], mask=is_key[:, None], other=0.0)
        if DOT_IN_FP32:
            q = q.to(tl.float32)
            table = table.to(tl.float32)
        terms = tl.dot(q, tl.trans(table), input_precision=PRECISION)
        tl.store(out_ptr + view * out_view + head * out_head + token[:, None] * out_token + key[None, :],
                 terms.to(out_ptr.dtype.element_ty), mask=is_token[:, None] & is_key[None, :])


def table_terms(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, height: int, width: int,
                window: int = 0) -> tuple:
    """SAM's two tables of relative terms for the queries q [B, n, N, d] (any strides with a unit stride along d:
    read where they lie in the fused projection) of a height × width grid, from its relative-position tables rel_h,
    rel_w ([2·s − 1, d], s the walked height and width: the grid's, or with `window` the window's;
    `deepencoder.resized_relative_table`): row_terms[i, r] = q_i · rel_h[row(i) − r + s − 1], col_terms likewise
    with columns, row(i) counted in the walked part → ([B, n, N, ≥ s_h], [B, n, N, ≥ s_w]), each row padded to a
    multiple of 8 entries (unwritten: the attention kernel reads the first s). What `deepencoder.relative_terms`
    computes from the gathered tables, with no copy of q in and none of the terms out: tokens of one grid row share
    their row entries (those of a column their column entries), so each line of the grid is one small product."""
    batch, heads, tokens, head_dim = q.shape
    walk_height, walk_width = (window, window) if window else (height, width)
    terms = []
    # (table, walked side, lines, tokens a line, step between lines, step along a line)
    for table, walk, lines, length, line_step, along_step in ((rel_h, walk_height, height, width, width, 1),
                                                               (rel_w, walk_width, width, height, 1, width)):
        table = table.to(q.dtype).contiguous()
        if table.shape != (2 * walk - 1, head_dim):
            raise ValueError(f"table {tuple(table.shape)} is not [2·s − 1, {head_dim}] for a walk of {walk}")
        out = q.new_empty(batch, heads, tokens, _cdiv(walk, 8) * 8)
        block = max(16, min(64, triton.next_power_of_2(length)))
        _line_terms_kernel[(_cdiv(length, block), lines, batch * heads)](
            q, table, out, q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
            heads, length, line_step, along_step, walk,
            HEAD_DIM=head_dim, BLOCK=block, ENTRIES=max(16, triton.next_power_of_2(walk)), DOT_IN_FP32=_INTERPRETED,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
        terms.append(out)
    return tuple(terms)


# Called from the vision towers' compiled blocks: run as it is, not traced (the compiled code before and after it
# stays compiled; in the engine the whole pass is a CUDA graph, launches included).
@torch.compiler.disable
def relative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_terms: torch.Tensor,
                       col_terms: torch.Tensor, height: int, width: int, window: int = 0, tiles: tuple = None,
                       keys: tuple = None, tables: tuple = None, terms_first: bool = False,
                       written: tuple = None, padding: torch.Tensor = None) -> torch.Tensor:
    """softmax(q·kᵀ/√d + row_terms[i, r] + col_terms[i, c])·v for keys (r, c) of a height × width grid, or
    with `window`, of the window × window window holding the query, the grid (whole windows: its sides multiples
    of `window`, unless `padding`) cut in windows from its top left, r and c then counted in the window.
    q, k, v [B, n, N, d] (any strides with a unit stride along d); row_terms [B, n, N, ≥ height or window],
    col_terms [B, n, N, ≥ width or window] (unit stride along the last dimension; entries past those are not
    read) → [B, N', n, d] (the layout the block's output projection reads); with `window`, only the queries of
    the grid's top-left `written` (h, w) part, N' = h·w (the whole grid by default: N' = N). With `window` and
    `padding` [2, n, d] (the key and the value of each head's padding token: SAM's zero token through the qkv
    projection, its bias), the grid is any size and not padded: its last windows overhang it, their keys past it
    are those, and all of its queries are written.
    `tables`: instead of the terms, SAM's relative-position tables (rel_h, rel_w) ([2·s − 1, d] each, s the
    walked height and width: the grid's or the window's, `deepencoder.resized_relative_table`): over a grid the
    terms are computed from them first (`table_terms`) and read; within windows the window kernel computes them
    itself (row_terms[i, r] = q_i · rel_h[row(i) − r + s − 1]), in float32, without writing them, unless
    `terms_first` (`SamAttention.terms_in_kernel`).
    For benchmarks' sweeps: `tiles` (queries a program, warps, pipeline stages), `keys` (the key rectangle's
    rows and columns, `key_tiles` by default)."""
    batch, heads, tokens, head_dim = q.shape
    if tokens != height * width:
        raise ValueError(f"{tokens} tokens are not a {height} × {width} grid")
    walk_height, walk_width = (window, window) if window else (height, width)
    if window and padding is None and (height % window or width % window):
        raise ValueError(f"a {height} × {width} grid is not whole {window} × {window} windows: pad it first")
    if (written is not None or padding is not None) and not window:
        raise ValueError("`written` and `padding` are for windows only: a grid's attention writes all of its "
                         "queries and has no padding")
    if padding is not None and written is not None:
        raise ValueError("with `padding` the grid is not padded: all of its queries are written")
    if padding is not None and padding.shape != (2, heads, head_dim):
        raise ValueError(f"padding {tuple(padding.shape)} is not [2, {heads}, {head_dim}]")
    tile_rows, tile_cols = keys or key_tiles(walk_height, walk_width, WINDOW_TILE_KEYS if window else TILE_KEYS)
    if tile_rows == 1 and tile_cols < walk_width:
        raise ValueError(f"a key tile of one row must hold the grid's {walk_width} columns, not {tile_cols}")
    in_kernel = tables is not None and window and not terms_first
    if tables is not None and not in_kernel:
        row_terms, col_terms = table_terms(q, *tables, height, width, window)
    if in_kernel:
        rel_h, rel_w = (table.to(q.dtype).contiguous() for table in tables)
        if rel_h.shape != (2 * window - 1, head_dim) or rel_w.shape != (2 * window - 1, head_dim):
            raise ValueError(f"tables {tuple(rel_h.shape)} and {tuple(rel_w.shape)} are not [2·s − 1, {head_dim}] "
                             f"for windows of {window}")
        row_terms, col_terms = rel_h[None, None], rel_w[None, None]  # read as tables; their strides unused
    common = dict(HEAD_DIM=head_dim, TILE_ROWS=tile_rows, TILE_COLS=tile_cols, DOT_IN_FP32=_INTERPRETED,
                  # float32 inputs (the tests' reference precision) multiply in float32, not TensorFloat-32
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               row_terms.stride(0), row_terms.stride(1), row_terms.stride(2),
               col_terms.stride(0), col_terms.stride(1), col_terms.stride(2))
    if window:
        written_height, written_width = written or (height, width)
        if written_height > height or written_width > width:
            raise ValueError(f"the written {written_height} × {written_width} part is not within the "
                             f"{height} × {width} grid")
        block_queries, warps, stages = tiles or (WINDOW_BLOCK_QUERIES, WINDOW_WARPS, WINDOW_STAGES)
        out = q.new_empty(batch, written_height * written_width, heads, head_dim)
        padding_kv = q if padding is None else padding.to(q.dtype).contiguous()  # (q: a pointer, unread)
        _window_attention_kernel[(_cdiv(height, window) * _cdiv(width, window), batch * heads)](
            q, k, v, row_terms, col_terms, padding_kv, out, *strides, out.stride(0), out.stride(1), out.stride(2),
            heads, width, _cdiv(width, window), written_height, written_width, _LOG2_E / math.sqrt(head_dim),
            _LOG2_E, WINDOW=window, ENTRIES=max(16, triton.next_power_of_2(2 * window - 1)), BLOCK_M=block_queries,
            TABLES=bool(in_kernel), PADDING=padding is not None, num_warps=warps, num_stages=stages, **common)
        return out
    block_queries, warps, stages = tiles or (BLOCK_QUERIES, WARPS, STAGES)
    out = q.new_empty(batch, tokens, heads, head_dim)
    _relative_attention_kernel[(_cdiv(tokens, block_queries), batch * heads)](
        q, k, v, row_terms, col_terms, out, *strides, out.stride(0), out.stride(1), out.stride(2),
        heads, height, width, _LOG2_E / math.sqrt(head_dim), _LOG2_E, BLOCK_M=block_queries, num_warps=warps,
        num_stages=stages, COVERED=height % tile_rows == 0 and width % tile_cols == 0,
        TERM_ENTRIES=TERM_ENTRIES if 1 < tile_rows and tile_rows + tile_cols <= TERM_ENTRIES else 0, **common)
    return out
