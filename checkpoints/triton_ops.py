"""Triton kernels of the small steps in `fused_ops.py`: residual add + RMSNorm, SiLU-gated product,
CLIP's quick GELU, rotary embedding of queries and keys, the router's softmax + top-k; and SAM's exact
GELU (called by `deepencoder.MLPBlock` when its `gelu_kernel` is set). Each kernel sits beside the
function that launches it; `triton_common.py` says what all the families share.

Shapes in comments: N tokens, D hidden, H heads, Hkv key/value heads, Dh head dim, E experts,
K experts per token.
"""

from typing import Optional

import torch

from .triton_common import (_cdiv, _next_power_of_2, _rows, _wait_for_previous, available, launch_options,  # noqa: F401
                            tl, triton)  # (fused_ops: available)


# ---------------------------------------------------------------- RMSNorm with the residual add


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr,
                             x_row_stride, residual_row_stride, hidden, eps,
                             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PROGRAMMATIC: tl.constexpr):
        _wait_for_previous(PROGRAMMATIC)
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
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 8),
            **launch_options(x.device))
    return out, summed


# ---------------------------------------------------------------- SiLU-gated product


if triton is not None:

    @triton.jit
    def _silu_and_mul_kernel(gate_up_ptr, out_ptr, row_stride, width, BLOCK: tl.constexpr,
                             PROGRAMMATIC: tl.constexpr):
        _wait_for_previous(PROGRAMMATIC)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        gate = tl.load(gate_up_ptr + row * row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * row_stride + width + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * width + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty),
                 mask=inside)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate then up) → silu(gate) · up [..., I]."""
    width = gate_up.shape[-1] // 2
    rows = _rows(gate_up, 2 * width)
    out = torch.empty(gate_up.shape[:-1] + (width,), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] and width:
        block = min(_next_power_of_2(width), 1024)
        _silu_and_mul_kernel[(rows.shape[0], _cdiv(width, block))](
            rows, out, rows.stride(0), width, BLOCK=block, num_warps=min(max(block // 256, 1), 4),
            **launch_options(gate_up.device))
    return out


# ---------------------------------------------------------------- CLIP's quick GELU


if triton is not None:

    @triton.jit
    def _quick_gelu_kernel(x_ptr, out_ptr, count, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (x * tl.sigmoid(1.702 * x)).to(out_ptr.dtype.element_ty), mask=inside)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x · sigmoid(1.702 · x) in float32, rounded once: one read and one write of x."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        block = 1024
        _quick_gelu_kernel[(_cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------------- SAM's exact GELU


if triton is not None:

    @triton.jit
    def _erf_by_exponential(x):
        """erf(x) within 1.5e-7 (Abramowitz and Stegun 7.1.26): 1 − t·P(t)·exp(−x²) with t = 1/(1 + 0.3275911·|x|),
        the sign of x given back: about fifteen instructions, where libdevice's erff runs several times as many.
        With it a pass's GELU went from arithmetic-bound to near the bandwidth on the H200."""
        a = tl.abs(x)
        t = tl.fdiv(1.0, 1.0 + 0.3275911 * a, ieee_rounding=False)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        magnitude = 1.0 - poly * tl.exp2(-1.4426950408889634 * a * a)
        return tl.where(x < 0, -magnitude, magnitude)

    @triton.jit
    def _gelu_kernel(x_ptr, out_ptr, count, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        erf = _erf_by_exponential(x * 0.7071067811865476)
        tl.store(out_ptr + offsets, (0.5 * x * (1.0 + erf)).to(out_ptr.dtype.element_ty), mask=inside)


# Called from the vision towers' compiled blocks, where Dynamo traces the launch into the block's graph (a graph
# break here instead made Inductor materialise the residual stream around it: two more casts a block, and the
# towers' output further from float32, 6.04e-3 against 5.65e-3; h200-2026-12-01b, call 4).
def gelu(x: torch.Tensor, block: int = 4096, warps: int = 8) -> torch.Tensor:
    """The exact GELU, x · (1 + erf(x / √2)) / 2, in float32 and rounded once, as `F.gelu` computes it on bf16,
    with erf to 1.5e-7 in a few instructions (`_erf_by_exponential`): one read and one write of x. On the H200 at
    one pass's SAM hidden layers (bf16), 0.246 / 0.538 ms against Inductor's 0.331 / 0.715 and PyTorch's 0.266 /
    0.610 (a copy of the bytes 0.197 / 0.455); it differs from `F.gelu` in 0.14% of the outputs, by 1.9e-6 at
    most, where Inductor's (libdevice's erf) differs in 0.18%, by 1.5e-5 (`bench_vision.py --steps gelu`).
    `block`, `warps`: elements and warps a program (4096 and 8 the fastest of four, h200-2026-12-01b)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _gelu_kernel[(_cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block, num_warps=warps)
    return out


# ---------------------------------------------------------------- rotary embedding


if triton is not None:

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
                       BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                       PROGRAMMATIC: tl.constexpr):
        _wait_for_previous(PROGRAMMATIC)
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
            BLOCK_HALF=_next_power_of_2(half), num_warps=4, **launch_options(q.device))
    return q_out, k_out


# ---------------------------------------------------------------- router


if triton is not None:

    @triton.jit
    def _route_top_k_kernel(logits_ptr, ids_ptr, weights_ptr, row_stride, experts, scaling,
                            TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                            BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PROGRAMMATIC: tl.constexpr):
        _wait_for_previous(PROGRAMMATIC)
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
            BLOCK_E=_next_power_of_2(experts), BLOCK_K=_next_power_of_2(top_k), num_warps=1,
            **launch_options(logits.device))
    return ids, weights
