"""The model's small element-wise steps, each as one operation: residual add + RMSNorm, SiLU-gated
product, CLIP's quick GELU, rotary embedding of queries and keys, and the router's softmax + top-k.

Every operation has a plain PyTorch version, which is the definition (it runs on the CPU and in the
tests), and on CUDA a Triton kernel that computes the same thing in one launch: a decode step is
hundreds of these small steps, and on the GPU their cost is the launches, not the arithmetic.
The Triton kernels live in `triton_ops.py`; `use_triton(tensor)` decides which runs.

Shapes in comments: N tokens, D hidden, H heads, Dh head dim, E experts, K experts per token.
"""

import os
from typing import Optional

import torch
import torch.nn.functional as F

try:  # optional: the CPU and the tests run without it
    from . import triton_linear, triton_ops
    from .triton_linear import takes as _triton_linear_takes  # noqa: F401 (this form makes transformers
    from .triton_ops import available as _triton_available  # noqa: F401 ship the files with the remote code)
except ImportError:  # pragma: no cover - depends on the environment
    triton_linear = triton_ops = None


def use_triton(tensor: torch.Tensor) -> bool:
    """Triton kernels for CUDA tensors when Triton is importable, unless DEEPSEEK_OCR_TRITON=0 or the code is
    being compiled (torch.compile generates its own kernels from the definitions, fused with their neighbours)."""
    return (tensor.is_cuda and triton_ops is not None and not torch.compiler.is_compiling()
            and triton_ops.available() and os.environ.get("DEEPSEEK_OCR_TRITON", "1") != "0")


# ---------------------------------------------------------------- RMSNorm with the residual add


def add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float):
    """(RMSNorm(x + residual), x + residual); with `residual` None, (RMSNorm(x), x).

    The sum is rounded to the activation dtype (it is the residual stream the next layer adds to);
    the statistics are taken in float32 and the normalised value is rounded before the weight is
    applied, as the reference decoder computes it.
    """
    if use_triton(x):
        return triton_ops.add_rms_norm(x, residual, weight, eps)
    summed = x if residual is None else x + residual
    variance = summed.float().pow(2).mean(-1, keepdim=True)
    normed = (summed.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed, summed


# ---------------------------------------------------------------- small projections


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias). On CUDA, for the few tokens of a decode step whose kernels are launched
    programmatically, a Triton GEMV that reads its weights while the kernel before it ends (`triton_linear.py`)."""
    if use_triton(x) and triton_linear.takes(x, weight, bias):
        return triton_linear.linear(x, weight)
    return F.linear(x, weight, bias)


def norm_linear(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: Optional[torch.Tensor] = None, keep_normed: bool = False):
    """(F.linear(normed, weight, bias), x + residual), with normed, x + residual = add_rms_norm(x, residual, ...);
    with `keep_normed`, normed as a third value. On CUDA, as `linear`, the norm computed inside the projection's
    kernel: one kernel fewer ahead of each q/k/v and router projection of a decode step."""
    if use_triton(x) and triton_linear.takes(x, weight, bias) and norm_weight.dtype == x.dtype:
        return triton_linear.norm_linear(x, residual, norm_weight, eps, weight, keep_normed)
    normed, summed = add_rms_norm(x, residual, norm_weight, eps)
    out = F.linear(normed, weight, bias)
    return (out, summed, normed) if keep_normed else (out, summed)


# ---------------------------------------------------------------- gated MLP activation


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] holding the gate and up projections side by side → silu(gate) · up, [..., I]."""
    if use_triton(gate_up):
        return triton_ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------- CLIP's activation


def quick_gelu(h: torch.Tensor) -> torch.Tensor:
    """x · sigmoid(1.702 · x), the GELU approximation CLIP was trained with, computed in float32 and
    rounded once to the input's dtype.

    That is what the original computes on the GPU: it compiles this activation with TorchScript, and
    under its bf16 autocast the compiled function returns float32 (bit-identical to this definition,
    checked on the GPU), which CLIP's next projection rounds once. Three bf16 operations would round
    many values differently and move CLIP's output away from the original's (the README has the
    figures). In float32 this is the formula itself.
    """
    if use_triton(h):
        return triton_ops.quick_gelu(h)
    wide = h.float()
    return (wide * torch.sigmoid(1.702 * wide)).to(h.dtype)


# ---------------------------------------------------------------- rotary embedding


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate queries [..., T, H, Dh] and keys [..., T, Hkv, Dh] by per-token cos/sin [..., T, Dh]
    (the half-split layout: dimension i pairs with i + Dh/2). Returns new tensors."""
    if use_triton(q):
        return triton_ops.apply_rotary(q, k, cos, sin)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ---------------------------------------------------------------- router


def route_top_k(logits: torch.Tensor, top_k: int, renormalize: bool, scaling: float):
    """Router logits [N, E] → (expert ids [N, K] int64, weights [N, K] float32).

    Softmax in float32 over all experts, the K best kept (greedy), optionally renormalised to sum to
    one, then scaled. Which K are chosen is what matters; their order within a row is unspecified.
    """
    if use_triton(logits):
        return triton_ops.route_top_k(logits, top_k, renormalize, scaling)
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    if top_k > 1 and renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling
