"""The vision towers' own numerics (their wiring is covered through the whole model elsewhere)."""

import torch

from checkpoints.deepencoder import ClipMLP
from checkpoints.fused_ops import quick_gelu


def test_quick_gelu_rounds_once_in_bf16():
    h = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    wide = h.float()
    rounded_once = (wide * torch.sigmoid(1.702 * wide)).to(torch.bfloat16)
    three_roundings = h * torch.sigmoid(1.702 * h)
    assert torch.equal(quick_gelu(h), rounded_once)
    # The distinction is real: the bf16 chain of operations rounds a large share of values differently.
    assert (three_roundings != rounded_once).float().mean() > 0.1


def test_quick_gelu_in_float32_is_the_formula():
    h = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(quick_gelu(h), h * torch.sigmoid(1.702 * h))
    assert quick_gelu(h).dtype == torch.float32


def test_clip_mlp_applies_quick_gelu_between_its_projections():
    torch.manual_seed(2)
    mlp = ClipMLP(16, 64).to(torch.bfloat16)
    x = torch.randn(3, 5, 16).to(torch.bfloat16)
    assert torch.equal(mlp(x), mlp.fc2(quick_gelu(mlp.fc1(x))))
