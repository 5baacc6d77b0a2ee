"""Triton kernel of the decode step's small projections for a few tokens (`fused_ops.linear` and
`fused_ops.norm_linear`): q/k/v, o and the router, optionally with the residual add and RMSNorm before
them computed inside.

Launched programmatically (`triton_common.programmatic`), each program reads its rows of the weight
into registers *before* it waits for the kernel ahead of it: the weights do not depend on that kernel,
so their reading overlaps its end, and what is left once it has finished is reading a few activations,
the dot products and a store. As a plain launch this kernel has nothing to overlap and cuBLAS is as fast
(a first version of it, without the early read, took 6.5 µs a projection in the step against cuBLAS's
~5: README "Performance"), so the callers take it only with programmatic launch.

Shapes in comments: T tokens, K input width, N output width.
"""

import torch

from .triton_common import (_cdiv, _multiprocessors, _next_power_of_2, _wait_for_previous, available,  # noqa: F401
                            launch_options, programmatic, tl, triton)

# At most this many tokens (a decode step of a few sequences): every program holds its weight rows and
# walks the tokens one after another.
LINEAR_MAX_TOKENS = 8
# The whole weight is spread over the GPU's registers while it waits (an H200 has ~33 MB of them): q/k/v
# of this model are 9.8 MB, o 3.3 MB, the router 0.16 MB; the vocabulary projection stays with cuBLAS.
LINEAR_MAX_WEIGHT_BYTES = 16 << 20
LINEAR_MAX_K = 2048
# Programs aimed for per multiprocessor (each holds N / programs rows), and their warps.
LINEAR_PROGRAMS_PER_SM = 4
LINEAR_WARPS = 4


