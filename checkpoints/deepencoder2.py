"""DeepEncoder V2: the vision side of DeepSeek-OCR 2.

A view goes through the same SAM ViT-B as the first model's (`deepencoder.SamEncoder`), whose last
stride-2 convolution ends at the encoder's width, so a view of S pixels becomes (S/64)² tokens. Those
tokens, followed by as many learned queries (a table per view size: 144 for a 768-pixel tile, 256 for
the 1024-pixel global view), go through a Qwen2-style transformer used as an encoder: RMSNorm,
rotary positions, grouped-query attention with biased q/k/v, a SiLU-gated MLP, a final norm, and no
token embedding. Only the queries' outputs go on, through a linear projector into the decoder's space.

Its attention is prefix-LM: the image tokens attend to every image token; query i attends to every image
token and to queries 0..i. Here that is one boolean mask per token count, built once per device and
shared by every view of that size, so that all views of one size run as one batch.

Every size comes from the checkpoint's `vision_config`, so a small config builds a small encoder with
the official tensor names.
"""

from dataclasses import dataclass
from types import SimpleNamespace
import torch
import torch.nn.functional as F
from torch import nn

from .deepencoder import LinearProjector, SamEncoder, SamSettings
from .fused_ops import apply_rotary
from .modeling_deepseekv2 import DeepseekV2MLP, DeepseekV2RMSNorm, FusedWeights, RotaryEmbedding, _stacked_rows

# SAM's 16-pixel patches, then its two stride-2 convolutions: a view of S pixels gives (S / 64)² tokens.
FEATURE_STRIDE = 64
# The learned query tables, by the side of the view they serve (the checkpoint's names).
QUERY_TABLES = {768: "query_768", 1024: "query_1024"}


@dataclass
class QueryEncoderSettings:
    width: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate_size: int = 4864
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0


def vision_settings(vision_config: dict) -> tuple[SamSettings, QueryEncoderSettings]:
    """Read SAM's and the encoder's sizes from a checkpoint's `vision_config` (unknown keys are ignored).

    The official config still lists SAM's downsample channels as the first model's [512, 1024], but the
    official code ends SAM at the encoder's width (896), since the encoder reads SAM's tokens as they
    are: the first entry is taken from the config, the last is the encoder's width.
    """
    vision_config = vision_config or {}
    widths = vision_config.get("width", {})
    encoder_cfg = dict(widths.get("qwen2-0-5b", {}))
    if "dim" in encoder_cfg:
        encoder_cfg["width"] = encoder_cfg.pop("dim")
    encoder_keys = QueryEncoderSettings.__dataclass_fields__
    encoder = QueryEncoderSettings(**{k: v for k, v in encoder_cfg.items() if k in encoder_keys})
    sam_keys = SamSettings.__dataclass_fields__
    sam = SamSettings(**{k: v for k, v in widths.get("sam_vit_b", {}).items() if k in sam_keys})
    if "image_size" in vision_config:
        sam.image_size = vision_config["image_size"]
    sam.downsample_channels = [sam.downsample_channels[0], encoder.width]
    return sam, encoder


def prefix_lm_mask(image_tokens: int, device=None) -> torch.Tensor:
    """[2n, 2n] boolean mask (True = may attend) for n image tokens followed by n queries: every row sees
    all image tokens; image rows see no query; query row i also sees queries 0..i."""
    length = 2 * image_tokens
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed[:, :image_tokens] = True
    return allowed


