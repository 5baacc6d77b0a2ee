"""The Triton kernels (checkpoints/triton_*.py) against the PyTorch definitions they replace.

Triton's interpreter runs the kernels on CPU tensors, but only when TRITON_INTERPRET=1 is set before
Triton is first imported, and other test modules import the model (hence Triton) first. So the checks
run in one child process started with that variable (this file, run as a script), and each check is
reported here as its own test. The reference is each dispatching function called on CPU tensors,
which takes its PyTorch branch.

The same checks run on a GPU with `python tests/test_triton_kernels.py --device cuda` (no interpreter).
"""

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CHECKS = {}  # name → function(device) raising AssertionError on a mismatch


def check(function):
    CHECKS[function.__name__.removeprefix("check_")] = function
    return function


def load_kernel_modules(*names):
    """Import the named modules of checkpoints/ (fused_ops, triton_ops, ...) without running
    checkpoints/__init__.py, which imports the whole model and transformers (seconds, and nothing here
    needs them)."""
    if "checkpoints" not in sys.modules:
        spec = importlib.machinery.ModuleSpec("checkpoints", None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [str(REPO / "checkpoints")]
        sys.modules["checkpoints"] = package
    return [importlib.import_module(f"checkpoints.{name}") for name in names]


# ---------------------------------------------------------------- comparison helpers


def assert_close(actual, expected, dtype, what, bf16_atol=1.6e-2):
    """float32 to float32 precision; bfloat16 within about two units in the last place, since the
    kernels round once where the PyTorch definitions round after every operation."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    tolerance = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=bf16_atol)
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), msg=lambda m: f"{what}: {m}", **tolerance)


def float_types():
    return (torch.float32, torch.bfloat16)


# ---------------------------------------------------------------- fused_ops.py


@check
def check_add_rms_norm(device):
    fused_ops, kernels = load_kernel_modules("fused_ops", "triton_ops")
    generator = torch.Generator().manual_seed(0)
    for dtype in float_types():
        for shape in ((5, 40), (2, 3, 64)):  # a width that is not a power of two; leading dims
            x = torch.randn(shape, generator=generator).to(dtype)
            residual = torch.randn(shape, generator=generator).to(dtype)
            weight = (1 + 0.1 * torch.randn(shape[-1], generator=generator)).to(dtype)
            for res in (residual, None):
                expected_out, expected_sum = fused_ops.add_rms_norm(x, res, weight, 1e-6)
                out, summed = kernels.add_rms_norm(x.to(device), None if res is None else res.to(device),
                                                   weight.to(device), 1e-6)
                what = f"add_rms_norm {dtype} {shape} residual={'yes' if res is not None else 'None'}"
                assert torch.equal(summed.cpu(), expected_sum), f"{what}: the rounded sum differs"
                assert_close(out, expected_out, dtype, what)
    # Strided views (columns of a wider buffer) read the right elements.
    wide = torch.randn(6, 96, generator=generator).to(torch.bfloat16)
    x, residual = wide[:, :40], wide[:, 48:88]
    weight = torch.ones(40, dtype=torch.bfloat16)
    expected_out, expected_sum = fused_ops.add_rms_norm(x, residual, weight, 1e-6)
    out, summed = kernels.add_rms_norm(x.to(device), residual.to(device), weight.to(device), 1e-6)
    assert torch.equal(summed.cpu(), expected_sum), "add_rms_norm on strided views: the sum differs"
    assert_close(out, expected_out, torch.bfloat16, "add_rms_norm on strided views")


@check
def check_silu_and_mul(device):
    fused_ops, kernels = load_kernel_modules("fused_ops", "triton_ops")
    generator = torch.Generator().manual_seed(1)
    for dtype in float_types():
        for shape in ((7, 2 * 48), (2, 3, 2 * 1500)):  # the second spans two tiles of 1024
            gate_up = (3 * torch.randn(shape, generator=generator)).to(dtype)
            assert_close(kernels.silu_and_mul(gate_up.to(device)), fused_ops.silu_and_mul(gate_up), dtype,
                         f"silu_and_mul {dtype} {shape}")


@check
def check_quick_gelu(device):
    fused_ops, kernels = load_kernel_modules("fused_ops", "triton_ops")
    generator = torch.Generator().manual_seed(7)
    for dtype in float_types():
        for shape in ((5, 40), (3, 7, 1500)):  # the second spans several blocks of 1024, the last partial
            h = (3 * torch.randn(shape, generator=generator)).to(dtype)
            assert_close(kernels.quick_gelu(h.to(device)), fused_ops.quick_gelu(h), dtype, f"quick_gelu {dtype} {shape}")


@check
def check_gelu(device):
    """SAM's exact GELU with its short erf (`triton_ops.gelu`) against F.gelu: within 1e-6 of it (relative beyond
    1) in float32 over a dense range, within the bf16 tolerance elsewhere, and equal to F.gelu's bf16 outputs in
    all but a few."""
    (kernels,) = load_kernel_modules("triton_ops")
    dense = torch.linspace(-12, 12, 200_001)
    error = (kernels.gelu(dense.to(device)).cpu().double() - torch.nn.functional.gelu(dense.double())).abs()
    assert (error / dense.double().abs().clamp(min=1)).max() < 1e-6, f"gelu float32: {error.max().item()}"
    generator = torch.Generator().manual_seed(5)
    differing, outputs = 0, 0
    for dtype in float_types():
        for shape in ((5, 40), (3, 7, 1500), (70_000,)):  # partial programs of 4096, and several of them
            h = (1.5 * torch.randn(shape, generator=generator)).to(dtype)
            got, expected = kernels.gelu(h.to(device)).cpu(), torch.nn.functional.gelu(h)
            assert_close(got, expected, dtype, f"gelu {dtype} {shape}")
            if dtype == torch.bfloat16:
                differing, outputs = differing + int((got != expected).sum()), outputs + got.numel()
    # Counted over every shape together: one output of the smallest (200) alone is 0.5% of it. The erf's last bits
    # (here and in F.gelu's math library) decide a few roundings: 0.24% under the interpreter, 0.14% on the H200
    # against the GPU's F.gelu (h200-2026-12-01b, call 2).
    assert differing < 0.005 * outputs, f"gelu bf16: {differing} of {outputs} outputs differ from F.gelu's"


@check
def check_apply_rotary(device):
    fused_ops, kernels = load_kernel_modules("fused_ops", "triton_ops")
    generator = torch.Generator().manual_seed(2)
    heads, kv_heads, head_dim, tokens = 4, 2, 16, 6
    angles = torch.rand(2, tokens, head_dim // 2, generator=generator) * 6
    angles = torch.cat((angles, angles), dim=-1)
    for dtype in float_types():
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        # Packed tokens: q and k are views of one fused projection (row stride (H + 2·Hkv)·Dh).
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
        q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
        k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
        expected_q, expected_k = fused_ops.apply_rotary(q, k, cos[0], sin[0])
        dq = qkv.to(device)
        got_q, got_k = kernels.apply_rotary(dq[:, :heads * head_dim].view(tokens, heads, head_dim),
                                            dq[:, heads * head_dim:(heads + kv_heads) * head_dim].view(
                                                tokens, kv_heads, head_dim),
                                            cos[0].to(device), sin[0].to(device))
        assert_close(got_q, expected_q, dtype, f"apply_rotary q, packed strided views, {dtype}")
        assert_close(got_k, expected_k, dtype, f"apply_rotary k, packed strided views, {dtype}")
        # Batched [B, T, H, Dh] with per-sequence angles, and with one set of angles broadcast over B.
        qb = torch.randn(2, tokens, heads, head_dim, generator=generator).to(dtype)
        kb = torch.randn(2, tokens, heads, head_dim, generator=generator).to(dtype)
        for c, s, label in ((cos, sin, "per sequence"), (cos[:1], sin[:1], "broadcast")):
            expected_q, expected_k = fused_ops.apply_rotary(qb, kb, c, s)
            got_q, got_k = kernels.apply_rotary(qb.to(device), kb.to(device), c.to(device), s.to(device))
            assert_close(got_q, expected_q, dtype, f"apply_rotary batched q, angles {label}, {dtype}")
            assert_close(got_k, expected_k, dtype, f"apply_rotary batched k, angles {label}, {dtype}")


@check
def check_route_top_k(device):
    fused_ops, kernels = load_kernel_modules("fused_ops", "triton_ops")
    generator = torch.Generator().manual_seed(3)
    for dtype in float_types():
        for experts, top_k in ((16, 3), (12, 4), (64, 6), (8, 1)):
            # Distinct logits, exactly representable in bfloat16: no ties, so the top-k is one set.
            logits = torch.stack([(torch.randperm(experts, generator=generator) - experts / 2) * 0.125
                                  for _ in range(9)]).to(dtype)
            for renormalize in (True, False):
                expected_ids, expected_weights = fused_ops.route_top_k(logits, top_k, renormalize, 2.5)
                ids, weights = kernels.route_top_k(logits.to(device), top_k, renormalize, 2.5)
                what = f"route_top_k E={experts} K={top_k} renormalize={renormalize} {dtype}"
                assert ids.dtype == torch.int64 and weights.dtype == torch.float32, f"{what}: result dtypes"
                # The order within a row is unspecified: compare rows sorted by expert id.
                ids, order = ids.cpu().sort(dim=-1)
                expected_ids, expected_order = expected_ids.sort(dim=-1)
                assert torch.equal(ids, expected_ids), f"{what}: chosen experts differ"
                assert_close(weights.cpu().gather(1, order), expected_weights.gather(1, expected_order),
                             torch.float32, what)


# ---------------------------------------------------------------- fused_moe.py


def moe_case(tokens, experts=8, top_k=3, hidden=48, inter=40, dtype=None, only_experts=None, seed=4):
    dtype = dtype or torch.bfloat16
    generator = torch.Generator().manual_seed(seed + tokens)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=generator) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=generator) / inter ** 0.5).to(dtype)
    pool = torch.tensor(only_experts) if only_experts is not None else torch.arange(experts)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=generator)[:top_k]] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=generator)
    add = torch.randn(tokens, hidden, generator=generator).to(dtype)
    return x, w13, w2, ids.reshape(tokens, top_k), weights, add


def compare_moe(device, case, what, path=None, with_add=True):
    fused_moe, kernels = load_kernel_modules("fused_moe", "triton_moe")
    x, w13, w2, ids, weights, add = case
    add = add if with_add else None
    expected = fused_moe.routed_experts(x, w13, w2, ids, weights, add)
    got = kernels.routed_experts(x.to(device), w13.to(device), w2.to(device), ids.to(device), weights.to(device),
                                 None if add is None else add.to(device), path=path)
    # Near-zero outputs (the routed sum cancelling `add`) carry the rounding of their larger terms.
    assert_close(got, expected, x.dtype, f"{what}, add={'yes' if add is not None else 'None'}",
                 bf16_atol=1.6e-2 * max(1.0, expected.abs().max().item()))


@check
def check_routed_experts_paths(device):
    """Both paths on the same inputs, in both precisions, with experts no token chose."""
    for dtype in float_types():
        for tokens in (1, 7):
            case = moe_case(tokens, dtype=dtype, only_experts=[1, 4, 5, 6])  # experts 0, 2, 3, 7 stay empty
            for path in ("gemv", "grouped"):
                compare_moe(device, case, f"routed_experts {path} N={tokens} {dtype}", path=path)
    for path in ("gemv", "grouped"):
        compare_moe(device, moe_case(3), f"routed_experts {path} N=3", path=path, with_add=False)


class SharedExperts:
    """The shared experts as DeepseekV2MLP holds them: gate and up stacked [2S, D], down [D, S]; calling it is
    the definition (each product rounded to the dtype, as the module's)."""

    def __init__(self, gate_up, down):
        import types

        fused_ops, = load_kernel_modules("fused_ops")
        self.gate_up_weight = types.SimpleNamespace(get=lambda: gate_up)
        self.down_proj = types.SimpleNamespace(weight=down)
        self._silu_and_mul = fused_ops.silu_and_mul

    def __call__(self, x):
        gate_up = torch.nn.functional.linear(x, self.gate_up_weight.get())
        return torch.nn.functional.linear(self._silu_and_mul(gate_up), self.down_proj.weight)


def shared_experts_case(hidden, width, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(2 * width, hidden, generator=generator) / hidden ** 0.5).to(dtype)
    down = (torch.randn(hidden, width, generator=generator) / width ** 0.5).to(dtype)
    return gate_up, down


@check
def check_routed_experts_with_shared_experts(device):
    """The shared experts (two and three parts of the experts' width) computed inside the GEMV kernels equal the
    routed sum plus their own output; through fused_moe on a GPU, for the few tokens the GEMVs take; shapes that
    do not cut into parts are refused."""
    fused_moe, kernels = load_kernel_modules("fused_moe", "triton_moe")
    for dtype in float_types():
        for tokens, parts in ((1, 2), (7, 3)):
            x, w13, w2, ids, weights, _ = moe_case(tokens, dtype=dtype, only_experts=[1, 4, 5, 6])
            gate_up, down = shared_experts_case(x.shape[1], parts * w2.shape[2], dtype, seed=30 + tokens)
            shared = SharedExperts(gate_up, down)
            expected = fused_moe.routed_experts(x, w13, w2, ids, weights, shared(x))
            assert torch.equal(fused_moe.routed_experts(x, w13, w2, ids, weights, shared=shared), expected)  # CPU
            on = [t.to(device) for t in (x, w13, w2, ids, weights, gate_up, down)]
            got = kernels.routed_experts(*on[:5], shared=(on[5], on[6]), path="gemv")
            what = f"routed_experts with shared experts of {parts} parts, N={tokens} {dtype}"
            assert_close(got, expected, dtype, what, bf16_atol=1.6e-2 * max(1.0, expected.abs().max().item()))
            if device == "cuda":  # the dispatch: fused for a decode step's few tokens
                fused = fused_moe.routed_experts(*on[:5], shared=SharedExperts(on[5], on[6]))
                assert_close(fused, expected, dtype, what + " through fused_moe",
                             bf16_atol=1.6e-2 * max(1.0, expected.abs().max().item()))
    x, w13, w2, ids, weights, add = moe_case(2)
    for gate_up, down, path, extra in ((*shared_experts_case(48, 60, torch.bfloat16, 1), "gemv", None),  # 60 % 40
                                       (*shared_experts_case(48, 80, torch.bfloat16, 1), "grouped", None),
                                       (*shared_experts_case(48, 80, torch.bfloat16, 1), "gemv", add)):
        try:
            kernels.routed_experts(*(t.to(device) for t in (x, w13, w2, ids, weights)),
                                   None if extra is None else extra.to(device),
                                   shared=(gate_up.to(device), down.to(device)), path=path)
        except ValueError as error:
            assert "shared experts" in str(error), str(error)
        else:
            raise AssertionError(f"routed_experts took shared experts of width {down.shape[1]} on the {path} path "
                                 f"{'with' if extra is not None else 'without'} add")


@check
def check_routed_experts_boundary(device):
    """The automatic choice on either side of GEMV_MAX_PAIRS (K = 3: its third in tokens, and one more)."""
    (kernels,) = load_kernel_modules("triton_moe")
    limit = kernels.GEMV_MAX_PAIRS // 3
    for tokens in (limit, limit + 1):
        compare_moe(device, moe_case(tokens), f"routed_experts N={tokens} (automatic path)")


@check
def check_routed_experts_grouped_tiles(device):
    """Blocks of 32 and 128 rows (by pairs per expert; 16 is the paths check's), the parallel grouping
    (counting launch plus atomics) beside the one-program one, and sizes that are not multiples of
    any tile, in float32."""
    (kernels,) = load_kernel_modules("triton_moe")
    for tokens in (60, 200):  # 22 and 75 pairs per expert
        compare_moe(device, moe_case(tokens), f"routed_experts grouped N={tokens}")
    saved = kernels.ALIGN_ONE_PROGRAM_MAX_ROWS
    kernels.ALIGN_ONE_PROGRAM_MAX_ROWS = 0
    try:
        compare_moe(device, moe_case(40, only_experts=[0, 2, 3, 7]), "routed_experts grouped N=40, parallel grouping")
    finally:
        kernels.ALIGN_ONE_PROGRAM_MAX_ROWS = saved
    compare_moe(device, moe_case(50, experts=6, top_k=2, hidden=72, inter=100, dtype=torch.float32),
                "routed_experts grouped, odd sizes, float32")


@check
def check_group_by_expert_modes(device):
    """Both grouping modes lay every pair once in its expert's run, each run starting at a block and
    padded to whole blocks, blocks past the runs marked `experts`; the parallel mode as the one-program
    mode, up to the order of pairs inside a run (which rows of a matrix product they take)."""
    (kernels,) = load_kernel_modules("triton_moe")
    generator = torch.Generator().manual_seed(9)
    for experts, pairs, block_m in ((8, 150, 16), (64, 1536, 32), (5, 40, 16)):
        ids = torch.randint(0, experts, (pairs,), generator=generator, dtype=torch.int64)
        ids[: pairs // 4] = 1  # one crowded expert, spanning several blocks
        layouts = {}
        for one_program in (True, False):
            sorted_pairs, block_expert = (t.cpu().long() for t in kernels.group_by_expert(
                ids.to(device), experts, block_m, one_program=one_program))
            what = f"group_by_expert E={experts} P={pairs} one_program={one_program}"
            real = sorted_pairs[sorted_pairs < pairs]
            assert torch.equal(real.sort().values, torch.arange(pairs)), f"{what}: pairs missing or repeated"
            assert torch.all(sorted_pairs[sorted_pairs >= pairs] == pairs), f"{what}: padding not marked"
            row_expert = block_expert.repeat_interleave(block_m)
            placed = sorted_pairs < pairs
            assert torch.equal(row_expert[placed], ids[sorted_pairs[placed]]), f"{what}: a pair outside its run"
            counts = torch.bincount(ids, minlength=experts)
            blocks = (counts + block_m - 1) // block_m
            expected_blocks = torch.cat([torch.repeat_interleave(torch.arange(experts), blocks),
                                         torch.full((len(block_expert) - int(blocks.sum()),), experts)])
            assert torch.equal(block_expert, expected_blocks), f"{what}: blocks' experts"
            layouts[one_program] = [set(sorted_pairs[row_expert == e].tolist()) for e in range(experts)]
        assert layouts[True] == layouts[False], f"E={experts} P={pairs}: the two modes group differently"


def sequential_weighted_sum(per_pair, weights, top_k, add, out_dtype):
    """The grouped path's last step in plain PyTorch float32: acc = +0, then acc + weight · output for
    slot 0, 1, … in turn (each product rounded to float32), rounded to out_dtype, then + add."""
    tokens, hidden = per_pair.shape[0] // top_k, per_pair.shape[1]
    outputs = per_pair.cpu().view(tokens, top_k, hidden).float()
    slot_weights = weights.cpu().view(tokens, top_k).float()
    acc = torch.zeros(tokens, hidden)
    for slot in range(top_k):
        acc = acc + outputs[:, slot] * slot_weights[:, slot, None]
    routed = acc.to(out_dtype)
    return routed if add is None else (routed.float() + add.cpu().float()).to(out_dtype)


@check
def check_weighted_sum_variants(device):
    """Every launch configuration of the routed sum gives the bits of the sequential float32 sum.
    Sizes: token counts that leave the last block of tokens partial, D that spans two tiles of 256
    with the second partial, a token whose outputs are all −0 (the sum must be +0: it starts from +0)."""
    (kernels,) = load_kernel_modules("triton_moe")
    generator = torch.Generator().manual_seed(8)
    for dtype in float_types():
        for tokens, top_k, hidden in ((13, 6, 80), (5, 3, 300)):
            per_pair = torch.randn(tokens * top_k, hidden, generator=generator).to(dtype)
            per_pair[top_k:2 * top_k] = -0.0
            weights = torch.rand(tokens * top_k, generator=generator)
            add = torch.randn(tokens, hidden, generator=generator).to(dtype)
            for extra in (add, None):
                expected = sequential_weighted_sum(per_pair, weights, top_k, extra, dtype)
                for name in kernels.WEIGHTED_SUM_VARIANTS:
                    got = kernels.weighted_sum(per_pair.to(device), weights.to(device), top_k,
                                               None if extra is None else extra.to(device), variant=name).cpu()
                    what = (f"weighted_sum {name} N={tokens} K={top_k} D={hidden} {dtype} "
                            f"add={'yes' if extra is not None else 'None'}")
                    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
                    assert torch.equal(got.view(bits), expected.view(bits)), \
                        f"{what}: not the bits of the sequential float32 sum"


# ---------------------------------------------------------------- paged_attention.py


def paged_case(dtype, heads=4, kv_heads=2, head_dim=16, block_size=4, num_blocks=32, seed=5):
    """Five sequences: empty, one position, ending mid-block, exactly filling blocks, ending mid-block
    in the table's last block; the tables' unused entries point at random (real) blocks."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=generator).to(dtype)
    values = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=generator).to(dtype)
    width = 6
    seq_lens = torch.tensor([0, 1, 7, 12, 23], dtype=torch.int32)
    tables = torch.randperm(num_blocks - 1, generator=generator)[:5 * width].add(1).view(5, width).to(torch.int32)
    q = torch.randn(5, heads, head_dim, generator=generator).to(dtype)
    return q, keys, values, tables, seq_lens


@check
def check_paged_decode_attention(device):
    paged_attention, kernels = load_kernel_modules("paged_attention", "triton_attention")
    for dtype in float_types():
        fewer = dtype != torch.float32  # bfloat16 checks the rounding; float32 every split count
        for heads, kv_heads, split_counts in ((4, 2, (None,) if fewer else (None, 1, 3)),
                                              (3, 3, (7,) if fewer else (2, 7))):
            q, keys, values, tables, seq_lens = paged_case(dtype, heads, kv_heads)
            expected = paged_attention.paged_decode_attention(q, keys, values, tables, seq_lens)
            # None: the automatic choice (6 here: one per block); 7: more splits than blocks.
            for splits in split_counts:
                got = kernels.paged_decode_attention(q.to(device), keys.to(device), values.to(device),
                                                     tables.to(device), seq_lens.to(device), num_splits=splits)
                assert_close(got, expected, dtype, f"paged_decode_attention H={heads} Hkv={kv_heads} "
                             f"splits={splits} {dtype}")
    # Whatever lies past a sequence's end (here NaN) is never read, and q may be a strided view.
    q, keys, values, tables, seq_lens = paged_case(torch.float32)
    expected = paged_attention.paged_decode_attention(q, keys, values, tables, seq_lens)
    poisoned_k, poisoned_v = keys.clone(), values.clone()
    for row, length in enumerate(seq_lens.tolist()):
        for index, block in enumerate(tables[row].tolist()):
            start = max(length - index * keys.shape[2], 0)
            poisoned_k[block, :, start:] = float("nan")
            poisoned_v[block, :, start:] = float("nan")
    wide_q = torch.cat([q, torch.zeros_like(q)], dim=-1)[..., :q.shape[-1]]
    got = kernels.paged_decode_attention(wide_q.to(device), poisoned_k.to(device), poisoned_v.to(device),
                                         tables.to(device), seq_lens.to(device), num_splits=3)
    assert_close(got, expected, torch.float32, "paged_decode_attention with NaN past each sequence's end")


@check
def check_paged_decode_large_blocks(device):
    """A block of 64 positions walked in chunks of DECODE_CHUNK, Dh = 128, one and several splits."""
    paged_attention, kernels = load_kernel_modules("paged_attention", "triton_attention")
    q, keys, values, tables, _ = paged_case(torch.bfloat16, heads=2, kv_heads=1, head_dim=128, block_size=64,
                                            num_blocks=31)
    seq_lens = torch.tensor([0, 1, 100, 128, 383], dtype=torch.int32)
    expected = paged_attention.paged_decode_attention(q, keys, values, tables, seq_lens)
    for splits in (1, 4):
        got = kernels.paged_decode_attention(q.to(device), keys.to(device), values.to(device), tables.to(device),
                                             seq_lens.to(device), num_splits=splits)
        assert_close(got, expected, torch.bfloat16, f"paged_decode_attention block 64, splits={splits}")
    few = slice(2, 2 + kernels.DECODE_FEW_ROWS)  # a step of few sequences: its own chunk and warps
    got = kernels.paged_decode_attention(q[few].to(device), keys.to(device), values.to(device), tables[few].to(device),
                                         seq_lens[few].to(device))
    assert_close(got, expected[few], torch.bfloat16, "paged_decode_attention block 64, a few sequences")


def packed_prompts_case(dtype, lengths, heads, kv_heads, head_dim, seed=9):
    """q, k, v of packed prompts cut out of one fused projection [T, (H + 2·Hkv)·Dh], as the model's are."""
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    return q, k, v


@check
def check_prefill_attention(device):
    """Packed prompts of lengths around the kernel's block of queries (one token, a block less one, a block, a
    block and one, several blocks), each attending causally to itself only, against the SDPA definition."""
    paged_attention, kernels = load_kernel_modules("paged_attention", "triton_attention")
    block = kernels.PREFILL_BLOCK_M
    lengths = (1, block - 1, block, block + 1, 2 * block + 5)
    for dtype in float_types():
        for heads, kv_heads, head_dim in ((4, 2, 16), (2, 2, 128)):
            q, k, v = packed_prompts_case(dtype, lengths, heads, kv_heads, head_dim)
            batch = paged_attention.PagedBatch(positions=torch.zeros(0), slots=torch.zeros(0), prompt_lengths=lengths)
            expected = paged_attention.prefill_attention(q, k, v, batch.length_groups("cpu"))
            work = kernels.prefill_work(lengths).to(device)
            got = kernels.prefill_attention(q.to(device), k.to(device), v.to(device), work)
            assert_close(got, expected, dtype, f"prefill_attention H={heads} Hkv={kv_heads} Dh={head_dim} {dtype}")
    # A table padded with rows that do nothing (a CUDA graph's), NaN in another prompt's keys never read.
    q, k, v = packed_prompts_case(torch.float32, lengths, 4, 2, 16)
    batch = paged_attention.PagedBatch(positions=torch.zeros(0), slots=torch.zeros(0), prompt_lengths=lengths)
    expected = paged_attention.prefill_attention(q, k, v, batch.length_groups("cpu"))
    rows = kernels.prefill_work_rows(sum(lengths), len(lengths))
    work = kernels.prefill_work(lengths, rows=rows)
    assert work.shape == (rows, 3) and int(work[-1].abs().sum()) == 0, "the table was not padded with empty rows"
    assert len(kernels.prefill_work(lengths)) <= rows, "prefill_work_rows is not a bound"
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[sum(lengths[:4]):], poisoned_v[sum(lengths[:4]):] = float("nan"), float("nan")
    got = kernels.prefill_attention(q.to(device), poisoned_k.to(device), poisoned_v.to(device), work.to(device))
    cut = sum(lengths[:4])
    assert_close(got[:cut], expected[:cut], torch.float32, "prefill_attention beside another prompt's NaN keys")


@check
def check_store_kv(device):
    paged_attention, kernels = load_kernel_modules("paged_attention", "triton_attention")
    generator = torch.Generator().manual_seed(6)
    for dtype in float_types():
        tokens, heads, kv_heads, head_dim, block_size = 5, 4, 2, 16, 4
        keys = torch.randn(8, kv_heads, block_size, head_dim, generator=generator).to(dtype)
        values = torch.randn(8, kv_heads, block_size, head_dim, generator=generator).to(dtype)
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
        k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
        v = qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
        slots = torch.tensor([4, 5, 31, 9, 16])  # within a block, a block's last slot, a block's first
        expected_keys, expected_values = keys.clone(), values.clone()
        paged_attention.store_kv(expected_keys, expected_values, k, v, slots)
        got_keys, got_values = keys.to(device), values.to(device)
        dqkv = qkv.to(device)
        kernels.store_kv(got_keys, got_values,
                         dqkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim),
                         dqkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim), slots.to(device))
        assert torch.equal(got_keys.cpu(), expected_keys), f"store_kv keys {dtype}"
        assert torch.equal(got_values.cpu(), expected_values), f"store_kv values {dtype}"


# ---------------------------------------------------------------- triton_linear.py


@check
def check_linear_gemv(device):
    """The few-token projections, with and without the residual add and RMSNorm inside, against F.linear after
    add_rms_norm: K a power of two and not (its rest, 1280 = 1024 + 256 in the model), one and several tokens,
    output rows that do not fill the last tile, x a strided view."""
    fused_ops, kernels = load_kernel_modules("fused_ops", "triton_linear")
    generator = torch.Generator().manual_seed(41)
    for dtype in float_types():
        for tokens, k, n in ((1, 80, 24), (3, 64, 70), (2, 1280, 12)):
            def rand(*shape, scale=1.0):
                return (torch.randn(*shape, generator=generator) * scale).to(dtype)

            wide = rand(tokens, 2 * k)
            x, residual, norm, weight = wide[:, ::2], rand(tokens, k), 1 + rand(k, scale=0.1), rand(n, k, scale=k ** -0.5)
            what = f"T={tokens} K={k} N={n} {dtype}"
            assert_close(kernels.linear(x.to(device), weight.to(device)), torch.nn.functional.linear(x, weight), dtype,
                         f"linear {what}")
            for res in (residual, None):
                expected = fused_ops.norm_linear(x, res, norm, 1e-6, weight, keep_normed=True)
                got = kernels.norm_linear(x.to(device), None if res is None else res.to(device), norm.to(device), 1e-6,
                                          weight.to(device), keep_normed=True)
                for name, a, b in zip(("out", "summed", "normed"), got, expected):
                    assert_close(a, b, dtype, f"norm_linear {name} {what} residual={res is not None}")
                out, summed = kernels.norm_linear(x.to(device), None if res is None else res.to(device),
                                                  norm.to(device), 1e-6, weight.to(device))
                assert torch.equal(out.cpu(), got[0].cpu()) and torch.equal(summed.cpu(), got[1].cpu())


# ---------------------------------------------------------------- programmatic dependent launch


def decode_layer_chain(kernels, inputs, weights, cache):
    """One decoder layer's step for a few tokens through the kernels that may be launched programmatically, with
    PyTorch operations between some of them: residual + RMSNorm, q/k/v with a norm inside, rotary, the cache
    store, paged decode attention (several splits, then their combine), o, the router's projection with a norm
    inside, its top-k, the experts' two GEMVs with shared experts, a SiLU-gated product. Each kernel reads what
    the one before it wrote."""
    triton_ops, triton_attention, triton_moe, triton_linear = kernels
    x, residual = inputs
    w = weights
    keys, values, tables, seq_lens, slots = cache
    tokens, heads, head_dim = x.shape[0], 4, 32
    normed, summed = triton_ops.add_rms_norm(x, residual, w["norm"], 1e-6)
    qkv, summed = triton_linear.norm_linear(torch.relu(normed), summed, w["norm"], 1e-6, w["qkv"])
    q, k, v = qkv.split(heads * head_dim, dim=-1)
    q, k = triton_ops.apply_rotary(q.view(tokens, heads, head_dim), k.view(tokens, heads, head_dim), w["cos"], w["sin"])
    triton_attention.store_kv(keys, values, k, v.view(tokens, heads, head_dim), slots)
    attended = triton_attention.paged_decode_attention(q, keys, values, tables, seq_lens)
    logits, summed, normed = triton_linear.norm_linear(triton_linear.linear(attended.flatten(1), w["o"]), summed,
                                                       w["norm"], 1e-6, w["router"], keep_normed=True)
    ids, expert_weights = triton_ops.route_top_k(logits, 3, True, 1.0)
    routed = triton_moe.routed_experts(normed, w["w13"], w["w2"], ids, expert_weights,
                                       shared=(w["shared_gate_up"], w["shared_down"]), path="gemv")
    return routed, summed, triton_ops.silu_and_mul(routed @ w["gate_up"])


@check
def check_programmatic_launch_chain(device):
    """The chain of `decode_layer_chain` launched programmatically and replayed as a CUDA graph (on a GPU that has
    programmatic dependent launch) gives the bits of the same chain launched plainly, replay after replay on new
    inputs: a kernel that read or wrote before the one before it had finished would read a value of the previous
    replay. Under the interpreter (no such launch) the launchers take the switch and launch plainly."""
    triton_common, *kernels = load_kernel_modules("triton_common", "triton_ops", "triton_attention", "triton_moe",
                                                  "triton_linear")
    generator = torch.Generator().manual_seed(40)
    dtype, tokens, hidden, heads, head_dim, experts, inter = torch.bfloat16, 2, 128, 4, 32, 8, 64

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

    angles = torch.rand(tokens, head_dim // 2, generator=generator) * 6.28
    weights = {"norm": rand(hidden), "qkv": rand(3 * heads * head_dim, hidden, scale=hidden ** -0.5),
               "o": rand(hidden, heads * head_dim, scale=(heads * head_dim) ** -0.5),
               "router": rand(experts, hidden, scale=hidden ** -0.5),
               "w13": rand(experts, 2 * inter, hidden, scale=hidden ** -0.5),
               "w2": rand(experts, hidden, inter, scale=inter ** -0.5),
               "shared_gate_up": rand(4 * inter, hidden, scale=hidden ** -0.5),
               "shared_down": rand(hidden, 2 * inter, scale=(2 * inter) ** -0.5),
               "gate_up": rand(hidden, 2 * inter, scale=hidden ** -0.5),
               "cos": torch.cat([angles.cos()] * 2, dim=-1).to(dtype).to(device),
               "sin": torch.cat([angles.sin()] * 2, dim=-1).to(dtype).to(device)}
    block_size, width = 16, 12
    keys, values = rand(2 * width + 1, heads, block_size, head_dim), rand(2 * width + 1, heads, block_size, head_dim)
    tables = torch.arange(1, 2 * width + 1, dtype=torch.int32).view(2, width).to(device)
    seq_lens = torch.tensor([150, 37], dtype=torch.int32, device=device)
    slots = torch.stack([tables[0, 149 // block_size].long() * block_size + 149 % block_size,
                         tables[1, 36 // block_size].long() * block_size + 36 % block_size])
    cache = (keys, values, tables, seq_lens, slots)
    inputs = (rand(tokens, hidden), rand(tokens, hidden))
    assert triton_common.launch_options(torch.device(device)) == {"PROGRAMMATIC": False}  # off until switched on
    served = triton_common._PROGRAMMATIC_LAUNCH
    triton_common.use_programmatic_launch(True)
    try:
        programmatic = triton_common.programmatic(torch.device(device))
        assert programmatic == (device == "cuda" and torch.cuda.get_device_capability()[0] >= 9), programmatic
        if programmatic:  # captured after a warm-up on a side stream, as the engine captures its steps
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                decode_layer_chain(kernels, inputs, weights, cache)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = decode_layer_chain(kernels, inputs, weights, cache)
        for replay in range(4 if programmatic else 1):
            for buffer in inputs:
                buffer.copy_(torch.randn(buffer.shape, generator=generator).to(dtype))
            before = (keys.clone(), values.clone())
            if programmatic:
                graph.replay()
            else:
                outputs = decode_layer_chain(kernels, inputs, weights, cache)
            got = [t.clone() for t in outputs] + [keys.clone(), values.clone()]
            keys.copy_(before[0]), values.copy_(before[1])
            triton_common.use_programmatic_launch(False)
            expected = list(decode_layer_chain(kernels, inputs, weights, cache)) + [keys.clone(), values.clone()]
            triton_common.use_programmatic_launch(True)
            for name, a, b in zip(("routed", "summed", "silu_and_mul", "keys", "values"), got, expected):
                assert torch.equal(a, b), f"replay {replay}: {name} differs from the plain launches"
    finally:
        triton_common.use_programmatic_launch(served)


# ---------------------------------------------------------------- triton_relative_attention.py


def relative_attention_reference(q, k, v, row_terms, col_terms):
    """The definition: the terms summed into a dense [N, N] bias, then attention (deepencoder's materialised
    order), computed in float32; [B, N, n, d] as the kernel returns it."""
    batch, heads, tokens, _ = q.shape
    height, width = row_terms.shape[-1], col_terms.shape[-1]
    rows = row_terms.float().reshape(batch, heads, tokens, height, 1)
    cols = col_terms.float().reshape(batch, heads, tokens, 1, width)
    bias = (rows + cols).reshape(batch, heads, tokens, height * width)
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
    return out.transpose(1, 2).to(q.dtype)


def padded_to_windows(x, height, width, window, pad_value):
    """x [B, n, H·W, C] over a height × width grid → [B, n, H'·W', C], the grid padded at its bottom and right to
    whole window × window windows with the token pad_value [n, C]."""
    batch, heads = x.shape[:2]
    down, across = -(-height // window), -(-width // window)
    grid = x.reshape(batch, heads, height, width, -1)
    padded = pad_value.reshape(1, heads, 1, 1, -1).expand(batch, heads, down * window, across * window,
                                                           grid.shape[-1]).clone()
    padded[:, :, :height, :width] = grid
    return padded.reshape(batch, heads, down * window * across * window, -1)


def fused_qkv_on_windows(q, k, v, height, width, window, k_bias, v_bias):
    """q, k, v [B, n, H·W, d] → the same over the grid padded to whole windows as SamBlock pads it (the padding's
    keys and values the projection's biases k_bias, v_bias [n, d]; its queries zero), as strided views of one
    fused [B, H'·W', 3, n, d] projection, the layout SamAttention cuts them from."""
    heads, head_dim = q.shape[1], q.shape[-1]
    fused = torch.stack([padded_to_windows(q, height, width, window, q.new_zeros(heads, head_dim)),
                         padded_to_windows(k, height, width, window, k_bias),
                         padded_to_windows(v, height, width, window, v_bias)])  # [3, B, n, N', d]
    return fused.permute(1, 3, 0, 2, 4).contiguous().permute(2, 0, 3, 1, 4).unbind(0)


def windowed_relative_attention_reference(q, k, v, row_terms, col_terms, height, width, window, k_bias, v_bias,
                                          attend=relative_attention_reference):
    """The definition of attention within windows: the grid padded to whole windows with keys k_bias and values
    v_bias (SAM's zero tokens after its projection), cut into windows, each window's attention (`attend`, by
    default the definition above) with the terms of its queries, put back and cropped to the grid."""
    batch, heads, _, head_dim = q.shape
    down, across = -(-height // window), -(-width // window)

    def windows_of(x, pad_value):  # [B, n, H·W, C] → [B·windows, n, window², C]
        padded = padded_to_windows(x, height, width, window, pad_value)
        cut = padded.reshape(batch, heads, down, window, across, window, -1).permute(0, 2, 4, 1, 3, 5, 6)
        return cut.reshape(batch * down * across, heads, window * window, -1)

    zeros = q.new_zeros(heads, max(head_dim, window))
    out = attend(windows_of(q, zeros[:, :head_dim]), windows_of(k, k_bias), windows_of(v, v_bias),
                 windows_of(row_terms, zeros[:, :window]), windows_of(col_terms, zeros[:, :window]))
    # out: [B·windows, window², n, d]
    out = out.reshape(batch, down, across, window, window, heads, head_dim).permute(0, 1, 3, 2, 4, 5, 6)
    out = out.reshape(batch, down * window, across * window, heads, head_dim)[:, :height, :width]
    return out.reshape(batch, height * width, heads, head_dim)


@check
def check_relative_attention(device):
    """SAM's attention with the relative positions added in the kernel: square and oblong grids walked a row
    at a time (a width that is a power of two) and by rectangles of keys (the rest: a 14 × 14 window, a grid
    the rectangles cover exactly and ones they overhang, whose keys are masked; rectangles of 8 × 8 keys, whose
    terms are spread by a product, and of 4 × 16, summed by broadcasting), windows read in the grid
    (padded to whole windows by tokens whose keys and values are the biases, as SamBlock pads, only the grid's
    queries written; one window larger than the grid, one that fits it exactly; an unpadded grid refused),
    more queries than one block, q/k/v cut out of one fused projection (strided views), term tables wider
    than needed (their extra entries unread), head dims 16, 32 and 64; the terms from SAM's tables computed in
    the attention kernel, and computed first by `table_terms` (checked against their definition) and read."""
    (kernels,) = load_kernel_modules("triton_relative_attention")
    generator = torch.Generator().manual_seed(0)
    for dtype in float_types():
        for batch, heads, height, width, window, head_dim in (
                (2, 2, 5, 7, 0, 16), (1, 3, 12, 12, 0, 64), (1, 1, 16, 20, 0, 32), (1, 1, 16, 16, 0, 16),
                (2, 1, 14, 14, 0, 64), (1, 2, 16, 24, 0, 16),
                (2, 2, 5, 7, 3, 16), (1, 2, 16, 20, 7, 32), (1, 1, 12, 12, 14, 16), (1, 1, 14, 14, 14, 64)):
            tokens = height * width
            qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=generator).to(dtype)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, n, N, d] strided, as SamAttention cuts them
            across, down = window or width, window or height
            # tables padded to a multiple of 8 entries, as SamAttention computes them for the kernel
            row_table = torch.randn(batch, heads, tokens, down + (-down) % 8, generator=generator).to(dtype)
            col_table = torch.randn(batch, heads, tokens, across + (-across) % 8, generator=generator).to(dtype)
            row_terms, col_terms = row_table[..., :down], col_table[..., :across]
            k_bias, v_bias = (torch.randn(heads, head_dim, generator=generator).to(dtype) for _ in range(2))
            # The kernel's grid: windows need whole windows, the grid padded as SamBlock pads it (tokens whose keys
            # and values are the projection's biases; their queries and terms unread), only the grid written.
            grid_height, grid_width = (-(-height // window) * window, -(-width // window) * window) if window \
                else (height, width)

            def on_grid(terms):
                if not window:
                    return terms.to(device)
                zero = terms.new_zeros(heads, terms.shape[-1])
                return padded_to_windows(terms, height, width, window, zero).to(device)
            grid_q, grid_k, grid_v = (x.to(device) for x in (
                fused_qkv_on_windows(q, k, v, height, width, window, k_bias, v_bias) if window else (q, k, v)))
            written = (height, width) if window else None
            if window:
                expected = windowed_relative_attention_reference(q, k, v, row_terms, col_terms, height, width,
                                                                 window, k_bias, v_bias)
                if (grid_height, grid_width) != (height, width):
                    try:
                        kernels.relative_attention(q.to(device), k.to(device), v.to(device), row_table.to(device),
                                                   col_table.to(device), height, width, window=window)
                    except ValueError as refused:
                        assert "pad it first" in str(refused), refused
                    else:
                        raise AssertionError(f"a {height}x{width} grid in windows of {window} was not refused")
            else:
                expected = relative_attention_reference(q, k, v, row_terms, col_terms)
            got = kernels.relative_attention(grid_q, grid_k, grid_v, on_grid(row_table), on_grid(col_table),
                                             grid_height, grid_width, window=window, written=written)
            tiles = kernels.key_tiles(down, across, kernels.WINDOW_TILE_KEYS if window else kernels.TILE_KEYS)
            assert_close(got, expected, dtype,
                         f"relative_attention {height}x{width} window {window} by {tiles} d={head_dim} {dtype}")
            padding = torch.stack([k_bias, v_bias]).to(device)

            def same_unpadded(padded_result, what, **terms):
                """The windows over the grid as it is, the keys past it the padding's (SamBlock's other way):
                the same bits as over the grid padded first (the same tiles, their padded keys selected)."""
                if not window:
                    return
                unpadded = kernels.relative_attention(q.to(device), k.to(device), v.to(device), height=height,
                                                      width=width, window=window, padding=padding, **terms)
                assert torch.equal(unpadded, padded_result), f"{what} {height}x{width} window {window} {dtype}: " \
                    "the unpadded grid with its padding's keys differs from the grid padded first"
            same_unpadded(got, "terms read", row_terms=row_table.to(device), col_terms=col_table.to(device))
            # The terms computed in the kernel from SAM's tables: row_terms[i, r] = q_i · rel_h[row(i) − r + s − 1],
            # row(i) counted in the walked part (the grid, or the query's window), s its height (columns alike).
            # (scaled so that the terms are of the size of the ones above)
            rel_h = (torch.randn(2 * down - 1, head_dim, generator=generator) / head_dim ** 0.5).to(dtype)
            rel_w = (torch.randn(2 * across - 1, head_dim, generator=generator) / head_dim ** 0.5).to(dtype)
            token = torch.arange(tokens)
            walked_row, walked_col = token // width % down, token % width % across
            by_row = rel_h.float()[walked_row[:, None] - torch.arange(down)[None, :] + down - 1]  # [N, down, d]
            by_col = rel_w.float()[walked_col[:, None] - torch.arange(across)[None, :] + across - 1]
            row_terms = torch.einsum("bntd,tkd->bntk", q.float(), by_row)
            col_terms = torch.einsum("bntd,tkd->bntk", q.float(), by_col)
            if window:
                expected = windowed_relative_attention_reference(q, k, v, row_terms, col_terms, height, width,
                                                                 window, k_bias, v_bias)
            else:
                expected = relative_attention_reference(q, k, v, row_terms, col_terms)
            got = kernels.relative_attention(grid_q, grid_k, grid_v, None, None, grid_height, grid_width,
                                             window=window, tables=(rel_h.to(device), rel_w.to(device)),
                                             written=written)
            assert_close(got, expected, dtype, f"relative_attention from tables {height}x{width} window {window} "
                         f"by {tiles} d={head_dim} {dtype}")
            same_unpadded(got, "terms from tables", row_terms=None, col_terms=None,
                          tables=(rel_h.to(device), rel_w.to(device)))
            # the same terms computed first, a product for each line of the grid (`table_terms`), then read
            got_rows, got_cols = kernels.table_terms(q.to(device), rel_h.to(device), rel_w.to(device), height, width,
                                                     window)
            assert got_rows.shape[-1] % 8 == 0 and got_cols.shape[-1] % 8 == 0, "rows of the tables not padded to 8"
            assert_close(got_rows[..., :down], row_terms.to(dtype), dtype, f"table_terms rows {height}x{width} "
                         f"window {window} d={head_dim} {dtype}")
            assert_close(got_cols[..., :across], col_terms.to(dtype), dtype, f"table_terms columns {height}x{width} "
                         f"window {window} d={head_dim} {dtype}")
            got = kernels.relative_attention(grid_q, grid_k, grid_v, None, None, grid_height, grid_width,
                                             window=window, tables=(rel_h.to(device), rel_w.to(device)),
                                             terms_first=True, written=written)
            assert_close(got, expected, dtype, f"relative_attention, terms first from tables {height}x{width} "
                         f"window {window} by {tiles} d={head_dim} {dtype}")
            same_unpadded(got, "terms first from tables", row_terms=None, col_terms=None,
                          tables=(rel_h.to(device), rel_w.to(device)), terms_first=True)


@check
def check_sam_blocks_through_the_kernel(device):
    """SAM's blocks with their attention through the Triton kernel as `SamAttention` calls it (the tables resized
    for the grid or the window; the terms computed first by `table_terms`, or within windows in the kernel; the
    grid padded to whole windows before the projection, or the padding's keys and values made up in the kernel)
    against the same block on the materialised path (the dense bias, the original's order), float32: global
    blocks over grids walked by rows and by rectangles, windowed blocks whose windows overhang the grid and fit
    it, tables trained for another size (resampled)."""
    (deepencoder,) = load_kernel_modules("deepencoder")
    generator = torch.Generator().manual_seed(3)
    for grid, window, trained_for in ((16, 0, 16), (12, 0, 20), (16, 7, 7), (12, 6, 9)):
        block = deepencoder.SamBlock(64, 2, 2.0, window, trained_for)
        with torch.no_grad():
            for parameter in block.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        block = block.to(device)
        x = torch.randn(2, grid, grid, 64, generator=generator).to(device)
        block.attn.fold_relative_positions = False
        with torch.no_grad():
            expected = block(x)
        block.attn.fold_relative_positions, block.attn.relative_kernel = True, True
        assert block.attn.runs_the_kernel(x, window), f"grid {grid} window {window}: not through the kernel"
        for terms_inside, padding_inside in ((False, False), (True, False), (True, True)) if window \
                else ((False, False),):
            block.attn.terms_in_kernel, block.attn.padding_in_kernel = terms_inside, padding_inside
            with torch.no_grad():
                got = block(x)
            assert_close(got, expected, torch.float32, f"SamBlock grid {grid} window {window} "
                         f"terms {'inside' if terms_inside else 'first'} through the kernel, padding "
                         f"{'inside it' if padding_inside else 'before the projection'}")


# ---------------------------------------------------------------- running the checks


def make_interpreter_faithful():
    """Two fixes to Triton 3.6's interpreter, so that it computes what the GPU computes:

    - it turns its scalars (one-element arrays) into loop bounds with int(), which NumPy 2.4 refuses
      (triton-lang/triton#9171, fixed upstream by #9172, after 3.6.0), so a kernel's
      `range(first, last)` over loaded values fails: take the element explicitly;
    - it truncates float32 → bfloat16 where the GPU rounds to nearest even, which would put the
      kernels one unit in the last place away from PyTorch wherever they round: round as the GPU does.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "made_faithful_by_our_tests", False):
        return
    patch_tensor, convert_float = interpreter._patch_lang_tensor, interpreter._convert_float

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def round_float(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            floats = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
            return floats.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return convert_float(values, input_dtype, output_dtype, rounding_mode)

    interpreter._patch_lang_tensor, interpreter._convert_float = patch_lang_tensor, round_float
    interpreter.made_faithful_by_our_tests = True


def run_checks(device: str, names) -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":
        make_interpreter_faithful()
    torch.manual_seed(0)
    (triton_common,) = load_kernel_modules("triton_common")
    assert triton_common.available(), "Triton did not import"
    results = {}
    for name in names:
        try:
            started = time.perf_counter()
            CHECKS[name](device)
            results[name] = "ok"
            print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        except Exception:  # reported per check: one failure must not hide the others
            results[name] = traceback.format_exc(limit=4)
    return results


def interpreted_results():
    """Every check, once, in a child process where Triton's interpreter runs the kernels on the CPU."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__, "--json"], env=env, capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    for line in done.stdout.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS "):])
    raise AssertionError(f"the interpreted checks did not report (exit {done.returncode}):\n{done.stderr[-4000:]}")


@pytest.fixture(scope="module")
def interpreted():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (requirements-test.txt lists it)")
    return interpreted_results()


@pytest.mark.parametrize("name", list(CHECKS))
def test_kernel_matches_pytorch(interpreted, name):
    assert interpreted[name] == "ok", interpreted[name]


# The served shapes of SAM's attention kernels: (kernel, constexprs, pointer type, launch options)
HOPPER_BUILDS = (
    ("_relative_attention_kernel", dict(HEAD_DIM=64, BLOCK_M=64, TILE_ROWS=1, TILE_COLS=64, DOT_IN_FP32=False,
                                        PRECISION="tf32", COVERED=True), "*bf16", dict(num_warps=4, num_stages=3)),
    ("_relative_attention_kernel", dict(HEAD_DIM=64, BLOCK_M=64, TILE_ROWS=8, TILE_COLS=8, DOT_IN_FP32=False,
                                        PRECISION="tf32", COVERED=True, TERM_ENTRIES=16), "*bf16",
     dict(num_warps=4, num_stages=3)),
    ("_relative_attention_kernel", dict(HEAD_DIM=64, BLOCK_M=64, TILE_ROWS=4, TILE_COLS=16, DOT_IN_FP32=False,
                                        PRECISION="tf32", COVERED=True, TERM_ENTRIES=0), "*bf16",
     dict(num_warps=4, num_stages=3)),
    ("_window_attention_kernel", dict(HEAD_DIM=64, WINDOW=14, ENTRIES=32, BLOCK_M=64, TILE_ROWS=8, TILE_COLS=16,
                                      TABLES=True, PADDING=False, DOT_IN_FP32=False, PRECISION="tf32"), "*bf16",
     dict(num_warps=4, num_stages=1)),
    ("_window_attention_kernel", dict(HEAD_DIM=64, WINDOW=14, ENTRIES=32, BLOCK_M=64, TILE_ROWS=8, TILE_COLS=16,
                                      TABLES=True, PADDING=True, DOT_IN_FP32=False, PRECISION="tf32"), "*bf16",
     dict(num_warps=4, num_stages=1)),
    ("_window_attention_kernel", dict(HEAD_DIM=32, WINDOW=7, ENTRIES=16, BLOCK_M=64, TILE_ROWS=8, TILE_COLS=16,
                                      TABLES=False, PADDING=True, DOT_IN_FP32=False, PRECISION="ieee"), "*fp32",
     dict(num_warps=4, num_stages=1)),
)


def test_sam_attention_kernels_compile_for_hopper():
    """SAM's attention kernels compiled for the H200 (sm_90) here, without a GPU: Triton's interpreter, which runs
    the checks above on the CPU, accepts code the GPU compiler refuses (a window's rectangles counted with
    tl.cdiv, a tensor, where static_range needs a constant: h200-2026-12-01f call 3), so this catches it before a
    device run."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("kernels are the interpreter's in this process")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    (kernels,) = load_kernel_modules("triton_relative_attention")
    for name, constants, pointer, options in HOPPER_BUILDS:
        kernel = getattr(kernels, name)
        signature = {arg: "constexpr" if arg in constants else pointer if arg.endswith("_ptr")
                     else "fp32" if arg.endswith("_scale") else "i32" for arg in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(kernel.arg_names.index(arg),): value for arg, value in constants.items()})
        built = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert built.asm.get("cubin"), f"{name} {constants}: no sm_90 binary"


def test_prefill_attention_kernel_compiles_for_hopper():
    """The prefill's attention kernel compiled for the H200 (sm_90) at the model's shapes, without a GPU (see above)."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("kernels are the interpreter's in this process")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    (kernels,) = load_kernel_modules("triton_attention")
    kernel = kernels._prefill_attention_kernel
    constants = dict(BLOCK_M=kernels.PREFILL_BLOCK_M, BLOCK_N=kernels.PREFILL_BLOCK_N, BLOCK_D=128, DOT_IN_FP32=False,
                     PRECISION="tf32")
    types = dict(work_ptr="*i64", scale_log2="fp32")
    signature = {arg: "constexpr" if arg in constants else types.get(arg, "*bf16" if arg.endswith("_ptr") else "i32")
                 for arg in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(arg),): value for arg, value in constants.items()})
    built = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=kernels.PREFILL_WARPS, num_stages=kernels.PREFILL_STAGES))
    assert built.asm.get("cubin"), "_prefill_attention_kernel: no sm_90 binary"


def main():
    parser = argparse.ArgumentParser(description="Run the Triton kernel checks in this process.")
    parser.add_argument("--device", default="cpu", help="cpu (needs TRITON_INTERPRET=1) or cuda")
    parser.add_argument("--json", action="store_true", help="print one line of results as JSON")
    parser.add_argument("names", nargs="*", default=list(CHECKS), help="checks to run (default: all)")
    arguments = parser.parse_args()
    outcome = run_checks(arguments.device, arguments.names)
    if arguments.json:
        print("RESULTS " + json.dumps(outcome))
    else:
        for check_name, result in outcome.items():
            print(f"{check_name}: {result}")
    sys.exit(0 if all(result == "ok" for result in outcome.values()) else 1)


if __name__ == "__main__":
    main()
