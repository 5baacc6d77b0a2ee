"""DeepEncoder: the vision side of DeepSeek-OCR.

An image goes through a SAM ViT-B (16-pixel patches, windowed attention with decomposed relative
positions, global attention in a few blocks), a neck and two stride-2 convolutions, so a 1024-pixel
view becomes a 16×16 grid of 1024-channel features. CLIP-L then reads that grid in place of its own
patch embedding. Per position, CLIP's output (without its class token) and SAM's features are
concatenated and a linear projector maps them into the decoder's embedding space.

Every size comes from the checkpoint's `vision_config` / `projector_config`, so a small config
builds a small tower with the same tensor names.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .fused_ops import quick_gelu
from .triton_common import available as triton_available
from .triton_common import interpreted as triton_interpreted
from .triton_ops import gelu as gelu_kernel
from .triton_relative_attention import relative_attention


@dataclass
class SamSettings:
    width: int = 768
    layers: int = 12
    heads: int = 12
    global_attn_indexes: list = field(default_factory=lambda: [2, 5, 8, 11])
    downsample_channels: list = field(default_factory=lambda: [512, 1024])
    out_chans: int = 256
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0
    image_size: int = 1024


@dataclass
class ClipSettings:
    width: int = 1024
    layers: int = 24
    heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    ffn_hidden_size: Optional[int] = None


def vision_settings(vision_config: dict) -> tuple[SamSettings, ClipSettings]:
    """Read the tower sizes from a checkpoint's `vision_config` (unknown keys are ignored)."""
    widths = (vision_config or {}).get("width", {})
    sam_cfg = dict(widths.get("sam_vit_b", {}))
    clip_cfg = dict(widths.get("clip-l-14-224", {}))
    sam_keys, clip_keys = SamSettings.__dataclass_fields__, ClipSettings.__dataclass_fields__
    sam = SamSettings(**{k: v for k, v in sam_cfg.items() if k in sam_keys})
    if "image_size" in (vision_config or {}):
        sam.image_size = vision_config["image_size"]
    clip = ClipSettings(**{k: v for k, v in clip_cfg.items() if k in clip_keys})
    if sam.downsample_channels[-1] != clip.width:
        raise ValueError("SAM's last downsample width must equal CLIP's width: CLIP reads SAM's features")
    return sam, clip