class QueryEncoderAttention(nn.Module):
    """Grouped-query attention with rotary positions; q/k/v carry biases, the output projection none.
    The three projections run as one GEMM over their fused weights and biases."""

    def __init__(self, s: QueryEncoderSettings):
        super().__init__()
        self.heads, self.kv_heads = s.heads, s.kv_heads
        self.head_dim = s.width // s.heads
        self.q_proj = nn.Linear(s.width, s.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(s.width, s.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(s.width, s.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(s.heads * self.head_dim, s.width, bias=False)
        projections = ["q_proj", "k_proj", "v_proj"]
        self.qkv_weight = FusedWeights(self, [f"{p}.weight" for p in projections], _stacked_rows)
        self.qkv_bias = FusedWeights(self, [f"{p}.bias" for p in projections], _stacked_rows)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [N, L, D], cos/sin [L, Dh], mask [L, L] boolean → [N, L, D]."""
        qkv = F.linear(x, self.qkv_weight.get(), self.qkv_bias.get())
        kv_width = self.kv_heads * self.head_dim
        q, k, v = qkv.split([self.heads * self.head_dim, kv_width, kv_width], dim=-1)
        q = q.unflatten(-1, (self.heads, self.head_dim))  # [N, L, H, Dh]
        k = k.unflatten(-1, (self.kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.kv_heads, self.head_dim))
        q, k = apply_rotary(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [N, H, L, Dh]
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class QueryEncoderLayer(nn.Module):
    def __init__(self, s: QueryEncoderSettings):
        super().__init__()
        self.self_attn = QueryEncoderAttention(s)
        self.mlp = DeepseekV2MLP(SimpleNamespace(hidden_size=s.width, intermediate_size=s.intermediate_size))
        self.input_layernorm = DeepseekV2RMSNorm(s.width, eps=s.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV2RMSNorm(s.width, eps=s.rms_norm_eps)

    def forward(self, hidden_states, residual, cos, sin, mask):
        """Pre-norm block, the residual carried alongside as in the decoder's layers."""
        normed, residual = self.input_layernorm.add_and_norm(hidden_states, residual)
        attended = self.self_attn(normed, cos, sin, mask)
        normed, residual = self.post_attention_layernorm.add_and_norm(attended, residual)
        return self.mlp(normed), residual


class QueryEncoderStack(nn.Module):
    """The transformer itself: layers, final norm, rotary table; positions 0.. over image tokens then queries."""

    def __init__(self, s: QueryEncoderSettings):
        super().__init__()
        self.layers = nn.ModuleList(QueryEncoderLayer(s) for _ in range(s.layers))
        self.norm = DeepseekV2RMSNorm(s.width, eps=s.rms_norm_eps)
        self.rotary = RotaryEmbedding(s.width // s.heads, s.rope_theta)
        self._masks: dict = {}  # (image tokens, device) → prefix-LM mask

    def mask(self, image_tokens: int, device) -> torch.Tensor:
        key = (image_tokens, str(device))
        if key not in self._masks:
            self._masks[key] = prefix_lm_mask(image_tokens, device)
        return self._masks[key]

    def forward(self, x: torch.Tensor, image_tokens: int) -> torch.Tensor:
        """[N, L, D] (the first `image_tokens` of each row are image tokens) → final hidden states [N, L, D]."""
        length = x.shape[1]
        positions = torch.arange(length, device=x.device)
        cos, sin = self.rotary(positions, x.dtype, length=length)
        mask = self.mask(image_tokens, x.device)
        hidden_states, residual = x, None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, cos, sin, mask)
        return self.norm.add_and_norm(hidden_states, residual)[0]


class DecoderAsEncoder(nn.Module):
    """Holds the stack one level down, as the official module tree does (`qwen2_model.model.model.*`)."""

    def __init__(self, s: QueryEncoderSettings):
        super().__init__()
        self.model = QueryEncoderStack(s)


class QueryEncoder(nn.Module):
    """SAM's feature map → the learned queries' outputs, one per SAM token."""

    def __init__(self, s: QueryEncoderSettings):
        super().__init__()
        self.model = DecoderAsEncoder(s)
        for side, name in QUERY_TABLES.items():
            setattr(self, name, nn.Embedding((side // FEATURE_STRIDE) ** 2, s.width))

    def queries_for(self, image_tokens: int) -> torch.Tensor:
        """The query table [n, D] for a view of n tokens (a table exists for each view size the model knows)."""
        for name in QUERY_TABLES.values():
            table = getattr(self, name).weight
            if table.shape[0] == image_tokens:
                return table
        sides = ", ".join(f"{side} ({(side // FEATURE_STRIDE) ** 2} tokens)" for side in QUERY_TABLES)
        raise ValueError(f"no learned queries for a view of {image_tokens} tokens: views must be {sides} pixels")

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:
        """[N, D, h, w] → [N, h·w, D]."""
        tokens = sam_features.flatten(2).transpose(1, 2)  # [N, n, D]
        count, image_tokens = tokens.shape[:2]
        queries = self.queries_for(image_tokens).to(tokens.dtype).expand(count, -1, -1)
        hidden = self.model.model(torch.cat([tokens, queries], dim=1), image_tokens)
        return hidden[:, image_tokens:]


def encode_views(sam: SamEncoder, encoder: QueryEncoder, projector: LinearProjector, pixels: torch.Tensor):
    """Square views of one size [N, 3, S, S] → projected query outputs [N, (S/64)², n_embed]."""
    return projector(encoder(sam(pixels)))
