"""The device side of batched decoding: the paged KV cache, the state of each decode row, the batched
prefill that admits sequences (as CUDA graphs on CUDA: `prefill_graphs.py`), and the decode step captured
as CUDA graphs.

A decode step runs the model's own modules (`DeepseekOCRForCausalLM.forward_paged`) on one token per
row, then the repetition guard, the greedy choice, the loop detector and the stop checks, all on the
device from fixed buffers: on CUDA it is captured once per batch size and replayed, so a token costs
one graph replay and the host only looks at the rows every `sync_every` steps. Which page is in which
row, and which blocks it owns, is decided by the scheduling policy; this object only holds tensors.

Rows past the live ones in a step's batch size, and rows whose sequence has stopped, must never touch
another sequence's blocks: an empty row's block table is all block 0 (the scratch block, owned by
nobody), and a stopped row stays at its last position, rewriting its own last slot.

Shapes in comments: R rows, S positions per sequence, V vocabulary, D hidden.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from checkpoints.generation import (
    STOP_EOS, STOP_MAX_NEW_TOKENS, STOP_REPETITION, BatchedLoopDetector, LoopDetector, LoopStopRule, NoRepeatNGramRule,
    greedy_tokens, mask_repeated_ngrams,
)
from checkpoints.paged_attention import PagedBatch, PagedKVCache

from .prefill_graphs import PrefillGraphs, fixed_bytes as prefill_fixed_bytes, upload

# Each row's stop state on the device is an int: RUNNING, or the code of the reason it stopped. The host
# only ever sees the reasons (`RowState.stop_reason`).
RUNNING = 0
STOP_CODES = {STOP_EOS: 1, STOP_MAX_NEW_TOKENS: 2, STOP_REPETITION: 3}
REASON_OF_CODE = {code: reason for reason, code in STOP_CODES.items()}

# Batch sizes a decode step is captured for: a step runs the smallest one that holds every live row.
BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass
class Entry:
    """A sequence to admit into `row`: its prompt embeddings and ids, and the tokens it resumes from."""

    row: int
    embeds: torch.Tensor  # [P, D] prompt embeddings (images included), on the device
    prompt_ids: torch.Tensor  # [P] long
    blocks: list  # cache blocks it owns, in order
    max_new_tokens: int
    generated_tokens: list  # the tokens it already has (resuming after a preemption), else empty


@dataclass
class MemoryBudget:
    """What the decode batch's KV cache may take. On a GPU (`gpu_gib` set): the process's whole budget there,
    weights and the largest vision pass and prefill included, on a card of `card_bytes`; on the CPU:
    `cpu_cache_gib` of cache."""

    cpu_cache_gib: float
    gpu_gib: Optional[float] = None
    card_bytes: Optional[int] = None
    # Kept free beyond the measured peak: the captured graphs' buffers, and what the caching allocator holds
    # beyond what is allocated, which grows with two streams allocating side by side (sized from what a long
    # many-page job reserved beyond its allocations).
    headroom_gib: float = 5.0


@dataclass
class RowState:
    """What the host reads of a row at a synchronisation point."""

    cache_length: int  # positions held in the cache
    stop_reason: Optional[str]  # None while running, else why it stopped (checkpoints.generation's STOP_*)


class DecodeBatch:
    def __init__(self, model, num_blocks: int, block_size: int, max_rows: int, max_seq_len: int,
                 repetition: NoRepeatNGramRule, loop_rule: LoopStopRule, eos_token_id: int,
                 use_cuda_graphs: Optional[bool] = None, prefill_tokens: Optional[int] = None,
                 prefill_mode: Optional[str] = None):
        """`prefill_tokens`: the most tokens of one batched prefill, whose passes then run as CUDA graphs
        (with `use_cuda_graphs`); `prefill_mode` overrides that choice (`PrefillGraphs`' modes)."""
        config = model.config
        self.model = model
        self.num_blocks = num_blocks  # of the cache's pool (block 0, the scratch block, beside them)
        self.block_bytes = _block_bytes(model, block_size)
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.max_rows, self.max_seq_len, self.block_size = max_rows, max_seq_len, block_size
        self.cache = PagedKVCache(config.num_hidden_layers, num_blocks + 1, config.num_key_value_heads,
                                  config.head_dim, block_size, self.dtype, self.device)
        self.eos = eos_token_id
        self.repetition, self.loop_rule = repetition, loop_rule
        self.loops = BatchedLoopDetector(loop_rule, max_rows, self.device) if loop_rule.enabled else None
        model.model.rotary.table(max_seq_len, self.device, self.dtype)  # graphs index a table that exists
        rows = dict(dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(max_rows, **rows)  # the next input token of each row
        self.positions = torch.zeros(max_rows, **rows)  # that token's position in its sequence (= cache length)
        self.lengths = torch.zeros(max_rows, **rows)  # tokens in history (prompt + generated)
        self.prompt_lengths = torch.zeros(max_rows, **rows)
        self.limits = torch.ones(max_rows, **rows)  # max_new_tokens
        self.stop_codes = torch.full((max_rows,), STOP_CODES[STOP_MAX_NEW_TOKENS], **rows)
        # prompt + generated ids; the last column is a sink that stopped rows write into
        self.history = torch.full((max_rows, max_seq_len + 1), -1, **rows)  # [R, S + 1]
        self.block_tables = torch.zeros(max_rows, math.ceil(max_seq_len / block_size), dtype=torch.int32,
                                        device=self.device)
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self._graphs: dict = {}
        self._pool = None
        self.prefill = PrefillGraphs(model, self.cache, max_rows, prefill_tokens or 0,
                                     self.prefill_mode(self.device, prefill_tokens, use_cuda_graphs, prefill_mode))

    @staticmethod
    def prefill_mode(device: torch.device, prefill_tokens: Optional[int], use_cuda_graphs: Optional[bool] = None,
                     prefill_mode: Optional[str] = None) -> str:
        """How the batched prefill runs (`PrefillGraphs`' modes): as `prefill_mode` asks, else as CUDA graphs
        wherever the decode step is replayed (on CUDA, unless `use_cuda_graphs` says otherwise) and a pass's
        tokens are bounded, else called."""
        if prefill_mode is not None:
            return prefill_mode
        replayed = device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        return "graphs" if replayed and prefill_tokens else "exact"

    # ------------------------------------------------------------------ the cache's size

    @classmethod
    def within_budget(cls, model, budget: MemoryBudget, block_size: int, max_rows: int, max_seq_len: int,
                      growth_tokens: int, prefill_tokens: int, other_work: Callable[[], None],
                      **batch_options) -> "DecodeBatch":
        """A batch whose KV cache takes what `budget` leaves: on a GPU, after the weights and the peak of
        `other_work()` (what runs beside the decode: the largest vision pass) and of the largest prefill
        (`prefill_tokens`), each measured by running it once (the prefill's CUDA graphs, when it is replayed,
        hold that peak in their pool, and their fixed buffers beside it), and the budget's headroom; never more than every
        row at its longest. On a GPU the budget also becomes the allocator's cap. `growth_tokens`: what a
        sequence grows by between two looks at it (a pool that cannot hold one sequence that long is refused,
        naming the setting to raise). `batch_options`: the rest of `DecodeBatch`'s arguments."""
        device = model.lm_head.weight.device
        block_bytes = _block_bytes(model, block_size)
        useful = max_rows * math.ceil(max_seq_len / block_size)  # every row at its longest
        if budget.gpu_gib is None:
            blocks = min(useful, int(budget.cpu_cache_gib * 2**30 // block_bytes))
            if blocks * block_size <= 2 * growth_tokens:
                raise RuntimeError(f"DEEPSEEK_OCR_CPU_CACHE_GIB={budget.cpu_cache_gib:g} holds {blocks} cache "
                                   f"block(s) of {block_size} positions: too few for any page; raise it")
            return cls(model, blocks, block_size, max_rows, max_seq_len, prefill_tokens=prefill_tokens,
                       **batch_options)
        limit = min(budget.gpu_gib * 2**30, 0.92 * budget.card_bytes)
        mode = cls.prefill_mode(device, prefill_tokens, batch_options.get("use_cuda_graphs"),
                                batch_options.get("prefill_mode"))
        peak = _peak_beside_cache(model, block_size, max_seq_len, prefill_tokens, other_work)
        if mode != "exact":  # the inputs and output its graphs read and write, kept for good
            peak += prefill_fixed_bytes(model, max_rows, prefill_tokens)
        blocks = min(useful, int((limit - peak - budget.headroom_gib * 2**30) // block_bytes))
        if blocks * block_size < max_seq_len + growth_tokens:
            raise RuntimeError(f"DEEPSEEK_OCR_GPU_MEMORY_GIB={budget.gpu_gib:g} leaves no room for the KV "
                               f"cache (the model and its work need {peak / 2**30:.1f} GiB): raise it")
        # What is allocated stays within the budget by the sizing above; what the caching allocator keeps
        # reserved beside it (blocks freed on one stream wait for that stream, sizes vary pass to pass) would
        # not. As a cap, the allocator gives cached blocks back rather than go beyond the budget.
        device_index = torch.cuda.current_device() if device.index is None else device.index
        torch.cuda.set_per_process_memory_fraction(limit / budget.card_bytes, device_index)
        return cls(model, blocks, block_size, max_rows, max_seq_len, prefill_tokens=prefill_tokens, **batch_options)

    # ------------------------------------------------------------------ the decode step

    def batch_size_for(self, live_rows: int) -> int:
        return next(b for b in BATCH_SIZES + (self.max_rows,) if b >= min(live_rows, self.max_rows))

    def _step(self, batch: int) -> None:
        """One token for rows 0..batch-1, entirely on the device."""
        rows = slice(0, batch)
        positions = self.positions[rows]
        block = self.block_tables[rows].gather(1, (positions // self.block_size)[:, None])[:, 0].long()
        slots = block * self.block_size + positions % self.block_size
        self.cache.batch = PagedBatch(positions=positions, slots=slots, block_tables=self.block_tables[rows],
                                      seq_lens=(positions + 1).int())
        embeds = self.model.model.embed_tokens(self.tokens[rows])
        logits = self.model.forward_paged(embeds, self.cache, float_logits=False)  # [B, V], the model's dtype
        history, lengths = self.history[rows, :-1], self.lengths[rows]
        logits = mask_repeated_ngrams(logits, history, lengths, self.prompt_lengths[rows], self.repetition,
                                      in_place=True)
        chosen = greedy_tokens(logits)  # [B]
        live = self.stop_codes[rows] == RUNNING
        sink = self.history.shape[1] - 1
        self.history[rows].scatter_(1, torch.where(live, lengths, sink)[:, None], chosen[:, None])
        self.tokens[rows] = torch.where(live, chosen, self.tokens[rows])
        step = live.long()
        self.positions[rows] += step
        self.lengths[rows] += step
        generated = self.lengths[rows] - self.prompt_lengths[rows]
        stop = torch.where(chosen == self.eos, STOP_CODES[STOP_EOS], RUNNING)
        stop = torch.where((stop == RUNNING) & (generated >= self.limits[rows]), STOP_CODES[STOP_MAX_NEW_TOKENS], stop)
        if self.loops is not None:
            looping = self.loops.update(chosen, live)
            stop = torch.where((stop == RUNNING) & looping, STOP_CODES[STOP_REPETITION], stop)
        self.stop_codes[rows] = torch.where(live, stop, self.stop_codes[rows])

    def run(self, live_rows: int, steps: int) -> None:
        """`steps` decode steps for rows 0..live_rows-1 (a captured graph's replays on CUDA)."""
        batch = self.batch_size_for(live_rows)
        if not self.use_cuda_graphs:
            for _ in range(steps):
                self._step(batch)
            return
        graph = self._graphs.get(batch)
        if graph is None:
            graph = self._graphs[batch] = self._capture(batch)
        for _ in range(steps):
            graph.replay()

    def _state(self) -> list:
        tensors = [self.tokens, self.positions, self.lengths, self.stop_codes, self.history]
        return tensors + (self.loops.tensors() if self.loops is not None else [])

    def _capture(self, batch: int):
        # Warm-up and capture run the step for real: save and restore what it changes. The cache is
        # untouched: rows past the live ones write only to the scratch block.
        saved = [t.clone() for t in self._state()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(batch)
        self._pool = graph.pool()
        for tensor, value in zip(self._state(), saved):
            tensor.copy_(value)
        return graph

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture the step for every batch size up front (at load time), so that no request pays for it.
        Every row is empty meanwhile (all blocks scratch)."""
        if self.use_cuda_graphs:
            for batch in sorted({self.batch_size_for(b) for b in BATCH_SIZES if b <= self.max_rows}):
                if batch not in self._graphs:
                    self._graphs[batch] = self._capture(batch)
        return len(self._graphs)

    # ------------------------------------------------------------------ admission (batched prefill)

    @torch.inference_mode()
    def admit(self, entries: list) -> None:
        """Prefill several sequences in one pass (their prompts packed, each attending to itself) and
        set up their rows; a fresh sequence gets its first token here.

        Nothing here waits for the device: the integers of the rows go up in one copy from pinned memory, the
        prefill's (positions, slots, its attention's table) in another (`PrefillGraphs.run`), before the prefill
        is launched, and the rows are started from device tensors. (A copy from
        pageable memory waits for every kernel queued before it on this stream; behind a vision pass on the
        other stream, each such copy waited for that pass, and admitting a dozen pages took the whole pass.)"""
        block_size, width = self.block_size, self.history.shape[1]
        packed, positions, slots = [], [], []
        tables = torch.zeros(len(entries), self.block_tables.shape[1], dtype=torch.long)
        histories = torch.full((len(entries), width), -1, dtype=torch.long)  # each row's ids, then -1
        for index, entry in enumerate(entries):
            context = entry.embeds
            if entry.generated_tokens:  # resuming: recompute the cache of the tokens it had, but the last
                resumed = self._upload(torch.tensor(entry.generated_tokens[:-1], dtype=torch.long))
                context = torch.cat([context, self.model.model.embed_tokens(resumed).to(context.dtype)])
            length = context.shape[0]
            table = torch.tensor(entry.blocks, dtype=torch.long)
            tables[index, :len(entry.blocks)] = table
            ids = torch.cat([entry.prompt_ids.long(), torch.tensor(entry.generated_tokens, dtype=torch.long)])
            histories[index, :ids.shape[0]] = ids
            span = torch.arange(length)
            slots.append(table[span // block_size] * block_size + span % block_size)
            packed.append(context)
            positions.append(span)
        prompt_lengths = torch.tensor([entry.prompt_ids.shape[0] for entry in entries])
        rows_host = torch.tensor([entry.row for entry in entries])
        columns = [tables, histories, rows_host, prompt_lengths, torch.tensor([part.shape[0] for part in packed]),
                   torch.tensor([entry.max_new_tokens for entry in entries])]
        uploaded = self._upload(torch.cat([column.reshape(-1) for column in columns]))
        tables, histories, rows, prompt_lengths, cache_lengths, limits = [
            part.view(column.shape) for part, column in zip(uploaded.split([c.numel() for c in columns]), columns)]
        self.block_tables.index_copy_(0, rows, tables.int())
        self.history.index_copy_(0, rows, histories)
        logits = self.prefill.run(packed, torch.cat(positions), torch.cat(slots))  # [n, V]
        self.prompt_lengths.index_copy_(0, rows, prompt_lengths)
        self.limits.index_copy_(0, rows, limits)
        self.positions.index_copy_(0, rows, cache_lengths)
        fresh = [index for index, entry in enumerate(entries) if not entry.generated_tokens]
        if fresh:
            if len(fresh) < len(entries):  # some resume (after a preemption: rare)
                pick = self._upload(torch.tensor(fresh))
                logits, rows, prompt_lengths, limits = (t.index_select(0, pick) for t in (logits, rows, prompt_lengths,
                                                                                          limits))
            self._start_fresh_rows(rows, logits, prompt_lengths, limits)
        for index, entry in enumerate(entries):
            if entry.generated_tokens:
                self._resume_row(entry)

    def _upload(self, host: torch.Tensor) -> torch.Tensor:
        return upload(host, self.device)

    def _start_fresh_rows(self, rows: torch.Tensor, logits: torch.Tensor, prompt_lengths: torch.Tensor,
                          limits: torch.Tensor) -> None:
        """Rows [n] just prefilled from their prompts: each row's first token from its logits [n, V] (the
        repetition guard, then the greedy choice), its lengths, loop detector and stop state."""
        logits = mask_repeated_ngrams(logits, self.history.index_select(0, rows)[:, :-1], prompt_lengths,
                                      prompt_lengths, self.repetition)
        first = logits.argmax(dim=-1)  # [n]
        self.history[rows, prompt_lengths] = first
        self.lengths.index_copy_(0, rows, prompt_lengths + 1)
        self.tokens.index_copy_(0, rows, first)
        if self.loops is not None:
            self.loops.reset(rows)
            self.loops.update(first, rows=rows)  # one token is never a loop
        stop = torch.where(first == self.eos, STOP_CODES[STOP_EOS],
                           torch.where(limits <= 1, STOP_CODES[STOP_MAX_NEW_TOKENS], RUNNING))
        self.stop_codes.index_copy_(0, rows, stop)

    def _resume_row(self, entry: Entry) -> None:
        """A row prefilled from its prompt and the tokens it had generated: its next input is the last token it
        had chosen, and its loop detector is as it was."""
        row, tokens = entry.row, entry.generated_tokens
        self.lengths[row] = entry.prompt_ids.shape[0] + len(tokens)
        self.tokens[row] = tokens[-1]
        self.stop_codes[row] = RUNNING
        self._restore_loop_state(row, tokens)

    def _restore_loop_state(self, row: int, tokens: list) -> None:
        """A resumed row's loop detector, as it was: the host detector replays the tokens and its counters
        are copied into the row (the two keep the same counters, by construction and by test)."""
        if self.loops is None:
            return
        detector = LoopDetector(self.loop_rule)
        for token in tokens:
            detector.append(token)
        device = self.device
        self.loops.recent[row] = torch.tensor(detector.recent, device=device)
        self.loops.runs[row] = torch.tensor(detector.runs[1:], device=device)
        self.loops.credits[row] = torch.tensor(detector.credits[1:], device=device)
        self.loops.generated[row] = detector.generated
        self.loops.looping[row] = detector.looping
        self.loops.keep_lengths[row] = detector.keep_length or 0

    def set_blocks(self, row: int, blocks: list) -> None:
        """A row's block table: its blocks in order, the rest the scratch block."""
        table = torch.zeros(self.block_tables.shape[1], dtype=torch.int32)
        table[:len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.block_tables[row] = self._upload(table)

    # ------------------------------------------------------------------ synchronisation points

    def read(self, live_rows: int) -> list:
        """The state of rows 0..live_rows-1, in one transfer from the device."""
        if live_rows == 0:
            return []
        if self.device.type == "cuda":
            # Wait for the queued steps with the GIL released (a blocking copy would hold it), so that the
            # vision worker's thread keeps launching meanwhile.
            torch.cuda.current_stream(self.device).synchronize()
        rows = slice(0, live_rows)
        cache_lengths, stop_codes = torch.stack([self.positions[rows], self.stop_codes[rows]]).tolist()
        return [RowState(length, REASON_OF_CODE.get(code)) for length, code in zip(cache_lengths, stop_codes)]

    def generated_tokens(self, row: int) -> list:
        """The tokens a row has generated (EOS included if it emitted one)."""
        start, end = int(self.prompt_lengths[row]), int(self.lengths[row])
        return self.history[row, start:end].tolist()

    def loop_cut(self, row: int) -> int:
        """For a row stopped for repetition: how many generated tokens to keep."""
        return int(self.loops.keep_lengths[row])

    def clear(self, row: int) -> None:
        """The row holds no sequence any more: point it at the scratch block and mark it stopped."""
        self.block_tables[row] = 0
        self.positions[row] = 0
        self.tokens[row] = 0
        self.stop_codes[row] = STOP_CODES[STOP_MAX_NEW_TOKENS]
        self.lengths[row] = 0
        self.prompt_lengths[row] = 0

    def move(self, source: int, target: int) -> None:
        """Move a sequence's row state (not its cache: blocks stay where they are) and clear the source."""
        for tensor in self._state() + [self.prompt_lengths, self.limits, self.block_tables]:
            tensor[target] = tensor[source]
        self.clear(source)


def _block_bytes(model, block_size: int) -> int:
    """Bytes of one cache block of `model`'s decoder, every layer's keys and values."""
    config = model.config
    return PagedKVCache.bytes_per_block(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                                        block_size, model.lm_head.weight.dtype)


@torch.inference_mode()
def _peak_beside_cache(model, block_size: int, max_seq_len: int, prefill_tokens: int,
                       other_work: Callable[[], None]) -> int:
    """GPU bytes the weights, `other_work()` and a prefill of `prefill_tokens` take at their peaks (the two run
    on two streams side by side: their peaks add), measured by running each on dummy inputs."""
    config = model.config
    dtype, device = model.lm_head.weight.dtype, model.lm_head.weight.device
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    other_work()
    torch.cuda.synchronize()
    beside = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    blocks = math.ceil(prefill_tokens / block_size) + 1
    cache = PagedKVCache(config.num_hidden_layers, blocks, config.num_key_value_heads, config.head_dim,
                         block_size, dtype, device)
    cache_bytes = cache.keys.numel() * cache.keys.element_size() * 2
    model.model.rotary.table(max_seq_len, device, dtype)
    lengths = [1300] * (prefill_tokens // 1300) + [prefill_tokens % 1300]
    positions = torch.cat([torch.arange(n) for n in lengths if n]).to(device)
    cache.batch = PagedBatch(positions=positions, slots=torch.arange(prefill_tokens, device=device) + block_size,
                             prompt_lengths=tuple(n for n in lengths if n))
    embeds = torch.zeros(prefill_tokens, config.hidden_size, device=device, dtype=dtype)
    model.forward_paged(embeds, cache, torch.tensor([prefill_tokens - 1], device=device))
    torch.cuda.synchronize()
    prefill = torch.cuda.max_memory_allocated() - base - cache_bytes
    del cache, embeds
    torch.cuda.empty_cache()
    return base + beside + prefill
