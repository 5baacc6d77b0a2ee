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
from transformers.modeling_outputs import BaseModelOutputWithPast

from .configuration_deepseek_v2 import DeepseekV2Config
from .fused_moe import routed_experts
from .fused_ops import add_rms_norm, apply_rotary, linear, norm_linear, route_top_k, silu_and_mul
from .paged_attention import PagedKVCache


class DeepseekV2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.add_and_norm(hidden_states, None)[0]

    def add_and_norm(self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor]):
        """(norm(hidden + residual), hidden + residual): the residual add of a pre-norm block fused with
        the norm that follows it. Statistics in float32 whatever the activation dtype, as the original."""
        return add_rms_norm(hidden_states, residual, self.weight, self.variance_epsilon)


class RotaryEmbedding(nn.Module):
    """cos/sin of the rotary angles, looked up by position from a table computed once per device.

    The table holds no state worth saving (no buffer, nothing in the state dict): it is recomputed
    when the model moves or needs longer positions. Angles are position × inverse frequency in
    float32, then cos/sin are rounded to the activation dtype.

    `inv_freq_dtype` "bfloat16" reproduces the original code under `model.to(torch.bfloat16)`, which
    rounds its inverse-frequency buffer to bf16 (angles off by up to ~1 rad at position 900); the default
    keeps it in float32, as DeepSeek's vLLM implementation does. Only for comparisons with the original.
    """

    def __init__(self, head_dim: int, theta: float, inv_freq_dtype: str = "float32"):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        if inv_freq_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"rope_inv_freq_dtype must be 'float32' or 'bfloat16', not {inv_freq_dtype!r}")
        self.inv_freq_dtype = getattr(torch, inv_freq_dtype)
        self._tables: dict = {}  # (device, dtype) → (cos [L, Dh], sin [L, Dh])

    def inverse_frequencies(self, device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return (1.0 / (self.theta ** exponents)).to(self.inv_freq_dtype).float()

    def table(self, length: int, device, dtype: torch.dtype):
        """(cos, sin) [≥ length, Dh] for positions 0..; grown (never shrunk) when a longer one is asked."""
        positions = torch.arange(max(length, 1), device=device, dtype=torch.float32)
        key = (positions.device, dtype)  # the device with its index ("cuda:0"), as tensors report it
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < length:
            freqs = positions[:, None] * self.inverse_frequencies(device)[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)
            cached = (angles.cos().to(dtype), angles.sin().to(dtype))
            self._tables[key] = cached
        return cached

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype, length: Optional[int] = None):
        """cos/sin [..., Dh] at `position_ids` [...]; `length` bounds the positions (else the table in hand)."""
        if length is None:
            cached = self._tables.get((position_ids.device, dtype))
            if cached is None:
                raise RuntimeError("the rotary table was not prepared: call table(length, device, dtype) first")
        else:
            cached = self.table(length, position_ids.device, dtype)
        return cached[0][position_ids], cached[1][position_ids]


def _stacked_rows(parts) -> tuple:
    """The shape of parameters stacked along their first dimension."""
    return (sum(p.shape[0] for p in parts),) + tuple(parts[0].shape[1:])


