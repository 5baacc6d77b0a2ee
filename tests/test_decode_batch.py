"""The decode batch sizes its own KV cache from the memory budget (`DecodeBatch.within_budget`), on the tiny
checkpoint: on the CPU from the cache's own budget; on a GPU from what the weights, the work beside the decode
and the largest prefill leave, here run on the CPU with the allocator's counters stood in for (the
arithmetic and every line of that path; the real measurement is the device's)."""

import math

import pytest
import torch

import checkpoints
from checkpoints.generation import LOOP_STOP_OFF, SERVING_NO_REPEAT_RULE
from ocr_service.decode_batch import DecodeBatch, MemoryBudget
from ocr_service.prefill_graphs import fixed_bytes

BLOCK, ROWS, LONGEST, GROWTH = 64, 4, 1024, 17
OPTIONS = dict(repetition=SERVING_NO_REPEAT_RULE, loop_rule=LOOP_STOP_OFF, eos_token_id=1)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return checkpoints.DeepseekOCRForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()


def block_bytes(model) -> int:
    config = model.config
    return 2 * config.num_hidden_layers * config.num_key_value_heads * BLOCK * config.head_dim * 4


def within(model, budget, prefill_tokens=512, other_work=lambda: None, **options):
    return DecodeBatch.within_budget(model, budget, BLOCK, ROWS, LONGEST, GROWTH, prefill_tokens, other_work,
                                     **OPTIONS, **options)


def test_on_the_cpu_the_cache_takes_its_own_budget_and_never_more_than_every_row_at_its_longest(model):
    batch = within(model, MemoryBudget(cpu_cache_gib=7 * block_bytes(model) / 2**30))
    assert batch.num_blocks == 7 and batch.block_bytes == block_bytes(model)
    assert batch.cache.num_blocks == 8  # and the scratch block
    roomy = within(model, MemoryBudget(cpu_cache_gib=1.0))
    assert roomy.num_blocks == ROWS * math.ceil(LONGEST / BLOCK)
    with pytest.raises(RuntimeError, match="DEEPSEEK_OCR_CPU_CACHE_GIB=.* too few for any page; raise it"):
        within(model, MemoryBudget(cpu_cache_gib=0.5 * block_bytes(model) / 2**30))  # not one block


class Allocator:
    """torch.cuda's counters for a process whose weights take `base` bytes, whose work beside the decode peaks at
    `beside` and whose largest prefill at `prefill` beyond its own cache (what `within_budget` reads)."""

    def __init__(self, monkeypatch, base: int, beside: int, prefill: int):
        self.peaks = iter([base + beside, None])
        self.base, self.prefill, self.cap, self.calls = base, prefill, None, []
        for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
            monkeypatch.setattr(torch.cuda, name, lambda *unused: None)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *unused: self.base)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", self.max_memory_allocated)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                            lambda fraction, device: setattr(self, "cap", (fraction, device)))
        self.prefill_cache = None

    def max_memory_allocated(self, *unused):
        peak = next(self.peaks)
        if peak is None:  # after the prefill: its own cache is counted apart by the caller
            return self.base + self.prefill + self.prefill_cache
        return peak


def test_on_a_gpu_the_cache_takes_what_the_weights_the_work_beside_and_the_largest_prefill_leave(model,
                                                                                                    monkeypatch):
    GiB = 2**30
    allocator = Allocator(monkeypatch, base=10 * GiB, beside=3 * GiB, prefill=2 * GiB)
    allocator.prefill_cache = (math.ceil(512 / BLOCK) + 1) * block_bytes(model)  # the prefill's own cache
    ran = []
    # 15 GiB of weights and work, the prefill graphs' fixed buffers, 5 GiB of headroom, and room for 30.5 blocks
    # (fewer than every row at its longest); "padded" lays the prefill out as its graphs do, on the CPU
    graphs = fixed_bytes(model, ROWS, 512)
    budget = MemoryBudget(cpu_cache_gib=1.0, gpu_gib=20 + (graphs + 30.5 * block_bytes(model)) / GiB,
                          card_bytes=200 * GiB)
    batch = within(model, budget, 512, other_work=lambda: ran.append("vision"), prefill_mode="padded")
    assert batch.prefill.mode == "padded"
    assert ran == ["vision"]  # the work beside the decode ran once, measured
    assert batch.num_blocks == 30 < ROWS * math.ceil(LONGEST / BLOCK)
    assert allocator.cap == (pytest.approx(budget.gpu_gib / 200), 0)  # the budget is the allocator's cap


def test_a_prefill_that_is_called_leaves_its_graphs_buffers_to_the_cache(model, monkeypatch):
    GiB = 2**30
    graphs = fixed_bytes(model, ROWS, 512)
    assert graphs > block_bytes(model)  # what the test tells apart: a block or more
    budget = MemoryBudget(cpu_cache_gib=1.0, gpu_gib=20 + (graphs + 30.5 * block_bytes(model)) / GiB,
                          card_bytes=200 * GiB)
    blocks = {}
    for mode in ("padded", "exact"):
        allocator = Allocator(monkeypatch, base=10 * GiB, beside=3 * GiB, prefill=2 * GiB)
        allocator.prefill_cache = (math.ceil(512 / BLOCK) + 1) * block_bytes(model)
        blocks[mode] = within(model, budget, 512, prefill_mode=mode).num_blocks
    assert blocks["padded"] == 30
    assert blocks["exact"] == math.floor(30.5 + graphs / block_bytes(model))
    # on the CPU, with nothing asked, the prefill is called: the same as "exact"
    allocator = Allocator(monkeypatch, base=10 * GiB, beside=3 * GiB, prefill=2 * GiB)
    allocator.prefill_cache = (math.ceil(512 / BLOCK) + 1) * block_bytes(model)
    assert within(model, budget, 512).num_blocks == blocks["exact"]


def test_a_gpu_budget_that_leaves_no_cache_names_the_setting_to_raise(model, monkeypatch):
    GiB = 2**30
    allocator = Allocator(monkeypatch, base=10 * GiB, beside=3 * GiB, prefill=2 * GiB)
    allocator.prefill_cache = (math.ceil(512 / BLOCK) + 1) * block_bytes(model)
    with pytest.raises(RuntimeError, match=r"DEEPSEEK_OCR_GPU_MEMORY_GIB=20 leaves no room for the KV cache \(the "
                                           r"model and its work need 15.0 GiB\): raise it"):
        within(model, MemoryBudget(cpu_cache_gib=1.0, gpu_gib=20, card_bytes=200 * GiB))


def test_a_gpu_budget_is_never_more_than_most_of_the_card(model, monkeypatch):
    GiB = 2**30
    allocator = Allocator(monkeypatch, base=1 * GiB, beside=0, prefill=0)
    allocator.prefill_cache = (math.ceil(512 / BLOCK) + 1) * block_bytes(model)
    within(model, MemoryBudget(cpu_cache_gib=1.0, gpu_gib=500, card_bytes=100 * GiB))
    assert allocator.cap == (pytest.approx(0.92), 0)
