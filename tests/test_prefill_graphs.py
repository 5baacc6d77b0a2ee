"""The batched prefill in the layout of its CUDA graphs (`ocr_service/prefill_graphs.py`), run without capturing on
the tiny checkpoint on the CPU: prompts packed at the front of a bucket's fixed inputs, the rest padding, give the
logits and cache of the exact pass, and the padding writes only into the scratch block. (Capture and replay need
a GPU: the device's runs take that path.)"""

import pytest
import torch

import checkpoints
from checkpoints.paged_attention import PagedKVCache
from ocr_service.prefill_graphs import PrefillGraphs, token_buckets

BLOCK = 16


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return checkpoints.DeepseekOCRForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()


def fresh_cache(model, blocks=40):
    config = model.config
    model.model.rotary.table(1024, "cpu", torch.float32)
    return PagedKVCache(config.num_hidden_layers, blocks, config.num_key_value_heads, config.head_dim, BLOCK,
                        torch.float32, "cpu")


def prompts(model, lengths, first_block=1, seed=3):
    """Embeddings of prompts of these lengths, their positions and their cache slots (each prompt in blocks of
    its own from `first_block`, never block 0)."""
    generator = torch.Generator().manual_seed(seed)
    parts, positions, slots, block = [], [], [], first_block
    for length in lengths:
        parts.append(torch.randn(length, model.config.hidden_size, generator=generator) * 0.5)
        span = torch.arange(length)
        positions.append(span)
        slots.append(block * BLOCK + span)
        block += -(-length // BLOCK)
    return parts, torch.cat(positions), torch.cat(slots)


def test_buckets_step_by_256_then_by_1024_and_end_at_the_budget():
    assert token_buckets(16384) == (256, 512, 768, 1024, 1280, 1536, 1792, 2048) + tuple(range(3072, 16385, 1024))
    assert token_buckets(1000) == (256, 512, 768, 1000)
    assert token_buckets(2500) == (256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2500)


@torch.inference_mode()
def test_the_padded_layout_gives_the_exact_passs_logits_and_cache(model):
    lengths = [37, 1, 100, 64]  # 202 tokens: the bucket of 256, 54 of them padding
    parts, positions, slots = prompts(model, lengths)
    exact_cache, padded_cache = fresh_cache(model), fresh_cache(model)
    exact = PrefillGraphs(model, exact_cache, max_prompts=6, max_tokens=2048, mode="exact")
    padded = PrefillGraphs(model, padded_cache, max_prompts=6, max_tokens=2048, mode="padded")
    assert padded.bucket_for(sum(lengths), len(lengths)) == 256
    assert exact.bucket_for(sum(lengths), len(lengths)) is None
    expected = exact.run(parts, positions, slots).clone()
    got = padded.run(parts, positions, slots)
    assert got.shape == expected.shape == (len(lengths), model.config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # Every prompt's keys and values where they belong, and the padding's nowhere but in the scratch block.
    for stored_padded, stored_exact in ((padded_cache.keys, exact_cache.keys), (padded_cache.values, exact_cache.values)):
        torch.testing.assert_close(stored_padded[:, 1:], stored_exact[:, 1:], rtol=1e-5, atol=1e-5)
    # A second pass of other lengths through the same fixed inputs: nothing of the first one is left in them.
    lengths = [5, 230]
    parts, positions, slots = prompts(model, lengths, seed=4)
    expected = exact.run(parts, positions, slots).clone()
    torch.testing.assert_close(padded.run(parts, positions, slots), expected, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_a_pass_no_bucket_holds_runs_exactly(model):
    graphs = PrefillGraphs(model, fresh_cache(model), max_prompts=2, max_tokens=256, mode="padded")
    assert graphs.bucket_for(257, 1) is None  # more tokens than the largest bucket
    assert graphs.bucket_for(30, 3) is None  # more prompts than rows
    lengths = [200, 57]
    parts, positions, slots = prompts(model, lengths)
    expected = PrefillGraphs(model, fresh_cache(model), 2, 256, mode="exact").run(parts, positions, slots)
    torch.testing.assert_close(graphs.run(parts, positions, slots), expected, rtol=0, atol=0)


def test_an_unknown_mode_is_refused(model):
    with pytest.raises(ValueError, match="prefill mode must be one of"):
        PrefillGraphs(model, fresh_cache(model), 2, 256, mode="eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (the device runs this)")
@torch.inference_mode()
def test_on_a_gpu_the_replayed_graph_gives_the_called_passs_tokens(tiny_checkpoint):
    """Captured and replayed, twice with other prompts through the same graphs, against the pass called as it is
    (bf16: the padded GEMMs may take other tiles, so the logits agree to bf16's precision)."""
    model = checkpoints.DeepseekOCRForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.bfloat16)
    model = model.eval().cuda()
    config = model.config
    model.model.rotary.table(1024, "cuda", torch.bfloat16)

    def cache():
        return PagedKVCache(config.num_hidden_layers, 64, config.num_key_value_heads, config.head_dim, BLOCK,
                            torch.bfloat16, "cuda")  # the prompts below take blocks 1-41

    graphed = PrefillGraphs(model, cache(), max_prompts=6, max_tokens=1024, mode="graphs")
    assert graphed.capture_all() == len(graphed.buckets)
    for lengths, seed in (([37, 1, 100, 64], 3), ([5, 230, 400], 4)):
        parts, positions, slots = prompts(model, lengths, seed=seed)
        parts = [part.to("cuda", torch.bfloat16) for part in parts]
        expected = PrefillGraphs(model, cache(), 6, 1024, mode="exact").run(parts, positions, slots).clone()
        got = graphed.run(parts, positions, slots)
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
