"""The vision towers against their definitions, on tiny sizes in float32: SAM's windowed attention with
decomposed relative positions, CLIP's layers, the shapes of every view size, and quick GELU's rounding.

The references below are written plainly from the definitions (SAM ViT-B, CLIP-L as DeepEncoder wires
them) and read only the modules' parameters, whose names are the checkpoint's; the modules are compared
by their outputs, so any implementation of the same maths passes.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from checkpoints.deepencoder import (
    ClipAttention, ClipLayer, ClipMLP, ClipSettings, ClipVisionModel, LinearProjector, PatchEmbed, SamAttention,
    SamBlock, SamEncoder, SamSettings, cudnn_first, encode_views, merge_windows, partition_windows,
    relative_positions, relative_positions_in_windows, relative_terms, resized_relative_table,
)
from checkpoints.fused_ops import quick_gelu

# float32 on the CPU: the references differ from the modules only in the order of their sums.
EXACT = dict(rtol=1e-5, atol=1e-5)

TINY_SAM = SamSettings(width=32, layers=4, heads=2, global_attn_indexes=[1, 3], downsample_channels=[24, 48],
                       out_chans=16, window_size=3, patch_size=16, mlp_ratio=2.0, image_size=128)
TINY_CLIP = ClipSettings(width=48, layers=2, heads=4, image_size=224, patch_size=14)
TINY_PROJECTOR = {"projector_type": "linear", "input_dim": 48 + 48, "n_embed": 40}


def randomized(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Every parameter drawn at random (norm weights and biases, relative-position tables included), so
    that no term of the maths is hidden behind a zero or a one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module.eval()


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- references

def resampled_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """table [L, C] → [length, C] by linear interpolation with half-pixel centres, entry by entry: entry t
    sits at (t + ½)·L/length − ½ of the old table (clamped at its first entry)."""
    old = table.shape[0]
    if old == length:
        return table
    rows = []
    for t in range(length):
        x = max((t + 0.5) * old / length - 0.5, 0.0)
        low = min(int(math.floor(x)), old - 1)
        high = min(low + 1, old - 1)
        weight = x - low
        rows.append((1 - weight) * table[low] + weight * table[high])
    return torch.stack(rows)


def plain_relative_positions(size: int, table: torch.Tensor) -> torch.Tensor:
    """[size, size, C]: entry (i, j) is the embedding of the offset i − j, the table holding offsets
    −(size − 1) .. size − 1 (resampled to 2·size − 1 entries when it was trained for another size)."""
    table = resampled_table(table, 2 * size - 1)
    return torch.stack([torch.stack([table[i - j + size - 1] for j in range(size)]) for i in range(size)])


def plain_sam_attention(attn: SamAttention, x: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias_h + bias_w)·v over a [B, H, W, C] grid, then the output projection.
    For a query at (i, j) and a key at (i', j'): bias_h = q·Rh(i − i'), bias_w = q·Rw(j − j'), with the
    query unscaled."""
    batch, height, width, dim = x.shape
    head_dim = dim // heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(batch, height * width, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, HW, n, d]
    rows = torch.arange(height * width) // width
    cols = torch.arange(height * width) % width
    rel_h = plain_relative_positions(height, attn.rel_pos_h)[rows[:, None], rows[None, :]]  # [HW, HW, d]
    rel_w = plain_relative_positions(width, attn.rel_pos_w)[cols[:, None], cols[None, :]]  # [HW, HW, d]
    logits = torch.einsum("bpnd,brnd->bnpr", q, k) / math.sqrt(head_dim)
    bias = torch.einsum("bpnd,prd->bnpr", q, rel_h + rel_w)
    weights = torch.softmax(logits + bias, dim=-1)
    out = torch.einsum("bnpr,brnd->bpnd", weights, v).reshape(batch, height, width, dim)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def plain_sam_block(block: SamBlock, x: torch.Tensor, heads: int, window: int) -> torch.Tensor:
    """Pre-norm block: attention (within zero-padded windows of `window`², or global for 0), then the MLP."""
    batch, height, width, dim = x.shape
    normed = F.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias, 1e-6)
    if window:
        padded_h, padded_w = math.ceil(height / window) * window, math.ceil(width / window) * window
        padded = torch.zeros(batch, padded_h, padded_w, dim)
        padded[:, :height, :width] = normed
        attended = torch.zeros_like(padded)
        for top in range(0, padded_h, window):
            for left in range(0, padded_w, window):
                tile = padded[:, top:top + window, left:left + window]
                attended[:, top:top + window, left:left + window] = plain_sam_attention(block.attn, tile, heads)
        attended = attended[:, :height, :width]
    else:
        attended = plain_sam_attention(block.attn, normed, heads)
    x = x + attended
    hidden = F.layer_norm(x, (dim,), block.norm2.weight, block.norm2.bias, 1e-6)
    mlp = block.mlp
    return x + F.linear(F.gelu(F.linear(hidden, mlp.lin1.weight, mlp.lin1.bias)), mlp.lin2.weight, mlp.lin2.bias)


