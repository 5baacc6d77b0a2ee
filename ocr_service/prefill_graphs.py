"""The batched prefill that admits sequences, on CUDA as CUDA graphs: one for each count of packed tokens.

Inside a job the prefill's launches were what it waited for, not the GPU: a 12-page prefill is ~360
kernels and ~1,340 operations on the host, and with the preprocessing and vision threads taking turns at
the interpreter its range stayed open 209 ms for 115 ms of kernels (h200-2026-12-02e call 4). A graph
replays all of it in one launch.

A graph is captured for a number of tokens (a bucket: steps of 256 up to 2,048, then of 1,024, up to the
prefill budget). The prompts are packed at the front of the bucket's fixed input and the rest is padding,
one more prompt of its own: its tokens sit at position 0, write their keys and values into the scratch
block (block 0, owned by nobody, as the decode step's empty rows do), attend among themselves only, and
their rows are computed and thrown away. A token's results do not depend on the other tokens in a pass
(the prompts' attention is confined to each prompt by the kernel's table, every other layer works on
rows), so the pages' logits are those of the exact pass. The prompts' bounds, positions and cache slots
go up in one copy into the graphs' fixed integers; the logits of each prompt's last token come back in
one fixed [max_prompts, V] output (read before the next pass: the same stream orders it).

Passes beyond the largest bucket (one long resumed sequence beyond a small budget), and every pass off
CUDA, run as they are ("exact"). "padded" runs the graphs' layout without capturing: the tests check
on the CPU that it gives the exact pass's logits.
"""

from typing import Optional

import torch

from checkpoints.paged_attention import PagedBatch, PagedKVCache
from checkpoints.triton_attention import prefill_work, prefill_work_rows

MODES = ("exact", "padded", "graphs")
# (up to this many tokens, buckets in steps of this many): a page alone is ~920 tokens (one of 1,024, 10%
# padding), a pass of a job's pages ~13,000 (one of 13,312, 2%).
BUCKET_STEPS = ((2048, 256), (None, 1024))
CAPTURE_PROMPT_TOKENS = 1024  # the prompts of the dummy pass a graph is captured with (any would do)


def integer_count(bucket: int, max_prompts: int) -> int:
    """The fixed integers of a bucket's pass: each token's position and slot, each prompt's last token, the
    attention kernel's work rows (the padding is a prompt of its own)."""
    return 2 * bucket + max_prompts + 3 * prefill_work_rows(bucket, max_prompts + 1)


def fixed_bytes(model, max_prompts: int, max_tokens: int) -> int:
    """GPU bytes of the graphs' fixed inputs and output, beside their pool (which holds what an eager pass of
    `max_tokens` tokens would take at its peak)."""
    config = model.config
    embeds = max_tokens * config.hidden_size * model.lm_head.weight.element_size()
    return embeds + 8 * integer_count(max_tokens, max_prompts) + 4 * max_prompts * config.vocab_size


def token_buckets(max_tokens: int) -> tuple:
    """The token counts graphs are captured for, the last one `max_tokens` itself."""
    buckets, tokens = [], 0
    for up_to, step in BUCKET_STEPS:
        while tokens + step < max_tokens and (up_to is None or tokens + step <= up_to):
            tokens += step
            buckets.append(tokens)
    return tuple(buckets) + (max_tokens,)