def resize_grid_embedding(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic (antialiased) resize of a [1, C, S, S] position grid, in float32."""
    if grid.shape[-1] == size:
        return grid
    resized = F.interpolate(grid.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.to(grid.dtype)


# ---------------------------------------------------------------- SAM ViT-B


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a [B, C, H, W] map."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        # True: the same product as one matrix multiplication over the cut-out patches. A convolution whose
        # stride is its kernel is exactly that, and on the GPU cuDNN runs it through a generic kernel far
        # below the matrix rate (about 7% of a compiled vision pass). Set by `SamEncoder.use_relative_positions`.
        self.as_matmul = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.as_matmul:
            return self.proj(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        batch, channels, height, width = x.shape
        p = self.proj.kernel_size[0]
        patches = x.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        # each patch's values in (channel, row, column) order, the order of the kernel's weights
        patches = patches.reshape(batch, height // p, width // p, channels * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        # How the GELU runs on CUDA tensors (`SamEncoder.use_gelu`; elsewhere always "exact"):
        # "exact": F.gelu after the product, as the original (its erf made the hidden layer's pass
        #   arithmetic-bound, Inductor's too);
        # "kernel": F.gelu's erf through the Triton kernel (`triton_ops.gelu`: erf in a few instructions, to 1.5e-7);
        # "epilogue": inside the first product, in cuBLASLt's epilogue (its tanh form of GELU, applied to the float32
        #   sum before the one rounding to bf16): the hidden layer is never written and read back before its GELU.
        self.gelu_way = "exact"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu_way == "epilogue" and x.is_cuda:
            # (not under autocast's casts: the operands in the weights' dtype, as autocast hands them to lin1)
            weight = self.lin1.weight
            rows = x.reshape(-1, x.shape[-1]).to(weight.dtype)
            hidden = torch._addmm_activation(self.lin1.bias.to(weight.dtype), rows, weight.t(),
                                             use_gelu=True).view(*x.shape[:-1], weight.shape[0])
        elif self.gelu_way == "kernel" and x.is_cuda:
            hidden = gelu_kernel(self.lin1(x))
        else:
            hidden = F.gelu(self.lin1(x))
        return self.lin2(hidden)


def relative_positions(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings [q_size, k_size, C] looked up in `table` [L, C].

    The table is sized for the resolution the block was trained at; for another grid it is
    linearly resampled to 2·max(q, k) − 1 entries first.
    """
    table = resized_relative_table(max(q_size, k_size), table)
    q_coords = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[offsets.long()]


def resized_relative_table(size: int, table: torch.Tensor) -> torch.Tensor:
    """`table` [L, C] for a grid (or window) side of `size`: as it is if it has 2·size − 1 entries, else
    linearly resampled to that many (`relative_positions`' first step)."""
    length = 2 * size - 1
    if table.shape[0] == length:
        return table
    return F.interpolate(table.float().t()[None], size=length, mode="linear")[0].t().to(table.dtype)


def relative_positions_in_windows(side: int, window: int, table: torch.Tensor) -> torch.Tensor:
    """[side, window, C]: for each row (or column) of a side-long grid cut into windows from its start, the
    relative-position embeddings of its place in its window against the window's rows (`relative_positions`
    of the window)."""
    place = torch.arange(side, device=table.device) % window
    return relative_positions(window, window, table)[place]


def relative_terms(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, height: int, width: int,
                   pad_to: int = 1) -> tuple:
    """SAM's decomposed relative positions as two small tables, from the unscaled queries q [B, n, HW, d]:
    row_terms [B, n, HW, H] (query · rel_h[its row, key row]) and col_terms [B, n, HW, W] (query ·
    rel_w[its column, key column]); the bias of query i and key (r, c) is row_terms[i, r] + col_terms[i, c].
    rel_h [H, K, d] and rel_w [W, K', d] may hold another number of key rows and columns K, K' (those of the
    windows over a grid: `relative_positions_in_windows`); the tables are then [B, n, HW, K] and [B, n, HW, K'].
    The folded path's terms; the Triton kernel's come from `triton_relative_attention.table_terms`, which reads q
    in place (these einsums copy q in and the terms out), and these are its definition and its benchmarks' baseline.

    `pad_to`: each table's last dimension rounded up to a multiple of it, the extra entries zero (for handing them
    to the Triton kernel, which reads only the first H and W): a window's 14 entries of two bytes leave every row
    unaligned, and the products that compute them ran in a slow kernel made for unaligned matrices."""
    batch, heads, tokens, head_dim = q.shape
    q_grid = q.reshape(batch, heads, height, width, head_dim)
    if rel_h.shape[1] % pad_to:
        rel_h = F.pad(rel_h, (0, 0, 0, -rel_h.shape[1] % pad_to))
    if rel_w.shape[1] % pad_to:
        rel_w = F.pad(rel_w, (0, 0, 0, -rel_w.shape[1] % pad_to))
    row_terms = torch.einsum("bnhwc,hkc->bnhwk", q_grid, rel_h).reshape(batch, heads, tokens, rel_h.shape[1])
    col_terms = torch.einsum("bnhwc,wkc->bnhwk", q_grid, rel_w).reshape(batch, heads, tokens, rel_w.shape[1])
    return row_terms, col_terms


def relative_attention_kernel_applies(device: torch.device, head_dim: int) -> bool:
    """Whether `relative_attention` (Triton) runs: on a GPU (or on the CPU under Triton's interpreter, as the
    tests run it), with Triton, for a head dim that is a power of two from 16 (the tensor-core tile). Any grid:
    the kernel walks its keys by rectangles that fit it."""
    return ((device.type == "cuda" or triton_interpreted()) and triton_available() and head_dim >= 16
            and head_dim & (head_dim - 1) == 0)


def folded_relative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_terms: torch.Tensor,
                              col_terms: torch.Tensor, height: int, width: int,
                              backends: Optional[list] = None) -> torch.Tensor:
    """softmax(q·kᵀ/√d + bias)·v over a height × width grid, with SAM's decomposed relative positions
    bias[(i, j), (r, c)] = q_ij·rel_h[i, r] + q_ij·rel_w[j, c] (`row_terms`, `col_terms`: `relative_terms`),
    without the [HW, HW] bias in memory.

    The bias is folded into the dot product that attention computes anyway: each query is extended by
    its H row terms and W column terms, each key by a one-hot of its row and of its column, so that
    q'·k' = (q/√d)·k + bias. One fused attention kernel (flash/cuDNN under SDPA) then adds the bias
    while it computes the scores; the materialised bias was (side/16)⁴ values per head and view, and
    most of the vision encoder's time went into writing and reading it. The extended width is padded
    to a multiple of 8, and v to the same width, as the fused kernels require.

    `backends`: SDPA's backends in the order to try them (`torch.nn.attention.sdpa_kernel`), None for
    PyTorch's own choice.

    q, k, v [B, n, HW, d]; row_terms [B, n, HW, H], col_terms [B, n, HW, W] → [B, n, HW, d].
    """
    q_ext, k_ext, v_ext = widened_qkv(q, k, v, row_terms, col_terms, height, width)
    head_dim = q.shape[-1]
    if backends is None:
        return F.scaled_dot_product_attention(q_ext, k_ext, v_ext, scale=1.0)[..., :head_dim]
    with sdpa_kernel(backends, set_priority=True):
        return F.scaled_dot_product_attention(q_ext, k_ext, v_ext, scale=1.0)[..., :head_dim]