def plain_layer_norm_2d(x: torch.Tensor, norm) -> torch.Tensor:
    """LayerNorm over the channels of [B, C, H, W]."""
    mean = x.mean(1, keepdim=True)
    variance = ((x - mean) ** 2).mean(1, keepdim=True)
    return norm.weight[:, None, None] * (x - mean) / torch.sqrt(variance + 1e-6) + norm.bias[:, None, None]


def plain_sam_encoder(sam: SamEncoder, pixels: torch.Tensor, s: SamSettings) -> torch.Tensor:
    """At the size it was trained for: patches + positions, the blocks, the neck, two stride-2 convolutions."""
    x = F.conv2d(pixels, sam.patch_embed.proj.weight, sam.patch_embed.proj.bias, stride=s.patch_size)
    x = x.permute(0, 2, 3, 1) + sam.pos_embed
    for index, block in enumerate(sam.blocks):
        x = plain_sam_block(block, x, s.heads, 0 if index in s.global_attn_indexes else s.window_size)
    neck = sam.neck
    x = plain_layer_norm_2d(F.conv2d(x.permute(0, 3, 1, 2), neck[0].weight), neck[1])
    x = plain_layer_norm_2d(F.conv2d(x, neck[2].weight, padding=1), neck[3])
    x = F.conv2d(x, sam.net_2.weight, stride=2, padding=1)
    return F.conv2d(x, sam.net_3.weight, stride=2, padding=1)


