"""The decoder's modules are the fast path: fused weights that keep the official names, the router's dtype,
the rotary precision option, and packed prompts over a paged cache giving the reference path's logits."""

import torch
import torch.nn.functional as F

from checkpoints.fused_moe import routed_experts
from checkpoints.fused_ops import add_rms_norm, route_top_k
from checkpoints.modeling_deepseekv2 import DeepseekV2MoE, KVCache, RotaryEmbedding
from checkpoints.paged_attention import PagedBatch, PagedKVCache
from conftest import document_image


def test_fused_weights_are_the_parameters_under_their_official_names(tiny_model):
    names_before = list(tiny_model.state_dict())
    layer = tiny_model.model.layers[1]
    moe = layer.mlp
    assert isinstance(moe, DeepseekV2MoE)
    w13, w2 = moe.w13.get(), moe.w2.get()
    qkv = layer.self_attn.qkv_weight.get()
    assert list(tiny_model.state_dict()) == names_before  # nothing renamed, nothing added
    width = moe.experts[0].gate_proj.weight.shape[0]
    for e, expert in enumerate(moe.experts):  # the parameters are views of the stacked tensors: no copy
        assert expert.gate_proj.weight.data_ptr() == w13[e, :width].data_ptr()
        assert expert.up_proj.weight.data_ptr() == w13[e, width:].data_ptr()
        assert expert.down_proj.weight.data_ptr() == w2[e].data_ptr()
    assert layer.self_attn.k_proj.weight.data_ptr() == qkv[layer.self_attn.q_proj.weight.shape[0]:].data_ptr()
    assert moe.w13.get() is w13  # fused once, then reused


def test_fused_weights_follow_the_model_when_its_parameters_are_replaced(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model)
    moe = model.model.layers[1].mlp
    moe.w13.get()
    with torch.no_grad():
        model.model.layers[1].mlp.experts[0].gate_proj.weight = torch.nn.Parameter(
            moe.experts[0].gate_proj.weight.detach().clone() + 1)  # as loading or moving a model does
    assert torch.equal(moe.w13.get()[0, :moe.experts[0].gate_proj.weight.shape[0]],
                       moe.experts[0].gate_proj.weight)


def test_router_logits_are_computed_in_the_activation_dtype():
    gate_weight = torch.randn(8, 32)
    x = torch.randn(5, 32).bfloat16()
    logits = F.linear(x, gate_weight.bfloat16())  # what the original computes under bf16 autocast
    assert logits.dtype == torch.bfloat16
    ids, weights = route_top_k(logits, 3, False, 1.0)
    expected = logits.float().softmax(-1).topk(3, sorted=False)
    assert torch.equal(ids.sort(-1).values, expected.indices.sort(-1).values)
    assert weights.dtype == torch.float32


def test_moe_gate_uses_the_activation_dtype(tiny_model):
    import copy

    moe = copy.deepcopy(tiny_model.model.layers[1].mlp).bfloat16()
    x = torch.randn(4, moe.gate.weight.shape[1]).bfloat16()
    ids, weights = moe.gate(x)
    expected = route_top_k(F.linear(x, moe.gate.weight), moe.gate.top_k, moe.gate.norm_topk_prob,
                           moe.gate.routed_scaling_factor)
    assert torch.equal(ids.sort(-1).values, expected[0].sort(-1).values) and weights.dtype == torch.float32


def test_rotary_precision_option_rounds_the_inverse_frequencies_as_the_original():
    exact = RotaryEmbedding(128, 10000.0)
    rounded = RotaryEmbedding(128, 10000.0, "bfloat16")
    inv = 1.0 / (10000.0 ** (torch.arange(0, 128, 2).float() / 128))
    assert torch.equal(exact.inverse_frequencies("cpu"), inv)
    assert torch.equal(rounded.inverse_frequencies("cpu"), inv.bfloat16().float())
    cos, _ = rounded.table(1000, "cpu", torch.float32)
    angles = 903 * inv.bfloat16().float()
    assert torch.allclose(cos[903, :64], angles.cos(), atol=1e-5)
    assert (exact.table(1000, "cpu", torch.float32)[0][903] - cos[903]).abs().max() > 0.1  # far apart at 903


def test_add_rms_norm_rounds_like_the_reference_module():
    x, residual, weight = torch.randn(3, 16).bfloat16(), torch.randn(3, 16).bfloat16(), torch.randn(16).bfloat16()
    normed, summed = add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(summed, x + residual)
    h = (x + residual).float()
    assert torch.equal(normed, weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16())


def test_routed_experts_match_each_token_through_its_experts():
    torch.manual_seed(0)
    experts, width, dim, tokens, top_k = 5, 6, 8, 7, 2
    x, w13, w2 = torch.randn(tokens, dim), torch.randn(experts, 2 * width, dim), torch.randn(experts, dim, width)
    ids, weights = torch.randint(0, experts, (tokens, top_k)), torch.rand(tokens, top_k)
    shared = torch.randn(tokens, dim)
    out = routed_experts(x, w13, w2, ids, weights, add=shared)
    for n in range(tokens):
        expected = shared[n].clone()
        for k in range(top_k):
            gate, up = (w13[ids[n, k]] @ x[n]).chunk(2)
            expected += weights[n, k] * (w2[ids[n, k]] @ (F.silu(gate) * up))
        assert torch.allclose(out[n], expected, atol=1e-4)


@torch.inference_mode()
def test_packed_prompts_over_a_paged_cache_match_the_reference_path(tiny_model, tiny_tokenizer):
    """Prefill of three packed prompts, then two decode steps over the paged cache, against each prompt
    alone through the reference path (dynamic cache, SDPA)."""
    config = tiny_model.config
    prompts = [tiny_model.prepare_inputs(tiny_tokenizer, "<image>\nFree OCR.", [document_image(w, h, seed=i)],
                                         *preset)
               for i, (w, h, preset) in enumerate([(500, 400, (512, 512, False)), (700, 1000, (1024, 640, True)),
                                                   (640, 640, (640, 640, False))])]
    embeds = [tiny_model.model.embed_prompt(p.input_ids[None], p.image_mask[None], [p.images])[0] for p in prompts]
    lengths = [e.shape[0] for e in embeds]
    block = 16
    cache = PagedKVCache(config.num_hidden_layers, 1 + sum(-(-(n + 4) // block) for n in lengths),
                         config.num_key_value_heads, config.head_dim, block, torch.float32, "cpu")
    tables, next_block = [], 1
    for n in lengths:  # scattered on purpose: each prompt's blocks are interleaved with nothing else's
        count = -(-(n + 4) // block)
        tables.append(list(range(next_block, next_block + count))[::-1])
        next_block += count
    slot = lambda row, pos: tables[row][pos // block] * block + pos % block  # noqa: E731
    tiny_model.model.rotary.table(4096, "cpu", torch.float32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    slots = torch.tensor([slot(r, p) for r, n in enumerate(lengths) for p in range(n)])
    cache.batch = PagedBatch(positions=positions, slots=slots, prompt_lengths=tuple(lengths))
    last = torch.tensor(lengths).cumsum(0) - 1
    logits = tiny_model.forward_paged(torch.cat(embeds), cache, last)
    references = []
    for row, p in enumerate(prompts):
        reference_cache = KVCache(config.num_hidden_layers)
        hidden = tiny_model.model.decode(embeds[row][None], cache=reference_cache)
        references.append(reference_cache)
        expected = tiny_model.lm_head(hidden[0, -1])
        assert (logits[row] - expected).norm() / expected.norm() < 1e-5
    tokens = logits.argmax(-1)
    table = torch.zeros(3, max(len(t) for t in tables), dtype=torch.int32)
    for row, t in enumerate(tables):
        table[row, :len(t)] = torch.tensor(t)
    current = torch.tensor(lengths)
    for _ in range(2):
        cache.batch = PagedBatch(positions=current, slots=torch.tensor([slot(r, int(current[r])) for r in range(3)]),
                                 block_tables=table, seq_lens=(current + 1).int())
        step = tiny_model.forward_paged(tiny_model.model.embed_tokens(tokens), cache)
        for row in range(3):
            hidden = tiny_model.model.decode(tiny_model.model.embed_tokens(tokens[row:row + 1])[None],
                                             cache=references[row])
            expected = tiny_model.lm_head(hidden[0, -1])
            assert (step[row] - expected).norm() / expected.norm() < 1e-5
        tokens, current = step.argmax(-1), current + 1
