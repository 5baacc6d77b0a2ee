"""A paged key/value cache and the attention that reads it.

The cache is a pool of fixed-size blocks per layer, `keys[layer]` / `values[layer]` of
[num_blocks, Hkv, block_size, Dh]. A sequence owns a list of blocks (its block table); position p of
the sequence lives in block `table[p // block_size]` at offset `p % block_size`, i.e. in flat slot
`table[p // block_size] · block_size + p % block_size`. Who owns which block is the engine's business;
the model only writes and reads the slots a `PagedBatch` names. Block 0 is never given to a sequence:
rows of a batch that hold no sequence point at it, so whatever they write lands there harmlessly.

A forward over the cache is one of two kinds:
- prefill: several prompts packed one after another ([T] tokens in all); each attends causally to
  its own tokens only (variable-length attention), and their keys/values are written to the cache;
- decode: one new token per sequence ([B] tokens); each attends to its own cached length.

Attention itself: prefill runs PyTorch's scaled_dot_product_attention per prompt (prompts of equal
length together), the definition, or on CUDA a Triton kernel over the packed prompts whose bounds it reads
from a table on the device (`PagedBatch.work`): nothing in it depends on the lengths on the host, so the
whole prefill can be a CUDA graph for a count of tokens. Decode reads the blocks in place with a Triton
kernel on CUDA (one program per sequence, head and split of the sequence, then a reduction of the splits),
or with a gather of the blocks and a masked SDPA elsewhere, which is the definition.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from . import triton_attention
from .fused_ops import use_triton
from .triton_attention import available as _triton_available  # noqa: F401 (this form makes transformers ship
# the file with the remote code)


@dataclass
class PagedBatch:
    """What one forward over the paged cache reads and writes. Tensors live on the model's device."""

    positions: torch.Tensor  # [T] int64: each token's position in its own sequence
    slots: torch.Tensor  # [T] int64: the flat cache slot each token's key/value is written to
    # Decode only: the blocks of each sequence and how many positions it has, this token included.
    block_tables: Optional[torch.Tensor] = None  # [B, max_blocks] int32
    seq_lens: Optional[torch.Tensor] = None  # [B] int32
    # Prefill only: the packed prompts' lengths, in order (host integers: they shape the computation).
    prompt_lengths: Optional[tuple] = None
    # Prefill only, on CUDA: the Triton kernel's table of the prompts (`triton_attention.prefill_work`) on the
    # device; made from `prompt_lengths` by the first layer when not given.
    work: Optional[torch.Tensor] = None
    _length_groups: Optional[list] = field(default=None, repr=False)  # made by the first layer, read by the rest

    @property
    def is_prefill(self) -> bool:
        return self.prompt_lengths is not None

    def attention_work(self, device) -> torch.Tensor:
        """The prefill kernel's table on `device` (made once per forward when the caller gave none)."""
        if self.work is None:
            self.work = triton_attention.prefill_work(self.prompt_lengths).to(device)
        return self.work

    def length_groups(self, device) -> list:
        """(length, prompts, index [prompts · length] of their packed tokens) for each prompt length: the
        same for every layer, so made once per forward (a prefill of a dozen pages launched ~170 operators
        a forward building them layer after layer)."""
        if self._length_groups is None:
            starts, by_length = 0, {}
            for length in self.prompt_lengths:
                by_length.setdefault(length, []).append(starts)
                starts += length
            self._length_groups = [
                (length, len(group), torch.cat([torch.arange(s, s + length, device=device) for s in group]))
                for length, group in by_length.items()]
        return self._length_groups


class PagedKVCache:
    """Key/value blocks for every layer: [layers, num_blocks, Hkv, block_size, Dh] each."""

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device):
        shape = (num_layers, num_blocks, num_kv_heads, block_size, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.batch: Optional[PagedBatch] = None  # set by the caller before each forward

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * block_size * head_dim * torch.empty((), dtype=dtype).element_size()

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, Dh], k/v [T, Hkv, Dh] of the batch's tokens → attention output [T, H, Dh]."""
        batch = self.batch
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        store_kv(keys, values, k, v, batch.slots)
        if batch.is_prefill:
            if use_triton(q):
                return triton_attention.prefill_attention(q, k, v, batch.attention_work(q.device))
            return prefill_attention(q, k, v, batch.length_groups(q.device))
        return paged_decode_attention(q, keys, values, batch.block_tables, batch.seq_lens)


def store_kv(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Write k/v [T, Hkv, Dh] into one layer's blocks [num_blocks, Hkv, block_size, Dh] at flat `slots` [T]."""
    if use_triton(k):
        triton_attention.store_kv(keys, values, k, v, slots)
        return
    block_size = keys.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    keys[blocks, :, offsets] = k
    values[blocks, :, offsets] = v


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length_groups: list) -> torch.Tensor:
    """Causal attention of packed prompts over their own tokens: q [T, H, Dh], k/v [T, Hkv, Dh] → [T, H, Dh].

    Prompts of the same length (pages of one preset and tile grid) share one SDPA call: `length_groups` is
    `PagedBatch.length_groups`.
    """
    out = torch.empty_like(q)
    for length, prompts, index in length_groups:
        shape = (prompts, length)
        qs = q[index].unflatten(0, shape).transpose(1, 2)  # [G, H, L, Dh]
        ks = k[index].unflatten(0, shape).transpose(1, 2)
        vs = v[index].unflatten(0, shape).transpose(1, 2)
        attended = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=ks.shape[1] != qs.shape[1])
        out[index] = attended.transpose(1, 2).flatten(0, 1)
    return out


def paged_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor) -> torch.Tensor:
    """One query per sequence over its cached positions: q [B, H, Dh], one layer's blocks
    [num_blocks, Hkv, block_size, Dh], block_tables [B, max_blocks], seq_lens [B] → [B, H, Dh].

    A sequence of length 0 (a row holding no sequence) gets an output of zeros.
    """
    if use_triton(q):
        return triton_attention.paged_decode_attention(q, keys, values, block_tables, seq_lens)
    batch, heads, head_dim = q.shape
    _, kv_heads, block_size, _ = keys.shape
    if not q.is_cuda:  # gather only the blocks in use (reading the lengths is free on the CPU, no graph here)
        block_tables = block_tables[:, :max(1, -(-int(seq_lens.max()) // block_size))]
    span = block_tables.shape[1] * block_size
    # Gather every sequence's blocks into [B, Hkv, span, Dh] and mask what lies past its length.
    gathered_k = keys[block_tables.long()].transpose(1, 2).reshape(batch, kv_heads, span, head_dim)
    gathered_v = values[block_tables.long()].transpose(1, 2).reshape(batch, kv_heads, span, head_dim)
    visible = torch.arange(span, device=q.device)[None, :] < seq_lens[:, None]  # [B, span]
    out = F.scaled_dot_product_attention(q[:, :, None], gathered_k, gathered_v, attn_mask=visible[:, None, None, :],
                                         enable_gqa=kv_heads != heads)[:, :, 0]
    return torch.where(seq_lens[:, None, None] > 0, out, torch.zeros_like(out))
