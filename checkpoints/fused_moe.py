"""The routed experts of a mixture-of-experts layer, reading each chosen expert's weights in place.

The experts' weights are held stacked: `w13` [E, 2I, D] (each expert's gate and up projections one
above the other) and `w2` [E, D, I] (its down projection). Each token runs its K chosen experts and
sums their outputs weighted by the router.

The PyTorch version groups the tokens by expert and runs each used expert once on its tokens (a
host-side loop: it is the definition, and what the CPU runs). On CUDA a Triton kernel does the same
in two launches without copying any weight and without leaving the device, so that a decode step can
be captured in a CUDA graph: few tokens read only their experts' rows (a GEMV per token and expert),
many tokens are sorted by expert and each expert's weights are read once per block of tokens. The
layer's shared experts are added after the routed sum; for few tokens the GEMVs compute them too.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import triton_moe
from .fused_ops import use_triton
from .triton_moe import available as _triton_available  # noqa: F401 (this form makes transformers ship
# the file with the remote code)


# Whether the shared experts run inside the routed experts' GEMV kernels when a decode step's tokens take them
# (benchmarks/bench_engine.py turns it off for a same-run trial of the batch-1 step).
SHARED_IN_GEMV = True


def routed_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, expert_ids: torch.Tensor,
                   expert_weights: torch.Tensor, add: Optional[torch.Tensor] = None,
                   shared: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """x [N, D], w13 [E, 2I, D], w2 [E, D, I], expert_ids [N, K], expert_weights [N, K] float32
    → Σ_k weight[n, k] · expert_k(x[n]) (+ `add` [N, D] if given, or + `shared(x)`), [N, D] in x's dtype.

    expert(x) = down(silu(gate(x)) · up(x)); each expert's output is rounded to x's dtype, the
    weighted sum is taken in float32 and rounded once; `add` (the shared experts' output) is added
    after that rounding. `shared`, the shared experts themselves (a DeepseekV2MLP), is added the same way;
    on CUDA, for the few tokens of a decode step, their projections run inside the routed experts' two GEMV
    kernels: at batch 1 each of the step's ~200 kernels costs ~4 µs in its graph whatever its size, and this
    takes their two GEMMs and the gating product out of every MoE layer.
    """
    if shared is not None and add is not None:
        raise ValueError("routed_experts: give the shared experts' output (add) or the shared experts, not both")
    if use_triton(x):
        if shared is not None and SHARED_IN_GEMV and triton_moe.takes_shared(
                *expert_ids.shape, w13.shape[1] // 2, shared.down_proj.weight.shape[1]):
            return triton_moe.routed_experts(x, w13, w2, expert_ids, expert_weights,
                                             shared=(shared.gate_up_weight.get(), shared.down_proj.weight))
        return triton_moe.routed_experts(x, w13, w2, expert_ids, expert_weights,
                                         shared(x) if shared is not None else add)
    if shared is not None:
        add = shared(x)
    tokens, top_k = expert_ids.shape
    flat = expert_ids.reshape(-1)  # [N·K], pair p = token p // K, slot p % K
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    per_pair = torch.empty(tokens * top_k, x.shape[-1], dtype=x.dtype, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        pairs = order[start:start + count]
        gate, up = F.linear(x[pairs // top_k], w13[expert]).chunk(2, dim=-1)
        per_pair[pairs] = F.linear(F.silu(gate) * up, w2[expert])
        start += count
    routed = (per_pair.view(tokens, top_k, -1).float() * expert_weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)
    return routed if add is None else routed + add