def widened_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_terms: torch.Tensor, col_terms: torch.Tensor,
                height: int, width: int) -> tuple:
    """The folded path's extended q (scaled by 1/√d, then its row and column terms), k (then one-hots of its
    row and column) and v (zero-padded), all [B, n, HW, d + H + W rounded up to a multiple of 8]."""
    batch, heads, tokens, head_dim = q.shape
    extended = head_dim + height + width
    padding = (-extended) % 8
    row_of_key = torch.arange(tokens, device=q.device) // width
    col_of_key = torch.arange(tokens, device=q.device) % width
    key_rows = F.one_hot(row_of_key, height).to(k.dtype).expand(batch, heads, tokens, height)
    key_cols = F.one_hot(col_of_key, width).to(k.dtype).expand(batch, heads, tokens, width)
    scale = head_dim ** -0.5
    parts_q = [q * scale, row_terms.to(q.dtype), col_terms.to(q.dtype)]
    parts_k = [k, key_rows, key_cols]
    if padding:
        parts_q.append(q.new_zeros(batch, heads, tokens, padding))
        parts_k.append(k.new_zeros(batch, heads, tokens, padding))
    return torch.cat(parts_q, dim=-1), torch.cat(parts_k, dim=-1), F.pad(v, (0, extended + padding - head_dim))


def cudnn_first() -> list:
    """SDPA's backends with cuDNN's attention tried first, then PyTorch's usual order. For the folded
    attention's widened head dimension (192 for a 1024 view's global blocks, 96 for windows) cuDNN's kernels
    on the H200 took 3.3 ms where flash attention took 7.6 for one pass's global attention over 16 views
    (`bench_vision.py --steps attention-options`). cuDNN builds an execution plan for every new shape (a
    stall of up to seconds), which is why only the towers use it, whose shapes are fixed by the CUDA graphs
    the engine captures at load (`SamEncoder.use_cudnn_attention`)."""
    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


RELATIVE_POSITION_MODES = ("folded", "materialised")


def check_relative_position_mode(mode: str) -> None:
    if mode not in RELATIVE_POSITION_MODES:
        raise ValueError(f"sam_relative_positions must be 'folded' or 'materialised', not {mode!r}")


class SamAttention(nn.Module):
    def __init__(self, dim: int, heads: int, grid: int, global_attention: bool = False):
        super().__init__()
        self.heads = heads
        # Global blocks attend over the whole grid (64 × 64 tokens for a 1024 view), windowed ones over each
        # 14 × 14 window. With `relative_kernel` set (`SamEncoder.use_relative_attention_kernel`) and folded
        # relative positions on a GPU, the attention runs in the Triton kernel that adds the terms in place
        # (`relative_attention`: a third of the folded path's work in a 1024 view's global blocks, and no
        # widened q, k and v written); otherwise the folded path. README "Faithfulness".
        self.global_attention = global_attention
        self.relative_kernel = False
        # With `relative_kernel`: every grid through the kernel (its windows read in the grid), or only grids
        # it walks a whole row at a time (a width that is a power of two from 16: a 1024 or 512 view's global
        # blocks), the rest through the folded path. Set by `SamEncoder.use_relative_attention_kernel`.
        self.kernel_for_any_grid = True
        # With `relative_kernel`, within windows: the kernel computes the terms itself from the two tables
        # (`terms_in_kernel`), in float32 and never written, or reads them computed first (`table_terms`: a small
        # product per line of the grid). A grid's global attention always reads them: there the kernel's look-ups
        # in its loop over the keys cost more than the products saved (H200: 5.5 ms against 2.7 + 0.5 for one
        # pass's 1024 views, 14.9 against 3.5 + 0.9 for its 640 tiles, h200-2026-12-01).
        self.terms_in_kernel = False
        # With `relative_kernel`, within windows: the grid left as it is, the kernel taking the keys and values
        # of the padding past it from the qkv projection's bias (`padding_in_kernel`, read by SamBlock), or the
        # grid padded to whole windows before the projection.
        self.padding_in_kernel = False
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
        # True: the relative positions are folded into the attention kernel (`folded_relative_attention`);
        # False: a dense bias is built and passed as SDPA's mask, the original's order of operations
        # (bit-identical to it under bf16 autocast). Set by the model from its config (`sam_attention`).
        self.fold_relative_positions = True
        # SDPA backends for the folded attention (`cudnn_first()`), None for PyTorch's choice. Set by
        # `SamEncoder.use_cudnn_attention`.
        self.attention_backends = None

    def runs_the_kernel(self, x: torch.Tensor, window: int = 0) -> bool:
        """Whether x's attention (within windows of `window`, if given) goes through the Triton kernel."""
        walked_width = window or x.shape[2]
        by_rows = walked_width >= 16 and walked_width & (walked_width - 1) == 0
        return (self.fold_relative_positions and self.relative_kernel and (self.kernel_for_any_grid or by_rows)
                and relative_attention_kernel_applies(x.device, self.rel_pos_h.shape[-1]))

    def forward(self, x: torch.Tensor, window: int = 0, written: tuple = None) -> torch.Tensor:
        """x [B, H, W, C] → [B, H, W, C]: attention over the grid, or with `window` within each window × window
        window of it, x then whole windows (SamBlock pads it with zero tokens; only through the kernel,
        `runs_the_kernel`: otherwise SamBlock cuts the windows out and calls this on each); `written` (h, w): the
        output is the top-left h × w part of the grid, [B, h, w, C] (the padding's outputs neither computed nor
        written). Within windows through the kernel, a grid that is not whole windows (SamBlock left the padding
        to the kernel, `padding_in_kernel`) overhangs them: the keys and values past it are the padding's, the
        projection's bias (SAM pads the norm's output with zero tokens)."""
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, HW, d]
        through_kernel = self.runs_the_kernel(x, window)
        if window and not through_kernel:
            raise ValueError("attention within windows of the grid runs only through the Triton kernel")
        if through_kernel:
            # the tables of the walked part (the grid, or a window: a token's terms are those of its place in it)
            tables = (resized_relative_table(window or height, self.rel_pos_h),
                      resized_relative_table(window or width, self.rel_pos_w))
            padding = None
            if window and (height % window or width % window):
                bias = self.qkv.bias if self.qkv.bias is not None else q.new_zeros(3 * q.shape[1] * q.shape[-1])
                padding = bias.view(3, self.heads, -1)[1:].to(q.dtype)  # [2, heads, d]: the keys', the values'
            out = relative_attention(q, k, v, None, None, height, width, window=window, tables=tables,
                                     terms_first=not (window and self.terms_in_kernel), written=written,
                                     padding=padding)
            return self.proj(out.reshape(batch, *(written or (height, width)), -1))  # out [B, hw, heads, d]
        rel_h = relative_positions(height, height, self.rel_pos_h)  # [H, H, d]
        rel_w = relative_positions(width, width, self.rel_pos_w)  # [W, W, d]
        if self.fold_relative_positions:
            row_terms, col_terms = relative_terms(q, rel_h, rel_w, height, width)
            out = folded_relative_attention(q, k, v, row_terms, col_terms, height, width, self.attention_backends)
        else:
            # Decomposed relative positions: a bias of (row term + column term) from the unscaled query.
            q_grid = q.reshape(batch, self.heads, height, width, -1)
            bias_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, rel_h)  # [B, n, H, W, H]
            bias_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, rel_w)  # [B, n, H, W, W]
            bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(batch, self.heads, height * width, -1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.view(batch, self.heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        return self.proj(out)


def pad_to_windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, H, W, C] → [B, H', W', C], zero tokens at the bottom and right up to multiples of `size` (SAM's padding
    before its windows)."""
    height, width = x.shape[1:3]
    pad_h, pad_w = (-height) % size, (-width) % size
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def partition_windows(x: torch.Tensor, size: int):
    """[B, H, W, C] → [B·nH·nW, size, size, C], zero-padding H and W up to multiples of `size`."""
    batch, _, _, channels = x.shape
    x = pad_to_windows(x, size)
    hp, wp = x.shape[1:3]
    x = x.view(batch, hp // size, size, wp // size, size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, size, size, channels), (hp, wp)


def merge_windows(windows: torch.Tensor, size: int, padded: tuple, original: tuple) -> torch.Tensor:
    hp, wp = padded
    height, width = original
    batch = windows.shape[0] // ((hp // size) * (wp // size))
    x = windows.view(batch, hp // size, wp // size, size, size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, -1)
    return x[:, :height, :width, :]


class SamBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, window_size: int, grid: int):
        super().__init__()
        self.window_size = window_size  # 0 = global attention
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SamAttention(dim, heads, window_size or grid, global_attention=window_size == 0)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        # The norm's output feeds the qkv projection alone, which takes it in the weights' dtype (under autocast
        # the norm returns float32 and the projection casts it): cast here, the same values. In a compiled block
        # the Triton kernel's graph break falls between the norm and the projection, and without this the norm
        # wrote float32 and a kernel of its own cast it (0.18 ms a page, h200-2026-12-01c call 1).
        x = self.norm1(x).to(self.attn.qkv.weight.dtype)
        if self.window_size and self.attn.runs_the_kernel(x, self.window_size):
            # The kernel reads the windows where they lie in the grid, padded here to whole windows as the
            # original pads them (zero tokens after the norm): the padded tokens' keys and values come from the
            # qkv projection (the 1024 view's 64 × 64 grid grows to 70 × 70, a 640 tile's 40 × 40 to 42 × 42) and
            # the kernel's windows are whole. Compiled, the pad is a kernel of its own that reads the norm's input
            # again (+0.19 ms a page, h200-2026-12-01e call 4); two ways to fold it into the norm were slower (the
            # padding's nearest tokens normalised then zeroed: Inductor's looped reduction; a Triton norm-and-pad
            # kernel; calls 5 and 6). With `padding_in_kernel` the grid stays as it is and the window kernel reads
            # the padding's keys and values from the projection's bias (its rows' addresses chosen, no select over
            # the loaded tiles): the same bits eagerly, one pass's windows 1.44 ms against 1.47, the served pass
            # 7.98 ms a page against 8.37 (h200-2026-12-01g calls 1-2). Compiled, the norm is then one fused
            # kernel instead of a reduction and a pointwise pass, which rounds a few values differently: over 16
            # pages the first-step logits stay closer to float32 than the original's on every preset (h200-2026-12-02
            # call 3; at six pages one compile put Tiny past it, 01g call 3, another not), the engine's default.
            if self.attn.padding_in_kernel:
                x = self.attn(x, window=self.window_size)
            else:
                x = self.attn(pad_to_windows(x, self.window_size), window=self.window_size, written=x.shape[1:3])
        elif self.window_size:
            height, width = x.shape[1:3]
            x, padded = partition_windows(x, self.window_size)
            x = merge_windows(self.attn(x), self.window_size, padded, (height, width))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class SamEncoder(nn.Module):
    """SAM ViT-B image encoder with the two extra stride-2 convolutions (net_2, net_3)."""

    def __init__(self, s: SamSettings):
        super().__init__()
        grid = s.image_size // s.patch_size
        self.patch_embed = PatchEmbed(s.patch_size, s.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, s.width))
        self.blocks = nn.ModuleList(
            SamBlock(s.width, s.heads, s.mlp_ratio, 0 if i in s.global_attn_indexes else s.window_size, grid)
            for i in range(s.layers)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(s.width, s.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(s.out_chans),
            nn.Conv2d(s.out_chans, s.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(s.out_chans),
        )
        mid, out = s.downsample_channels
        self.net_2 = nn.Conv2d(s.out_chans, mid, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(mid, out, kernel_size=3, stride=2, padding=1, bias=False)

    def use_relative_positions(self, mode: str) -> None:
        """"folded", the fast path: every block's relative positions go into its attention kernel (see
        SamAttention) and the patch embedding is a matrix product (see PatchEmbed); "materialised": the
        original's order throughout (a dense bias, the patch embedding a convolution)."""
        check_relative_position_mode(mode)
        for block in self.blocks:
            block.attn.fold_relative_positions = mode == "folded"
        self.patch_embed.as_matmul = mode == "folded"

    def use_cudnn_attention(self, enabled: bool) -> None:
        """The folded attention through SDPA with cuDNN's kernels tried first (`cudnn_first`) or PyTorch's
        choice. For callers whose shapes are few and fixed (CUDA graphs captured at load): cuDNN builds a
        plan for each new shape."""
        for block in self.blocks:
            block.attn.attention_backends = cudnn_first() if enabled else None

    def use_relative_attention_kernel(self, enabled: bool, windows: bool = True, any_grid: bool = True,
                                      terms_in_kernel: bool = False, padding_in_kernel: bool = False) -> None:
        """The blocks' attention through the Triton kernel (`SamAttention.relative_kernel`) or not; `windows`:
        the windowed blocks' too, or only the global blocks'; `any_grid`: every grid, or only those the kernel
        walks by whole rows (`SamAttention.kernel_for_any_grid`); `terms_in_kernel`: within windows, the kernel
        computes the relative terms from the tables (`SamAttention.terms_in_kernel`); `padding_in_kernel`: the
        windows' padding past the grid made up in the kernel (`SamAttention.padding_in_kernel`)."""
        for block in self.blocks:
            block.attn.relative_kernel = enabled and (windows or block.attn.global_attention)
            block.attn.kernel_for_any_grid = any_grid
            block.attn.terms_in_kernel = terms_in_kernel
            block.attn.padding_in_kernel = padding_in_kernel

    def use_gelu(self, way: str) -> None:
        """How the blocks' MLP GELU runs on CUDA (`MLPBlock.gelu_way`): "exact", "kernel" (Triton's; "exact"
        where Triton is missing) or "epilogue"."""
        if way not in ("exact", "kernel", "epilogue"):
            raise ValueError(f"no GELU way {way!r}: exact, kernel or epilogue")
        for block in self.blocks:
            block.mlp.gelu_way = "exact" if way == "kernel" and not triton_available() else way

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)  # [B, H, W, C]
        pos = resize_grid_embedding(self.pos_embed.permute(0, 3, 1, 2), x.shape[1]).permute(0, 2, 3, 1)
        x = x + pos
        for block in self.blocks:
            x = block(x)
        x = self.neck(x.permute(0, 3, 1, 2))
        return self.net_3(self.net_2(x))  # [B, C_out, H/4, W/4]


# ---------------------------------------------------------------- CLIP-L


class ClipEmbeddings(nn.Module):
    def __init__(self, s: ClipSettings):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(s.width))
        # Present in the checkpoint, but unused: the patch features come from SAM.
        self.patch_embedding = nn.Conv2d(3, s.width, kernel_size=s.patch_size, stride=s.patch_size, bias=False)
        self.position_embedding = nn.Embedding((s.image_size // s.patch_size) ** 2 + 1, s.width)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        batch = patch_features.shape[0]
        tokens = patch_features.flatten(2).transpose(1, 2)  # [B, HW, C]
        cls = self.class_embedding.expand(batch, 1, -1)
        x = torch.cat([cls, tokens], dim=1)
        table = self.position_embedding.weight
        src, dst = math.isqrt(table.shape[0] - 1), math.isqrt(tokens.shape[1])
        grid = table[1:].reshape(1, src, src, -1).permute(0, 3, 1, 2)
        grid = resize_grid_embedding(grid, dst).permute(0, 2, 3, 1).reshape(dst * dst, -1)
        return x + torch.cat([table[:1], grid], dim=0)[None]


class ClipAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv_proj = nn.Linear(dim, dim * 3)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv_proj(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class ClipMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn = ClipAttention(dim, heads)
        self.mlp = ClipMLP(dim, hidden)
        self.layer_norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.layer_norm2 = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipTransformer(nn.Module):
    def __init__(self, s: ClipSettings):
        super().__init__()
        hidden = s.ffn_hidden_size or 4 * s.width
        self.layers = nn.ModuleList(ClipLayer(s.width, s.heads, hidden) for _ in range(s.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipVisionModel(nn.Module):
    """CLIP-L without its patch embedding in use and without a final norm."""

    def __init__(self, s: ClipSettings):
        super().__init__()
        self.embeddings = ClipEmbeddings(s)
        self.pre_layrnorm = nn.LayerNorm(s.width, eps=1e-5)  # the checkpoint's spelling
        self.transformer = ClipTransformer(s)

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.pre_layrnorm(self.embeddings(sam_features)))


# ---------------------------------------------------------------- projector


class LinearProjector(nn.Module):
    def __init__(self, projector_config: dict):
        kind = projector_config.get("projector_type", "linear")
        if kind != "linear":
            raise NotImplementedError(f"projector_type {kind!r} is not supported (DeepSeek-OCR uses 'linear')")
        super().__init__()
        self.layers = nn.Linear(projector_config["input_dim"], projector_config["n_embed"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def encode_views(sam: SamEncoder, clip: ClipVisionModel, projector: LinearProjector, pixels: torch.Tensor):
    """Square views [N, 3, S, S] → projected features [N, (S/64)², n_embed]."""
    sam_features = sam(pixels)  # [N, C, h, w]
    clip_tokens = clip(sam_features)[:, 1:]  # drop the class token
    joint = torch.cat([clip_tokens, sam_features.flatten(2).transpose(1, 2)], dim=-1)
    return projector(joint)