class FusedWeights:
    """Several parameters held as consecutive parts of one tensor, so that one kernel reads them all
    (q/k/v as one projection, gate and up as one, the experts stacked [E, ...]), while each parameter
    keeps its own name and shape for loading and saving.

    Loading or moving a model replaces parameters one by one; `get()` notices (the first parameter is
    no longer the start of the fused tensor) and fuses again, copying each parameter once and making
    it a view of its part.
    """

    def __init__(self, owner: nn.Module, names: list, shape_of):
        self.owner, self.names, self.shape_of = owner, names, shape_of  # shape_of(parts) → fused shape
        self.tensor: Optional[torch.Tensor] = None

    def _parameter(self, name: str):
        module_path, _, attr = name.rpartition(".")
        module = self.owner.get_submodule(module_path) if module_path else self.owner
        return module, attr, getattr(module, attr)

    def get(self) -> torch.Tensor:
        fused = self.tensor
        if fused is not None and torch.compiler.is_compiling():
            # A compiler cannot compare data pointers; the parts were fused when the model first ran eagerly
            # (compiled code is traced after that, and a model is not moved once compiled).
            return fused
        first = self._parameter(self.names[0])[2]
        if fused is not None and fused.device == first.device and fused.dtype == first.dtype \
                and fused.data_ptr() == first.data_ptr():
            return fused
        # Built as ordinary tensors even when first asked for under inference_mode, so that the model
        # still works outside it afterwards.
        with torch.inference_mode(False), torch.no_grad():
            parts = [self._parameter(name) for name in self.names]
            flat = torch.cat([tensor.detach().reshape(-1) for _, _, tensor in parts])
            offset = 0
            for module, attr, tensor in parts:
                view = flat[offset:offset + tensor.numel()].view(tensor.shape)
                setattr(module, attr, nn.Parameter(view, requires_grad=False))
                offset += tensor.numel()
        self.tensor = flat.view(self.shape_of([tensor for _, _, tensor in parts]))
        return self.tensor


class KVCache:
    """Growing key/value cache, one (key, value) pair of [B, H, T, D] per layer (the reference path)."""

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
    """Multi-head attention with rotary position embeddings (the `use_mla: false` variant).

    The q, k and v projections run as one GEMM over their fused weights. With a `KVCache` (the
    reference path) the batch is [B, T, ...] and attention is dispatched on `config._attn_implementation`;
    with a `PagedKVCache` the tokens are packed [T, ...] and the cache does the attention.
    """

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
        projections = ["q_proj", "k_proj", "v_proj"]
        self.qkv_weight = FusedWeights(self, [f"{p}.weight" for p in projections], _stacked_rows)
        self.qkv_bias = FusedWeights(self, [f"{p}.bias" for p in projections], _stacked_rows) if bias else None

    def forward(self, hidden_states, cos, sin, cache, mask: Optional[torch.Tensor] = None):
        bias = self.qkv_bias.get() if self.qkv_bias is not None else None
        return self.attend(linear(hidden_states, self.qkv_weight.get(), bias), cos, sin, cache, mask)

    def attend(self, qkv, cos, sin, cache, mask: Optional[torch.Tensor] = None):
        """The rest of `forward` from the fused q/k/v projection's output [..., T, (H + 2·Hkv)·Dh] (the decoder
        layer computes that projection with the norm before it: `norm_linear`)."""
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))  # [..., T, H, Dh]
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        q, k = apply_rotary(q, k, cos, sin)
        if isinstance(cache, PagedKVCache):
            out = cache.attend(self.layer_idx, q, k, v)  # [T, H, Dh]
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, Dh]
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)
            if self.num_kv_heads != self.num_heads:
                k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
                v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            attend = ATTENTION_FUNCTIONS[self.config._attn_implementation or "sdpa"]
            out = attend(q, k, v, mask).transpose(1, 2)  # [B, T, H, Dh]
        return linear(out.flatten(-2), self.o_proj.weight, self.o_proj.bias)


