"""Configuration of the DeepSeek-V2 decoder used by DeepSeek-OCR.

Only the subset of DeepSeek-V2 that DeepSeek-OCR uses is supported: plain multi-head attention
(`use_mla: false`), a dense MLP in the first `first_k_dense_replace` layers and a mixture of experts
with greedy top-k softmax routing plus shared experts in the others.
"""

from transformers import PretrainedConfig


class DeepseekV2Config(PretrainedConfig):
    model_type = "deepseek_v2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=129280,
        hidden_size=1280,
        intermediate_size=6848,
        moe_intermediate_size=896,
        num_hidden_layers=12,
        num_attention_heads=10,
        num_key_value_heads=None,
        n_shared_experts=2,
        n_routed_experts=64,
        num_experts_per_tok=6,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        scoring_func="softmax",
        norm_topk_prob=False,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        hidden_act="silu",
        max_position_embeddings=8192,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_bias=False,
        use_mla=False,
        rope_inv_freq_dtype="float32",
        use_cache=True,
        pad_token_id=None,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.routed_scaling_factor = routed_scaling_factor
        self.topk_method = topk_method
        self.scoring_func = scoring_func
        self.norm_topk_prob = norm_topk_prob
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_layer_freq = moe_layer_freq
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = float(rms_norm_eps)
        self.rope_theta = float(rope_theta)
        self.attention_bias = attention_bias
        self.use_mla = use_mla
        # "bfloat16" rounds the rotary inverse frequencies as the original code does under
        # model.to(torch.bfloat16); only for comparing with it (see RotaryEmbedding).
        self.rope_inv_freq_dtype = rope_inv_freq_dtype
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )
