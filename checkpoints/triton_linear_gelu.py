"""Triton kernel of a vision MLP's first product with its bias and exact GELU inside: gelu(x·Wᵀ + b).

In SAM's blocks (`deepencoder.MLPBlock`) the first product's output is 4 × the width: written by the matrix
product, read and written again by the GELU, read by the second product. For an A4 Gundam page (one 1024 view,
six 640 tiles: 13,696 tokens) that is 84 MB a block, and the GELU alone took 0.8-1.1 ms of the served vision
pass's ~10 ms on the H200 (README "Performance"). Here the GELU is applied to each tile of the product while it
is still in registers, so the pre-activation is never written.

The product accumulates in float32; the bias and the GELU are applied to the float32 sum and the result rounded
once. PyTorch's order rounds the product to bf16, then the GELU's result again: this is at least as close to the
float32 result (tests/test_triton_kernels.py measures both against it).

Shapes: T tokens (rows), K input width, N output width; W is nn.Linear's [N, K].
"""

import torch

from .triton_common import _INTERPRETED, _cdiv, tl, triton  # noqa: F401

# (rows, columns, depth) of a program's tile, warps, pipeline stages: chosen on the H200 at SAM's shapes
# (`bench_vision.py --steps linear-gelu`).
TILE = (128, 128, 64)
WARPS = 8
STAGES = 3


def takes(x: torch.Tensor, weight: torch.Tensor, bias, tile: tuple = TILE) -> bool:
    """Whether the kernel computes this product: CUDA (or the interpreter's CPU) tensors of one dtype, widths
    the tile divides (SAM's 768 → 3072 and OCR 2's 896 → 3584 do), a bias."""
    _, columns, depth = tile
    n, k = weight.shape
    return (bias is not None and x.dtype == weight.dtype == bias.dtype and x.shape[-1] == k
            and n % columns == 0 and k % depth == 0 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and x.device == weight.device and weight.is_contiguous())


if triton is not None:

    @triton.jit
    def _linear_gelu_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, rows, x_row, out_row,
                            N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_IN_FP32: tl.constexpr, PRECISION: tl.constexpr):
        # Programs next to each other share their rows of x (columns vary fastest): while they run, those rows
        # are read once from memory and then from L2, where all of W (4.7 MB for SAM) stays.
        program = tl.program_id(0)
        column_blocks: tl.constexpr = N // BLOCK_N
        block_m = program // column_blocks
        block_n = program % column_blocks
        row = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_inside = row < rows
        column = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        depth = tl.arange(0, BLOCK_K)
        x_tile = x_ptr + row[:, None].to(tl.int64) * x_row + depth[None, :]
        w_tile = w_ptr + column[None, :].to(tl.int64) * K + depth[:, None]  # Wᵀ's [BLOCK_K, BLOCK_N] tile
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):
            a = tl.load(x_tile, mask=row_inside[:, None], other=0.0)
            b = tl.load(w_tile)
            if DOT_IN_FP32:  # the interpreter multiplies bf16 operands wrongly
                a, b = a.to(tl.float32), b.to(tl.float32)
            total = tl.dot(a, b, total, input_precision=PRECISION)
            x_tile += BLOCK_K
            w_tile += BLOCK_K
        total += tl.load(bias_ptr + column).to(tl.float32)[None, :]
        activated = 0.5 * total * (1.0 + tl.math.erf(total * 0.7071067811865476))  # x·Φ(x): erf(x/√2)
        out = out_ptr + row[:, None].to(tl.int64) * out_row + column[None, :]
        tl.store(out, activated.to(out_ptr.dtype.element_ty), mask=row_inside[:, None])


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tile: tuple = TILE,
                warps: int = WARPS, stages: int = STAGES) -> torch.Tensor:
    """F.gelu(F.linear(x, weight, bias)) (exact GELU) in one kernel, rounded once; `takes` must hold. x [..., K]
    → [..., N]. `tile`, `warps`, `stages`: the launch's, for trials (`bench_vision.py`)."""
    n, k = weight.shape
    rows_in = x.reshape(-1, k)
    if rows_in.stride(-1) != 1:
        rows_in = rows_in.contiguous()
    rows = rows_in.shape[0]
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k = tile
    if rows:
        grid = (_cdiv(rows, block_m) * (n // block_n),)
        _linear_gelu_kernel[grid](rows_in, weight, bias, out, rows, rows_in.stride(0), out.stride(0), N=n, K=k,
                                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_IN_FP32=_INTERPRETED,
                                  # float32 inputs (the tests' reference precision) in float32, not TensorFloat-32
                                  PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                                  num_warps=warps, num_stages=stages)
    return out.reshape(*x.shape[:-1], n)
