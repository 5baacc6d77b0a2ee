"""DeepSeek-V2 decoder as DeepSeek-OCR uses it: multi-head attention with rotary embeddings,
RMSNorm, a dense MLP in the first layer(s) and a routed mixture of experts with shared experts after.

Parameter names follow the official checkpoint so that its tensors load without conversion.
Attention is dispatched on `config._attn_implementation` ("sdpa", "flash_attention_2", "eager").
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_deepseek_v2 import DeepseekV2Config


class DeepseekV2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The statistics are taken in float32 whatever the activation dtype, as the original does.
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, T, head_dim] for the given positions (computed in float32, then cast).

    Computed on the fly rather than kept as a buffer: it is cheap, and a buffer would have to be
    re-initialised whenever the model is materialised from the meta device.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [B, T, D]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Growing key/value cache, one (key, value) pair of [B, H, T, D] per layer."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers

    def get_seq_length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[-2]

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor):
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]


def causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """[q_len, k_len] boolean mask; the queries are the last q_len of k_len positions."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


# Each attention function takes q/k/v [B, H, T, D] and either a full boolean mask [B, 1, q, k]
# (padded batches; it already holds causality) or None (plain causal attention).
def eager_attention(q, k, v, mask: Optional[torch.Tensor]) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is None:
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, mask: Optional[torch.Tensor]) -> torch.Tensor:
    q_len, k_len = q.shape[-2], k.shape[-2]
    if mask is None and q_len > 1 and q_len != k_len:
        # SDPA's is_causal aligns top-left; with a cache the queries are the last positions.
        mask = causal_mask(q_len, k_len, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q_len > 1)


def flash_attention(q, k, v, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is not None:  # padded batches would need the varlen kernel; SDPA handles them exactly
        return sdpa_attention(q, k, v, mask)
    from flash_attn import flash_attn_func

    # flash-attn wants [B, T, H, D] and aligns a causal mask bottom-right, as a cache needs.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=q.shape[-2] > 1)
    return out.transpose(1, 2)


ATTENTION_FUNCTIONS = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash_attention_2": flash_attention,
}


class DeepseekV2Attention(nn.Module):
    """Multi-head attention with rotary position embeddings (the `use_mla: false` variant)."""

    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states, cos, sin, cache: Optional[KVCache], mask: Optional[torch.Tensor]):
        bsz, q_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.num_kv_heads != self.num_heads:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        attend = ATTENTION_FUNCTIONS[self.config._attn_implementation or "sdpa"]
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1))


class DeepseekV2MLP(nn.Module):
    def __init__(self, config: DeepseekV2Config, intermediate_size: Optional[int] = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Router: softmax over expert logits (in float32), greedy top-k, optional renormalisation."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        if config.topk_method != "greedy" or config.scoring_func != "softmax":
            raise NotImplementedError(
                f"only greedy softmax routing is supported (got {config.topk_method}/{config.scoring_func})"
            )
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor):
        logits = F.linear(hidden_states.float(), self.weight.float())  # [N, E]
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight * self.routed_scaling_factor


class DeepseekV2MoE(nn.Module):
    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.experts = nn.ModuleList(
            DeepseekV2MLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.gate = MoEGate(config)
        self.shared_experts = (
            DeepseekV2MLP(config, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [N, D]
        topk_idx, topk_weight = self.gate(x)  # [N, K]
        # Group the (token, slot) pairs by expert so that each active expert runs once on its tokens.
        flat_expert = topk_idx.reshape(-1)
        order = flat_expert.argsort()
        token_of_slot = order // topk_idx.shape[1]
        counts = torch.bincount(flat_expert, minlength=len(self.experts)).tolist()
        expert_out = torch.empty(order.shape[0], shape[-1], dtype=x.dtype, device=x.device)
        start = 0
        for expert_id, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                expert_out[rows] = self.experts[expert_id](x[token_of_slot[rows]])
                start += count
        per_slot = torch.empty_like(expert_out)
        per_slot[order] = expert_out
        routed = (per_slot.view(*topk_idx.shape, -1).float() * topk_weight.unsqueeze(-1)).sum(dim=1)
        out = routed.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


class DeepseekV2DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        if config.use_mla:
            raise NotImplementedError("DeepSeek-OCR uses plain multi-head attention; use_mla must be false")
        self.self_attn = DeepseekV2Attention(config, layer_idx)
        self.mlp = DeepseekV2MoE(config) if config.is_moe_layer(layer_idx) else DeepseekV2MLP(config)
        self.input_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, cos, sin, cache, mask):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin, cache, mask)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DeepseekV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV2Config
    base_model_prefix = "model"
    _no_split_modules = ["DeepseekV2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (DeepseekV2RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MoEGate):
            nn.init.normal_(module.weight, mean=0.0, std=std)


def build_attention_mask(attention_mask: Optional[torch.Tensor], q_len: int) -> Optional[torch.Tensor]:
    """[B, K] padding mask (1 = real token, left padding) → boolean [B, 1, q_len, K], or None without padding."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    k_len = attention_mask.shape[-1]
    causal = causal_mask(q_len, k_len, attention_mask.device)
    diagonal = causal & ~causal.tril(k_len - q_len - 1)
    # A padding query sees no real key; letting it see itself keeps its row finite (its output is unused).
    return (attention_mask.bool()[:, None, None, :] & causal) | diagonal


class DeepseekV2Model(DeepseekV2PreTrainedModel):
    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeepseekV2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run the decoder layers on embeddings [B, T, D]; returns the final hidden states.

        `attention_mask` [B, past + T] marks real tokens with 1 (left padding with 0).
        """
        bsz, q_len, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past, past + q_len, device=inputs_embeds.device).expand(bsz, -1)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype)
        mask = build_attention_mask(attention_mask, q_len)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, cos, sin, cache, mask)
        return self.norm(hidden_states)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[KVCache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        use_cache: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = KVCache(self.config.num_hidden_layers)
        hidden = self.decode(inputs_embeds, position_ids, past_key_values, attention_mask)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values)


class DeepseekV2ForCausalLM(DeepseekV2PreTrainedModel):
    def __init__(self, config: DeepseekV2Config):
        super().__init__(config)
        self.model = DeepseekV2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, past_key_values=None,
                attention_mask=None, use_cache=False, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                         past_key_values=past_key_values, attention_mask=attention_mask, use_cache=use_cache)
        logits = self.lm_head(out.last_hidden_state).float()
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)
