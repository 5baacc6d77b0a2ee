"""Triton kernel of a linear layer over a few rows: `F.linear(x, weight, bias)` for the decode step of one to
MAX_ROWS sequences, where the weight's bytes are the whole cost.

At one row cuBLAS takes ~5 µs for each of the step's dense projections on the H200 (the attention's fused q/k/v
[3,840 × 1,280], its output [1,280 × 1,280], the shared experts' [3,584 × 1,280] and [1,280 × 1,792]): ~240 µs of
a 0.85 ms step for 0.8-2.3 µs of weight bytes each at the copy rate (the batch-1 profile,
benchmarks/results/h200-2026-11-30g/call2-profile_b1.txt). Its tiles cover 8-64 output columns, so a projection
runs on a few dozen of the GPU's 132 multiprocessors. Here a program reads BLOCK_N whole rows of the weight once,
against every input row: one program per BLOCK_N outputs, hundreds of programs for these shapes, each with all
its loads in flight. Products are accumulated in float32 and rounded once when stored, as cuBLAS does; only the
order of the sums differs.

The decoder uses it only when asked (`DeepseekV2Model.use_small_batch_linear`, DEEPSEEK_OCR_SMALL_LINEAR) until
`benchmarks/bench_kernels.py --ops linear` has measured it against F.linear on those shapes and picked the
block sizes.
"""

from typing import Optional

import torch

from .triton_common import _cdiv, _next_power_of_2, _rows, tl, triton

# The most rows a call takes: beyond a few, a row of the weight is reused often enough for cuBLAS's tiles.
MAX_ROWS = 4


# Float32 products each program keeps per lane (BLOCK_M × BLOCK_N × BLOCK_K, summed once at the end): with
# more rows the K tile narrows so that the accumulator stays in registers (32 a thread at 4 warps).
ACCUMULATOR_ELEMENTS = 4096


if triton is not None:

    @triton.jit
    def _small_batch_linear_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, rows, outputs,
                                   x_row_stride, weight_row_stride, out_row_stride,
                                   INPUTS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (tile of outputs): BLOCK_N rows of the weight against every input row.

        The loop over K is unrolled (K is a compile-time constant), so every load of the program's rows can be
        in flight at once, and products accumulate per lane, reduced once at the end rather than at every step
        (the kernel is bound by the latency of reading the weight, as the experts' GEMV in triton_moe is)."""
        columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # the outputs: rows of the weight
        column_in = columns < outputs
        row = tl.arange(0, BLOCK_M)
        row_in = row < rows
        weight_rows = weight_ptr + columns[:, None].to(tl.int64) * weight_row_stride  # [BN, 1]
        products = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in tl.static_range(0, INPUTS, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            k_in = k < INPUTS
            w = tl.load(weight_rows + k[None, :], mask=column_in[:, None] & k_in[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_ptr + row[:, None] * x_row_stride + k[None, :],
                        mask=row_in[:, None] & k_in[None, :], other=0.0).to(tl.float32)  # [BM, BK]
            products += x[:, None, :] * w[None, :, :]
        total = tl.sum(products, axis=2)  # [BM, BN]
        if HAS_BIAS:
            total += tl.load(bias_ptr + columns, mask=column_in, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + row[:, None] * out_row_stride + columns[None, :], total.to(out_ptr.dtype.element_ty),
                 mask=row_in[:, None] & column_in[None, :])


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                       block_n: int = 8, block_k: int = 256, num_warps: int = 4) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [..., K] of at most MAX_ROWS rows, weight [N, K] (unit stride along K).
    `block_k` is the K tile of one row; with more rows it narrows (ACCUMULATOR_ELEMENTS)."""
    inputs = x.shape[-1]
    outputs = weight.shape[0]
    rows = _rows(x, inputs)
    count = rows.shape[0]
    if count > MAX_ROWS:
        raise ValueError(f"small_batch_linear takes at most {MAX_ROWS} rows, not {count}")
    if weight.shape[1] != inputs or weight.stride(1) != 1:
        raise ValueError(f"weight {tuple(weight.shape)} (strides {weight.stride()}) does not take inputs of {inputs} "
                         "with unit stride")
    out = torch.empty(count, outputs, dtype=x.dtype, device=x.device)
    if count and outputs:
        block_m = _next_power_of_2(count)
        block_k = min(block_k, _next_power_of_2(inputs), max(16, ACCUMULATOR_ELEMENTS // (block_m * block_n)))
        _small_batch_linear_kernel[(_cdiv(outputs, block_n),)](
            rows, weight, bias if bias is not None else weight, out, count, outputs,
            rows.stride(0), weight.stride(0), out.stride(0), INPUTS=inputs, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return out.view(*x.shape[:-1], outputs)