class PrefillGraphs:
    """Packed prompts through the model over the paged cache → the logits of each prompt's last token."""

    def __init__(self, model, cache: PagedKVCache, max_prompts: int, max_tokens: int, mode: str = "exact"):
        if mode not in MODES:
            raise ValueError(f"prefill mode must be one of {MODES}, not {mode!r}")
        self.model, self.cache, self.mode = model, cache, mode
        self.max_prompts = max_prompts
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.buckets = token_buckets(max_tokens) if max_tokens else ()
        if mode != "exact" and not self.buckets:
            raise ValueError(f"prefill mode {mode!r} needs the most tokens of a pass (max_tokens)")
        self._graphs: dict = {}  # bucket → CUDA graph
        self._pool = None
        if mode != "exact":  # the fixed inputs and output every bucket's graph reads and writes (views of them)
            largest = self.buckets[-1]
            self.embeds = torch.zeros(largest, model.config.hidden_size, dtype=self.dtype, device=self.device)
            self.integers = torch.zeros(self._integer_count(largest), dtype=torch.long, device=self.device)
            # One output for all: an output allocated in each capture would stay apart from the shared pool
            # ([max_prompts, V] float32: 66 MB at 128 rows, for each of ~20 buckets).
            self.logits = torch.zeros(max_prompts, model.config.vocab_size, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ layout of a bucket's fixed inputs

    def _work_rows(self, bucket: int) -> int:
        return prefill_work_rows(bucket, self.max_prompts + 1)  # the padding is a prompt of its own

    def _integer_count(self, bucket: int) -> int:
        return integer_count(bucket, self.max_prompts)

    def _views(self, bucket: int) -> tuple:
        """(positions [bucket], slots [bucket], last tokens [max_prompts], work [rows, 3]): views of the one
        buffer the host's integers are copied into, laid out for this bucket."""
        positions, slots, last, work = self.integers[:self._integer_count(bucket)].split(
            [bucket, bucket, self.max_prompts, 3 * self._work_rows(bucket)])
        return positions, slots, last, work.view(-1, 3)

    def bucket_for(self, tokens: int, prompts: int) -> Optional[int]:
        """The bucket a pass of `prompts` prompts of `tokens` tokens in all runs in (None: run it exactly)."""
        if self.mode == "exact" or prompts > self.max_prompts or tokens > self.buckets[-1]:
            return None
        return next(bucket for bucket in self.buckets if bucket >= tokens)

    def _host_integers(self, bucket: int, lengths: list, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The bucket's integers on the host, in `_views`' layout: the prompts', then the padding's."""
        tokens = sum(lengths)
        padding = bucket - tokens
        block_size = self.cache.block_size
        last = torch.zeros(self.max_prompts, dtype=torch.long)
        last[:len(lengths)] = torch.tensor(lengths).cumsum(0) - 1
        work = prefill_work(list(lengths) + ([padding] if padding else []), rows=self._work_rows(bucket))
        return torch.cat([positions, torch.zeros(padding, dtype=torch.long),
                          slots, torch.arange(padding) % block_size,  # the scratch block's slots
                          last, work.reshape(-1)])

    # ------------------------------------------------------------------ running a pass

    def run(self, parts: list, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Prompts' embeddings `parts` ([L_i, D] each, on the device), their tokens' positions and cache slots
        (host int64 [ΣL_i] each) → float32 logits [n, V] of each prompt's last token."""
        lengths = [part.shape[0] for part in parts]
        tokens = sum(lengths)
        bucket = self.bucket_for(tokens, len(lengths))
        if bucket is None:
            last = torch.tensor(lengths).cumsum(0) - 1
            host = torch.cat([positions, slots, last])
            uploaded = upload(host, self.device)
            positions, slots, last = uploaded.split([tokens, tokens, len(lengths)])
            self.cache.batch = PagedBatch(positions=positions, slots=slots, prompt_lengths=tuple(lengths))
            return self.model.forward_paged(torch.cat(parts).to(self.dtype), self.cache, last)
        if self.mode == "graphs" and bucket not in self._graphs:
            self._capture(bucket)  # before the inputs are written: the capture runs on inputs of its own
        integers = self.integers[:self._integer_count(bucket)]
        integers.copy_(_pinned(self._host_integers(bucket, lengths, positions, slots), self.device), non_blocking=True)
        torch.cat([part.to(self.dtype) for part in parts], out=self.embeds[:tokens])
        self.embeds[tokens:bucket].zero_()
        if self.mode == "graphs":
            self._graphs[bucket].replay()
        else:
            padding = bucket - tokens
            self._forward(bucket, tuple(lengths) + ((padding,) if padding else ()))
        return self.logits[:len(lengths)]

    def _forward(self, bucket: int, lengths: tuple) -> None:
        """The bucket's pass from its fixed inputs into `logits` (`lengths`: the prompts' and the padding's,
        for the definition's attention off CUDA; the kernel reads the table)."""
        positions, slots, last, work = self._views(bucket)
        self.cache.batch = PagedBatch(positions=positions, slots=slots, prompt_lengths=lengths, work=work)
        self.logits.copy_(self.model.forward_paged(self.embeds[:bucket], self.cache, last))

    # ------------------------------------------------------------------ capture

    def _capture(self, bucket: int) -> None:
        """Capture the bucket's pass, run on dummy prompts first (the kernels compiled, the memory in the pool):
        every token writes into the scratch block, so the cache is untouched."""
        lengths = [CAPTURE_PROMPT_TOKENS] * (bucket // CAPTURE_PROMPT_TOKENS)
        lengths += [bucket % CAPTURE_PROMPT_TOKENS] if bucket % CAPTURE_PROMPT_TOKENS else []
        lengths = lengths[:self.max_prompts]
        lengths[-1] += bucket - sum(lengths)
        scratch = torch.arange(bucket) % self.cache.block_size
        host = self._host_integers(bucket, lengths, torch.zeros(bucket, dtype=torch.long), scratch)
        self.integers[:host.numel()].copy_(host.to(self.device))
        self.embeds[:bucket].zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(bucket, tuple(lengths))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._forward(bucket, tuple(lengths))
        self._pool = graph.pool()
        self._graphs[bucket] = graph

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every bucket up front (at load time), the largest first: the others reuse its pool's memory."""
        if self.mode == "graphs":
            for bucket in reversed(self.buckets):
                if bucket not in self._graphs:
                    self._capture(bucket)
        return len(self._graphs)


def _pinned(host: torch.Tensor, device) -> torch.Tensor:
    return host.pin_memory() if torch.device(device).type == "cuda" else host


def upload(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on the device, without waiting for the stream's queued kernels (from pinned memory:
    `DecodeBatch.admit` says why)."""
    return _pinned(host, device).to(device, non_blocking=True)