if triton is not None:

    @triton.jit
    def _load_rows(w_ptr, rows, rows_inside, cols, K: tl.constexpr):
        return tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                       mask=rows_inside[:, None] & (cols[None, :] < K), other=0.0)

    @triton.jit
    def _linear_gemv_kernel(x_ptr, residual_ptr, norm_ptr, w_ptr, out_ptr, summed_ptr, normed_ptr,
                            tokens, n, x_row_stride, residual_row_stride, out_row_stride, eps,
                            K: tl.constexpr, K_MAIN: tl.constexpr, K_REST: tl.constexpr, BLOCK_N: tl.constexpr,
                            NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_NORMED: tl.constexpr,
                            PROGRAMMATIC: tl.constexpr):
        """Program (tile of BLOCK_N output rows): out[t, rows] = W[rows] · x_t for every token t.

        K is cut into a power-of-two part and a rest (1280 = 1024 + 256), so no lane holds padding.
        With NORM, x_t is first RMSNorm(x_t + residual_t) as `add_rms_norm` computes it (the sum and the
        normalised value rounded, the statistics in float32); program 0 writes the sum (the residual
        stream) and, with WRITE_NORMED, the normalised input, for the kernels after this one.
        """
        program = tl.program_id(0)
        rows = program * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_inside = rows < n
        main = tl.arange(0, K_MAIN)
        # Before the wait: only the weights, which no kernel writes.
        w_main = _load_rows(w_ptr, rows, rows_inside, main, K)
        if K_REST > 0:
            rest = K_MAIN + tl.arange(0, K_REST)
            rest_inside = rest < K
            w_rest = _load_rows(w_ptr, rows, rows_inside, rest, K)
        if NORM:
            g_main = tl.load(norm_ptr + main).to(tl.float32)
            if K_REST > 0:
                g_rest = tl.load(norm_ptr + rest, mask=rest_inside, other=0.0).to(tl.float32)
        _wait_for_previous(PROGRAMMATIC)
        for token in range(tokens):
            x_row = x_ptr + token * x_row_stride
            x_main = tl.load(x_row + main).to(tl.float32)
            if K_REST > 0:
                x_rest = tl.load(x_row + rest, mask=rest_inside, other=0.0).to(tl.float32)
            if NORM:
                if HAS_RESIDUAL:
                    residual_row = residual_ptr + token * residual_row_stride
                    summed_row = summed_ptr + token * K
                    # The sum is rounded: it is the residual stream, and the statistics are taken on it.
                    s_main = (x_main + tl.load(residual_row + main).to(tl.float32)).to(summed_ptr.dtype.element_ty)
                    x_main = s_main.to(tl.float32)
                    if program == 0:
                        tl.store(summed_row + main, s_main)
                    if K_REST > 0:
                        s_rest = (x_rest + tl.load(residual_row + rest, mask=rest_inside, other=0.0).to(tl.float32)
                                  ).to(summed_ptr.dtype.element_ty)
                        x_rest = s_rest.to(tl.float32)
                        if program == 0:
                            tl.store(summed_row + rest, s_rest, mask=rest_inside)
                squares = tl.sum(x_main * x_main, axis=0)
                if K_REST > 0:
                    squares += tl.sum(x_rest * x_rest, axis=0)
                scale = tl.math.rsqrt(squares / K + eps)
                x_main = (g_main * (x_main * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
                          ).to(normed_ptr.dtype.element_ty).to(tl.float32)
                if K_REST > 0:
                    x_rest = (g_rest * (x_rest * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
                              ).to(normed_ptr.dtype.element_ty).to(tl.float32)
                if WRITE_NORMED:
                    if program == 0:
                        normed_row = normed_ptr + token * K
                        tl.store(normed_row + main, x_main.to(normed_ptr.dtype.element_ty))
                        if K_REST > 0:
                            tl.store(normed_row + rest, x_rest.to(normed_ptr.dtype.element_ty), mask=rest_inside)
            acc = tl.sum(w_main.to(tl.float32) * x_main[None, :], axis=1)
            if K_REST > 0:
                acc += tl.sum(w_rest.to(tl.float32) * x_rest[None, :], axis=1)
            tl.store(out_ptr + token * out_row_stride + rows, acc.to(out_ptr.dtype.element_ty),
                     mask=rows_inside)


def takes(x: torch.Tensor, weight: torch.Tensor, bias=None) -> bool:
    """Whether `linear` / `norm_linear` run x [..., K] through weight [N, K] here: with programmatic launch (see
    the module's docstring), at most LINEAR_MAX_TOKENS tokens, no bias, a weight of at most
    LINEAR_MAX_WEIGHT_BYTES contiguous along K and of x's dtype."""
    if bias is not None or weight.dim() != 2 or not programmatic(x.device):
        return False
    n, k = weight.shape
    tokens = x.numel() // max(k, 1)
    return (0 < tokens <= LINEAR_MAX_TOKENS and x.shape[-1] == k and 16 <= k <= LINEAR_MAX_K
            and weight.dtype == x.dtype and weight.stride(-1) == 1 and weight.stride(0) == k
            and n * k * weight.element_size() <= LINEAR_MAX_WEIGHT_BYTES)


def _block_n(n: int, device: torch.device) -> int:
    target = LINEAR_PROGRAMS_PER_SM * _multiprocessors(device)
    return max(1, min(_next_power_of_2(_cdiv(n, target)), 64))


def _launch(x, residual, norm_weight, eps, weight, write_normed):
    *lead, k = x.shape
    n = weight.shape[0]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    tokens = rows.shape[0]
    out = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    norm = norm_weight is not None
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else x
    normed = torch.empty(x.shape, dtype=torch.promote_types(norm_weight.dtype, x.dtype), device=x.device) \
        if write_normed else out
    residual_rows = rows
    if residual is not None:
        residual_rows = residual.expand(x.shape).reshape(-1, k)
        if residual_rows.stride(-1) != 1:
            residual_rows = residual_rows.contiguous()
    k_main = 1 << (k.bit_length() - 1)  # the largest power of two ≤ K
    k_rest = _next_power_of_2(k - k_main) if k > k_main else 0
    block_n = _block_n(n, x.device)
    _linear_gemv_kernel[(_cdiv(n, block_n),)](
        rows, residual_rows, norm_weight.contiguous() if norm else weight, weight, out, summed, normed,
        tokens, n, rows.stride(0), residual_rows.stride(0), n, float(eps) if norm else 0.0,
        K=k, K_MAIN=k_main, K_REST=k_rest, BLOCK_N=block_n, NORM=norm, HAS_RESIDUAL=residual is not None,
        WRITE_NORMED=write_normed, num_warps=LINEAR_WARPS, **launch_options(x.device))
    return out, summed, normed


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K]ᵀ → [..., N] in x's dtype (float32 sums, rounded once): see fused_ops.linear."""
    return _launch(x, None, None, 0.0, weight, False)[0]


def norm_linear(x: torch.Tensor, residual, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                keep_normed: bool = False):
    """(RMSNorm(x + residual) @ weightᵀ, x + residual[, RMSNorm(x + residual)]): see fused_ops.norm_linear."""
    if norm_weight.dtype != x.dtype or norm_weight.shape != (x.shape[-1],):
        raise ValueError(f"norm_linear: a norm weight of {tuple(norm_weight.shape)} {norm_weight.dtype} for "
                         f"activations of width {x.shape[-1]} in {x.dtype}")
    out, summed, normed = _launch(x, residual, norm_weight, eps, weight, keep_normed)
    return (out, summed, normed) if keep_normed else (out, summed)