def plain_clip_attention(attn: ClipAttention, x: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v per head, no mask, then the output projection; qkv_proj holds q, k, v in turn."""
    batch, length, dim = x.shape
    head_dim = dim // heads
    q, k, v = F.linear(x, attn.qkv_proj.weight, attn.qkv_proj.bias).split(dim, dim=-1)
    q, k, v = (t.reshape(batch, length, heads, head_dim) for t in (q, k, v))
    weights = torch.softmax(torch.einsum("bpnd,brnd->bnpr", q, k) / math.sqrt(head_dim), dim=-1)
    out = torch.einsum("bnpr,brnd->bpnd", weights, v).reshape(batch, length, dim)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def plain_clip_layer(layer: ClipLayer, x: torch.Tensor, heads: int) -> torch.Tensor:
    dim = x.shape[-1]
    x = x + plain_clip_attention(layer.self_attn, F.layer_norm(x, (dim,), layer.layer_norm1.weight,
                                                               layer.layer_norm1.bias, 1e-5), heads)
    hidden = F.layer_norm(x, (dim,), layer.layer_norm2.weight, layer.layer_norm2.bias, 1e-5)
    hidden = F.linear(hidden, layer.mlp.fc1.weight, layer.mlp.fc1.bias)
    hidden = hidden * torch.sigmoid(1.702 * hidden)
    return x + F.linear(hidden, layer.mlp.fc2.weight, layer.mlp.fc2.bias)


def plain_clip(clip: ClipVisionModel, sam_features: torch.Tensor, s: ClipSettings) -> torch.Tensor:
    """At the grid its position table was trained for: a class token, then SAM's features as the patch
    tokens, plus the positions; the pre-norm; the layers; no final norm."""
    batch = sam_features.shape[0]
    tokens = sam_features.flatten(2).transpose(1, 2)
    embeddings = clip.embeddings
    x = torch.cat([embeddings.class_embedding.expand(batch, 1, -1), tokens], dim=1)
    x = x + embeddings.position_embedding.weight[None]
    x = F.layer_norm(x, (s.width,), clip.pre_layrnorm.weight, clip.pre_layrnorm.bias, 1e-5)
    for layer in clip.transformer.layers:
        x = plain_clip_layer(layer, x, s.heads)
    return x


# ---------------------------------------------------------------------------------------------- windows

@pytest.mark.parametrize("height, width, size", [(7, 5, 3), (6, 6, 3), (4, 9, 4), (2, 2, 5)])
def test_windows_are_the_zero_padded_grid_cut_in_reading_order_and_merge_back(height, width, size):
    x = randn(2, height, width, 3, seed=height * 10 + width)
    windows, padded = partition_windows(x, size)
    padded_h, padded_w = math.ceil(height / size) * size, math.ceil(width / size) * size
    assert padded == (padded_h, padded_w)
    grid = torch.zeros(2, padded_h, padded_w, 3)
    grid[:, :height, :width] = x
    expected = [grid[b, top:top + size, left:left + size] for b in range(2)
                for top in range(0, padded_h, size) for left in range(0, padded_w, size)]
    assert torch.equal(windows, torch.stack(expected))
    assert torch.equal(merge_windows(windows, size, padded, (height, width)), x)


# ---------------------------------------------------------------------------------------------- relative positions

@pytest.mark.parametrize("size, trained_for", [(1, 1), (4, 4), (7, 7), (3, 5), (7, 5), (14, 4)])
def test_relative_positions_are_the_offset_embeddings(size, trained_for):
    table = randn(2 * trained_for - 1, 6, seed=size)
    expected = plain_relative_positions(size, table)
    assert relative_positions(size, size, table).shape == (size, size, 6)
    torch.testing.assert_close(relative_positions(size, size, table), expected, **EXACT)
    if size == trained_for:  # the table itself, read at i − j
        assert torch.equal(relative_positions(size, size, table)[size - 1, 0], table[2 * size - 2])
        assert torch.equal(relative_positions(size, size, table)[0, size - 1], table[0])


def test_a_grid_cut_into_windows_reads_each_place_in_its_window():
    table = randn(2 * 5 - 1, 3, seed=9)
    in_windows = relative_positions_in_windows(12, 5, table)  # windows of 5, 5 and 2 (padded) rows
    assert in_windows.shape == (12, 5, 3)
    for row in range(12):
        torch.testing.assert_close(in_windows[row], relative_positions(5, 5, table)[row % 5], **EXACT)


def test_a_resampled_table_keeps_its_ends_and_its_centre():
    # A check of the reference's resampling as much as of the module's: a table linear in the offset,
    # resampled from 9 entries to 13, still maps offset 0 to its middle and the extreme offsets to its ends.
    table = torch.linspace(-1.0, 1.0, 9)[:, None].repeat(1, 2)
    for resized in (relative_positions(7, 7, table), plain_relative_positions(7, table)):
        torch.testing.assert_close(resized[3, 3], torch.zeros(2), rtol=0, atol=1e-6)
        torch.testing.assert_close(resized[6, 0], table[8], rtol=0, atol=1e-6)
        torch.testing.assert_close(resized[0, 6], table[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- SAM attention

@pytest.mark.parametrize("folded", [True, False], ids=["bias folded into the kernel", "bias materialised"])
@pytest.mark.parametrize("side, trained_for", [(5, 5), (3, 5), (7, 5), (1, 5)])
def test_sam_attention_is_softmax_of_scaled_scores_plus_decomposed_relative_bias(side, trained_for, folded):
    heads, dim = 2, 16
    attn = randomized(SamAttention(dim, heads, trained_for), seed=side)
    attn.fold_relative_positions = folded
    x = randn(3, side, side, dim, seed=100 + side)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), plain_sam_attention(attn, x, heads), **EXACT)


def test_sam_attention_with_cudnn_first_computes_the_same_attention():
    # The backend order only picks a kernel: on the CPU (no cuDNN) the same output as PyTorch's own choice
    attn = randomized(SamAttention(16, 2, 5), seed=5)
    x = randn(2, 5, 5, 16, seed=6)
    with torch.no_grad():
        default = attn(x)
        attn.attention_backends = cudnn_first()
        torch.testing.assert_close(attn(x), default, **EXACT)
        torch.testing.assert_close(attn(x), plain_sam_attention(attn, x, 2), **EXACT)


@pytest.mark.parametrize("height, width", [(14, 14), (5, 7), (8, 16)])
def test_term_tables_padded_for_the_kernel_hold_the_same_terms_then_zeros(height, width):
    q = randn(2, 3, height * width, 16, seed=height)
    rel_h, rel_w = randn(height, height, 16, seed=1), randn(width, width, 16, seed=2)
    rows, cols = relative_terms(q, rel_h, rel_w, height, width)
    padded_rows, padded_cols = relative_terms(q, rel_h, rel_w, height, width, pad_to=8)
    assert padded_rows.shape[-1] == -(-height // 8) * 8 and padded_cols.shape[-1] == -(-width // 8) * 8
    torch.testing.assert_close(padded_rows[..., :height], rows, **EXACT)
    torch.testing.assert_close(padded_cols[..., :width], cols, **EXACT)
    assert not padded_rows[..., height:].any() and not padded_cols[..., width:].any()


@pytest.mark.parametrize("windows", [True, False])
def test_the_kernel_is_chosen_for_every_block_or_the_global_ones(windows):
    sam = SamEncoder(TINY_SAM)  # global blocks 1 and 3
    sam.use_relative_attention_kernel(True, windows=windows)
    assert [block.attn.relative_kernel for block in sam.blocks] == [windows, True, windows, True]
    sam.use_relative_attention_kernel(False)
    assert not any(block.attn.relative_kernel for block in sam.blocks)


def test_sam_attention_bias_depends_on_the_relative_position_tables():
    # Guard against a reference and a module that both ignore the tables: changing a table changes the output.
    attn = randomized(SamAttention(16, 2, 4), seed=7)
    x = randn(1, 4, 4, 16, seed=8)
    with torch.no_grad():
        before = attn(x)
        attn.rel_pos_w[0] += 1.0
        assert not torch.allclose(attn(x), before)


# ---------------------------------------------------------------------------------------------- SAM blocks

@pytest.mark.parametrize("side, window, trained_for", [
    (6, 3, 6),  # windows tile the grid exactly
    (8, 3, 8),  # the last row and column of windows are padded
    (5, 4, 5),  # one window and a padded remainder
    (6, 0, 6),  # global attention at the trained grid
    (4, 0, 6),  # global attention on a smaller grid: tables resampled
    (9, 0, 6),  # and on a larger one
])
@pytest.mark.parametrize("folded", [True, False], ids=["bias folded into the kernel", "bias materialised"])
def test_sam_block_matches_its_definition(side, window, trained_for, folded):
    heads, dim = 2, 16
    block = randomized(SamBlock(dim, heads, 2.0, window, trained_for), seed=side * 10 + window)
    block.attn.fold_relative_positions = folded
    x = randn(2, side, side, dim, seed=side + window)
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain_sam_block(block, x, heads, window), **EXACT)


def test_one_window_covering_the_grid_is_global_attention():
    windowed = randomized(SamBlock(16, 2, 2.0, 5, 5), seed=3)
    global_block = SamBlock(16, 2, 2.0, 0, 5)
    global_block.load_state_dict(windowed.state_dict())
    x = randn(2, 5, 5, 16, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(windowed(x), global_block(x), **EXACT)


def test_a_windowed_block_sees_only_its_window_and_a_global_block_sees_everything():
    x = randn(1, 6, 6, 16, seed=8)
    changed = x.clone()
    changed[:, 4, 5] += randn(16, seed=9)  # a token of the bottom-right 3×3 window
    other_windows = torch.ones(6, 6, dtype=torch.bool)
    other_windows[3:, 3:] = False
    windowed = randomized(SamBlock(16, 2, 2.0, 3, 6), seed=5)
    global_block = randomized(SamBlock(16, 2, 2.0, 0, 6), seed=6)
    with torch.no_grad():
        for block in (windowed, global_block):
            before, after = block(x), block(changed)
            change_in_window = (before - after)[:, 3:, 3:].abs().amax(-1).flatten()
            assert (change_in_window > 1e-4).all()  # the token itself and the 8 that attend to it
        before, after = windowed(x), windowed(changed)
        torch.testing.assert_close(before[:, other_windows], after[:, other_windows], rtol=0, atol=1e-6)
        before, after = global_block(x), global_block(changed)
        assert ((before - after)[:, other_windows].abs().amax(-1) > 1e-4).all()


# ---------------------------------------------------------------------------------------------- SAM encoder

def test_sam_encoder_matches_its_definition_at_its_trained_size():
    sam = randomized(SamEncoder(TINY_SAM), seed=11, scale=0.1)
    pixels = randn(2, 3, TINY_SAM.image_size, TINY_SAM.image_size, seed=12)
    with torch.no_grad():
        torch.testing.assert_close(sam(pixels), plain_sam_encoder(sam, pixels, TINY_SAM), **EXACT)


@pytest.mark.parametrize("view", [64, 128, 192, 256])
def test_sam_encoder_shapes_and_views_independent_of_their_batch(view):
    sam = randomized(SamEncoder(TINY_SAM), seed=13, scale=0.1)
    pixels = randn(3, 3, view, view, seed=view)
    with torch.no_grad():
        features = sam(pixels)
        assert features.shape == (3, TINY_SAM.downsample_channels[-1], view // 64, view // 64)
        assert torch.isfinite(features).all()
        torch.testing.assert_close(features[1:2], sam(pixels[1:2]), **EXACT)


# ---------------------------------------------------------------------------------------------- CLIP

@pytest.mark.parametrize("length", [1, 5, 17])
def test_clip_attention_is_plain_multi_head_attention(length):
    attn = randomized(ClipAttention(32, 4), seed=length)
    x = randn(2, length, 32, seed=length + 1)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), plain_clip_attention(attn, x, 4), **EXACT)


def test_clip_layer_is_pre_norm_attention_then_quick_gelu_mlp():
    layer = randomized(ClipLayer(32, 4, 80), seed=21)
    x = randn(2, 10, 32, seed=22)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain_clip_layer(layer, x, 4), **EXACT)


def test_clip_reads_sam_features_as_its_patch_tokens():
    clip = randomized(ClipVisionModel(TINY_CLIP), seed=23)
    side = TINY_CLIP.image_size // TINY_CLIP.patch_size  # the grid of its position table
    sam_features = randn(2, TINY_CLIP.width, side, side, seed=24)
    with torch.no_grad():
        torch.testing.assert_close(clip(sam_features), plain_clip(clip, sam_features, TINY_CLIP), **EXACT)


# ---------------------------------------------------------------------------------------------- both towers

@pytest.mark.parametrize("view", [64, 128, 256])
def test_encode_views_projects_clip_and_sam_features_per_position(view):
    sam = randomized(SamEncoder(TINY_SAM), seed=31, scale=0.1)
    clip = randomized(ClipVisionModel(TINY_CLIP), seed=32, scale=0.1)
    projector = randomized(LinearProjector(TINY_PROJECTOR), seed=33)
    pixels = randn(2, 3, view, view, seed=34)
    with torch.no_grad():
        features = encode_views(sam, clip, projector, pixels)
        assert features.shape == (2, (view // 64) ** 2, TINY_PROJECTOR["n_embed"])
        sam_features = sam(pixels)
        clip_tokens = clip(sam_features)
        assert clip_tokens.shape == (2, 1 + (view // 64) ** 2, TINY_CLIP.width)
        joint = torch.cat([clip_tokens[:, 1:], sam_features.flatten(2).transpose(1, 2)], dim=-1)
        torch.testing.assert_close(features, F.linear(joint, projector.layers.weight, projector.layers.bias),
                                   **EXACT)


# ---------------------------------------------------------------------------------------------- quick GELU

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


@pytest.mark.parametrize("setting, folded", [("folded", True), ("materialised", False)])
def test_the_config_chooses_how_sam_applies_its_relative_positions(tiny_checkpoint, setting, folded):
    from checkpoints import DeepseekOCRForCausalLM

    model = DeepseekOCRForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32,
                                                   sam_relative_positions=setting)
    assert {block.attn.fold_relative_positions for block in model.model.sam_model.blocks} == {folded}
    assert model.model.sam_model.patch_embed.as_matmul is folded  # the fast path's patch embedding too


@pytest.mark.parametrize("as_matmul", [True, False], ids=["matrix product", "convolution"])
def test_the_patch_embedding_is_the_stride_16_convolution_either_way(as_matmul):
    torch.manual_seed(5)
    embed = PatchEmbed(16, 24)
    embed.as_matmul = as_matmul
    pixels = torch.randn(2, 3, 64, 48)
    expected = F.conv2d(pixels, embed.proj.weight, embed.proj.bias, stride=16).permute(0, 2, 3, 1)
    out = embed(pixels)
    assert out.shape == (2, 4, 3, 24)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_an_unknown_relative_position_mode_is_refused():
    from checkpoints import DeepseekOCRConfig

    with pytest.raises(ValueError, match="sam_relative_positions"):
        DeepseekOCRConfig(sam_relative_positions="dense")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# a grid walked a key row of 16 at a time, one walked by rectangles that cover it exactly (40 × 40 as a 640 tile's,
# by 8 × 8) and one they overhang (14 × 14, a window, by 4 × 16: masked keys)
@pytest.mark.parametrize("grid", [16, 40, 14])
def test_attention_through_the_kernel_is_as_close_to_float32_as_the_folded_path(grid):
    """bf16 through the Triton kernel against the dense-bias order in float32, no further from it than the
    folded path (both round the terms to bf16; the kernel scales q·k after the product, the folded path before)."""
    from checkpoints.deepencoder import SamAttention

    torch.manual_seed(0)
    attention = SamAttention(128, 2, grid, global_attention=True).cuda()
    with torch.no_grad():
        attention.rel_pos_h.normal_(0, 0.5)
        attention.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(3, grid, grid, 128, device="cuda")
    with torch.inference_mode():
        attention.fold_relative_positions = False
        reference = attention(x)  # float32, the dense bias
        attention.fold_relative_positions = True
        attention.to(torch.bfloat16)
        attention.relative_kernel = True
        through_kernel = attention(x.bfloat16()).float()
        attention.relative_kernel = False
        folded = attention(x.bfloat16()).float()

    def error(out):
        return float((out - reference).norm() / reference.norm())

    assert error(through_kernel) <= 1.5 * error(folded) + 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# windows that pad the grid (16 by 7; a 640 tile's 40 by 14) and one that fits it exactly
@pytest.mark.parametrize("grid, window", [(16, 7), (40, 14), (14, 14)])
def test_a_windowed_block_through_the_kernel_is_as_close_to_float32_as_the_folded_path(grid, window):
    """The kernel reads the windows in the grid, padded with the projection's biases: the block in bf16 against
    itself in float32 with the windows cut out and a dense bias, no further from it than the folded path."""
    torch.manual_seed(0)
    block = SamBlock(128, 2, 4.0, window, grid).cuda()
    with torch.no_grad():
        block.attn.rel_pos_h.normal_(0, 0.5)
        block.attn.rel_pos_w.normal_(0, 0.5)
        block.attn.qkv.bias.normal_(0, 1.0)  # padded keys and values differ from zero
    x = torch.randn(2, grid, grid, 128, device="cuda")
    with torch.inference_mode():
        block.attn.fold_relative_positions = False
        reference = block(x)  # float32, windows cut out, the dense bias
        block.attn.fold_relative_positions = True
        block.to(torch.bfloat16)
        block.attn.relative_kernel = True
        assert block.attn.runs_the_kernel(x)
        through_kernel = block(x.bfloat16()).float()
        block.attn.terms_in_kernel = True  # the windows' terms computed in the kernel, from the tables
        terms_inside = block(x.bfloat16()).float()
        block.attn.relative_kernel = False
        folded = block(x.bfloat16()).float()

    def error(out):  # on what the block adds to x (the residual would hide the attention's error)
        return float((out - reference).norm() / (reference - x).norm())

    assert error(through_kernel) <= 1.5 * error(folded) + 1e-3
    assert error(terms_inside) <= 1.5 * error(folded) + 1e-3


@pytest.mark.parametrize("size", [14, 40, 64])
def test_a_resized_table_holds_the_relative_positions_by_offset(size):
    """The kernel's terms from the tables use entry row − r + size − 1 of the resized table: what
    `relative_positions` looks up for rows (and columns) of a size × size grid."""
    table = torch.randn(2 * 64 - 1, 8)  # a 1024 view's (SAM's native) table
    resized = resized_relative_table(size, table)
    assert resized.shape == (2 * size - 1, 8)
    offsets = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
    torch.testing.assert_close(resized[offsets], relative_positions(size, size, table), **EXACT)
    assert resized_relative_table(64, table) is table


def test_the_terms_in_the_kernel_are_chosen_with_the_kernel():
    sam = SamEncoder(TINY_SAM)
    sam.use_relative_attention_kernel(True, terms_in_kernel=True)
    assert all(block.attn.terms_in_kernel for block in sam.blocks)
    sam.use_relative_attention_kernel(True)
    assert not any(block.attn.terms_in_kernel for block in sam.blocks)


def test_attention_within_windows_of_the_grid_needs_the_kernel():
    attention = SamAttention(16, 2, 5)
    with pytest.raises(ValueError, match="only through the Triton kernel"):
        attention(torch.zeros(1, 7, 7, 16), window=5)


@pytest.mark.parametrize("any_grid", [True, False])
def test_the_kernel_takes_every_grid_or_those_it_walks_by_whole_rows(monkeypatch, any_grid):
    import checkpoints.deepencoder as deepencoder

    monkeypatch.setattr(deepencoder, "relative_attention_kernel_applies", lambda device, head_dim: True)
    attention = SamAttention(32, 2, 14)
    attention.relative_kernel, attention.kernel_for_any_grid = True, any_grid
    assert attention.runs_the_kernel(torch.zeros(1, 64, 64, 32))  # a 1024 view's rows of 64 keys
    assert attention.runs_the_kernel(torch.zeros(1, 32, 32, 32))  # a 512 view's
    assert attention.runs_the_kernel(torch.zeros(1, 40, 40, 32)) is any_grid  # a 640 tile's rows of 40
    assert attention.runs_the_kernel(torch.zeros(1, 64, 64, 32), window=14) is any_grid  # windows of 14
    attention.relative_kernel = False
    assert not attention.runs_the_kernel(torch.zeros(1, 64, 64, 32))


@pytest.mark.parametrize("way", ["exact", "kernel", "epilogue"])
def test_sam_mlp_off_cuda_applies_the_exact_gelu_whatever_the_way(way):
    from checkpoints.deepencoder import MLPBlock

    torch.manual_seed(0)
    mlp = MLPBlock(32, 128)
    mlp.gelu_way = way  # the kernel and the epilogue serve CUDA tensors alone
    x = torch.randn(2, 5, 7, 32)
    assert torch.equal(mlp(x), mlp.lin2(F.gelu(mlp.lin1(x))))


def test_an_unknown_gelu_way_is_refused():
    from checkpoints.deepencoder import SamEncoder

    with pytest.raises(ValueError, match="exact, kernel or epilogue"):
        SamEncoder.use_gelu(SimpleNamespace(blocks=[]), "tanh")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gelu_in_the_products_epilogue_is_as_close_to_float32_as_gelu_after_it():
    """Under bf16 autocast, as the towers run: the MLP with cuBLASLt's epilogue (GELU's tanh form on the float32
    sum, one rounding) no further from the float32 MLP with exact GELU than with F.gelu on the product rounded to
    bf16 (the original's way), at a trained layer's spread of the hidden layer (std ~1.5)."""
    from checkpoints.deepencoder import MLPBlock

    torch.manual_seed(0)
    reference = MLPBlock(768, 3072).cuda()
    with torch.no_grad():
        reference.lin1.weight.normal_(0, 1.5 / 768 ** 0.5)
    x = torch.randn(4, 16, 16, 768, device="cuda")
    served = MLPBlock(768, 3072).cuda()
    served.load_state_dict(reference.state_dict())
    served.to(torch.bfloat16)
    distances = {}
    with torch.no_grad():
        expected = reference(x)  # float32, exact GELU
        for way in ("exact", "epilogue"):
            served.gelu_way = way
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = served(x)
            assert out.dtype == torch.bfloat16 and out.shape == x.shape
            distances[way] = float((out.float() - expected).abs().mean())
    assert distances["epilogue"] <= distances["exact"], distances