class DeepseekV2MLP(nn.Module):
    """down(silu(gate(x)) · up(x)), the gate and up projections run as one GEMM over fused weights."""

    def __init__(self, config: DeepseekV2Config, intermediate_size: Optional[int] = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.gate_up_weight = FusedWeights(self, ["gate_proj.weight", "up_proj.weight"], _stacked_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(F.linear(x, self.gate_up_weight.get())))


class MoEGate(nn.Module):
    """Router: expert logits in the activation dtype, softmax in float32, greedy top-k, optional
    renormalisation, scaling.

    The logits are computed in the model's dtype, as the original computes them under its bf16
    autocast (which overrides its explicit float32 cast) and as DeepSeek's vLLM code does.
    """

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
        """[N, D] → (expert ids [N, K], weights [N, K] float32)."""
        return self.route(F.linear(hidden_states, self.weight.to(hidden_states.dtype)))

    def route(self, logits: torch.Tensor):
        """Logits [N, E] → (expert ids [N, K], weights [N, K] float32)."""
        return route_top_k(logits, self.top_k, self.norm_topk_prob, self.routed_scaling_factor)


class DeepseekV2MoE(nn.Module):
    """Routed experts (their weights held stacked, read in place) plus always-on shared experts."""

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
        count = config.n_routed_experts
        # [E, 2I, D]: each expert's gate rows then its up rows; [E, D, I]: each expert's down projection.
        self.w13 = FusedWeights(self, [f"experts.{e}.{p}_proj.weight" for e in range(count) for p in ("gate", "up")],
                                lambda parts: (count, 2 * parts[0].shape[0], parts[0].shape[1]))
        self.w2 = FusedWeights(self, [f"experts.{e}.down_proj.weight" for e in range(count)],
                               lambda parts: (count,) + tuple(parts[0].shape))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [N, D]
        expert_ids, expert_weights = self.gate(x)  # [N, K] each
        out = routed_experts(x, self.w13.get(), self.w2.get(), expert_ids, expert_weights, shared=self.shared_experts)
        return out.view(shape)

    def after_norm(self, hidden_states: torch.Tensor, residual: torch.Tensor, norm: "DeepseekV2RMSNorm"):
        """(self(norm(hidden + residual)), hidden + residual), the norm computed with the router's projection
        (`norm_linear`): a decode step's kernel fewer."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits, summed, normed = norm_linear(x, residual.reshape(-1, shape[-1]), norm.weight, norm.variance_epsilon,
                                             self.gate.weight.to(x.dtype), keep_normed=True)
        expert_ids, expert_weights = self.gate.route(logits)
        out = routed_experts(normed, self.w13.get(), self.w2.get(), expert_ids, expert_weights,
                             shared=self.shared_experts)
        return out.view(shape), summed.view(shape)


class DeepseekV2DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        if config.use_mla:
            raise NotImplementedError("DeepSeek-OCR uses plain multi-head attention; use_mla must be false")
        self.self_attn = DeepseekV2Attention(config, layer_idx)
        self.mlp = DeepseekV2MoE(config) if config.is_moe_layer(layer_idx) else DeepseekV2MLP(config)
        self.input_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, residual, cos, sin, cache, mask):
        """Pre-norm block with the residual carried alongside: returns (this block's output, the
        residual stream before it is added), so that the next norm does the add in the same kernel."""
        attention, norm = self.self_attn, self.input_layernorm
        bias = attention.qkv_bias.get() if attention.qkv_bias is not None else None
        qkv, residual = norm_linear(hidden_states, residual, norm.weight, norm.variance_epsilon,
                                    attention.qkv_weight.get(), bias)
        attended = attention.attend(qkv, cos, sin, cache, mask)
        if isinstance(self.mlp, DeepseekV2MoE):
            return self.mlp.after_norm(attended, residual, self.post_attention_layernorm)
        normed, residual = self.post_attention_layernorm.add_and_norm(attended, residual)
        return self.mlp(normed), residual


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
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_inv_freq_dtype)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        cache=None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run the decoder layers; returns the final hidden states, shaped like `inputs_embeds`.

        With a `KVCache` or none (the reference path): embeddings [B, T, D]; `attention_mask`
        [B, past + T] marks real tokens with 1 (left padding with 0).
        With a `PagedKVCache`: packed tokens [T, D] whose positions and cache slots the cache's
        `batch` names (the rotary table must cover them: see `RotaryEmbedding.table`).
        """
        if isinstance(cache, PagedKVCache):
            cos, sin = self.rotary(cache.batch.positions, inputs_embeds.dtype)
            mask = None
        else:
            bsz, q_len, _ = inputs_embeds.shape
            past = cache.get_seq_length() if cache is not None else 0
            if position_ids is None:
                if attention_mask is not None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
                else:
                    position_ids = torch.arange(past, past + q_len, device=inputs_embeds.device).expand(bsz, -1)
            cos, sin = self.rotary(position_ids, inputs_embeds.dtype, length=past + q_len)
            mask = build_attention_mask(attention_mask, q_len)
        hidden_states, residual = inputs_embeds, None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, cos, sin, cache, mask)
        return self.norm.add_and_norm(hidden_states, residual)[0]

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
