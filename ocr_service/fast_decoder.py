"""A fast decode path for DeepSeek-OCR's decoder: static KV cache, stacked experts, GPU n-gram guard,
and the decode step captured as a CUDA graph.

The per-token cost of the reference path is Python and kernel-launch overhead (hundreds of small
kernels, a Python loop over experts, a host-side n-gram scan). Here one decode step for a whole
batch is a fixed sequence of tensor operations on preallocated buffers, so on CUDA it is captured
once per batch size and replayed: a token costs one graph replay. The host only looks at the
results every `sync_every` steps, to retire finished sequences.

Numerics follow the reference path (same weights, same order of operations per token); on the CPU
in float32 the greedy tokens are identical to `DeepseekOCRForCausalLM.generate_tokens`.

Shapes in comments: B batch slots, T tokens, S cache length, H heads, Dh head dim, D hidden,
E routed experts, K experts per token, I expert width.
"""

from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from checkpoints.modeling_deepseekv2 import DeepseekV2MoE


@dataclass
class LayerWeights:
    wqkv: torch.Tensor  # [3·H·Dh, D]
    wo: torch.Tensor  # [D, H·Dh]
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    dense_w13: Optional[torch.Tensor] = None  # [2·I, D] gate and up projections of a dense MLP
    dense_w2: Optional[torch.Tensor] = None
    router: Optional[torch.Tensor] = None  # [E, D] float32
    experts_w13: Optional[torch.Tensor] = None  # [E, 2·I, D]
    experts_w2t: Optional[torch.Tensor] = None  # [E, I, D]
    shared_w13: Optional[torch.Tensor] = None
    shared_w2: Optional[torch.Tensor] = None


def stack_moe_weights(moe: DeepseekV2MoE):
    """Stack the experts' weights into [E, 2I, D] (gate and up) and [E, I, D] (down, transposed) and make
    each expert's parameters views of them, so the reference modules keep working and no weight is held
    twice. The transposed down weights let the K chosen experts' down projections run as one GEMV."""
    width = moe.experts[0].gate_proj.weight.shape[0]
    with torch.no_grad():
        w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in moe.experts])
        w2t = torch.stack([e.down_proj.weight.t() for e in moe.experts]).contiguous()
    for i, expert in enumerate(moe.experts):
        expert.gate_proj.weight = torch.nn.Parameter(w13[i, :width], requires_grad=False)
        expert.up_proj.weight = torch.nn.Parameter(w13[i, width:], requires_grad=False)
        expert.down_proj.weight = torch.nn.Parameter(w2t[i].t(), requires_grad=False)
    return w13, w2t


def gated_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ w13.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.t()


class FastDecoder:
    """Decoder layers over a static KV cache of `max_batch` slots × `max_seq_len` positions."""

    def __init__(self, model, max_batch: int, max_seq_len: int, use_cuda_graphs: Optional[bool] = None):
        self.model = model
        config = model.config
        self.config = config
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.kv_heads = config.num_key_value_heads
        self.top_k = config.num_experts_per_tok
        self.layers = [self._layer_weights(layer) for layer in model.model.layers]
        moe = next((w for w in self.layers if w.router is not None), None)
        if moe is not None:  # room for the most (token, expert) pairs the gather path handles
            rows = moe.experts_w13.shape[0] - 1
            self._w13_buffer = moe.experts_w13.new_empty((rows,) + moe.experts_w13.shape[1:])
            self._w2_buffer = moe.experts_w2t.new_empty((rows,) + moe.experts_w2t.shape[1:])
        cache_shape = (len(self.layers), max_batch, self.kv_heads, max_seq_len, self.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
        inv_freq = 1.0 / (config.rope_theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=self.device).float() / self.head_dim))
        freqs = torch.arange(max_seq_len, device=self.device).float()[:, None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos_table, self.sin_table = emb.cos().to(self.dtype), emb.sin().to(self.dtype)  # [S, Dh]
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs

    def _layer_weights(self, layer) -> LayerWeights:
        attn = layer.self_attn
        weights = LayerWeights(
            wqkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
            wo=attn.o_proj.weight.detach(),
            input_norm=layer.input_layernorm.weight.detach(),
            post_norm=layer.post_attention_layernorm.weight.detach(),
        )
        mlp = layer.mlp
        if isinstance(mlp, DeepseekV2MoE):
            weights.router = mlp.gate.weight.detach().float()
            weights.experts_w13, weights.experts_w2t = stack_moe_weights(mlp)
            if mlp.shared_experts is not None:
                shared = mlp.shared_experts
                weights.shared_w13 = torch.cat([shared.gate_proj.weight, shared.up_proj.weight]).detach()
                weights.shared_w2 = shared.down_proj.weight.detach()
        else:
            weights.dense_w13 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
            weights.dense_w2 = mlp.down_proj.weight.detach()
        return weights

    # ------------------------------------------------------------------ layer math

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight * x32.to(x.dtype)

    def _moe(self, x: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        # x: [N, D]. Few tokens read only their chosen experts, copied into one reused buffer (a CUDA graph
        # then holds no per-layer copies); many tokens run every expert once on all of them and weight the
        # results, which reads each expert's weights once.
        scores = F.linear(x.float(), w.router).softmax(dim=-1)  # [N, E]
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # [N, K]
        topk_weight = topk_weight * self.config.routed_scaling_factor
        tokens, num_experts = x.shape[0], w.experts_w13.shape[0]
        width = w.experts_w2t.shape[1]
        if tokens * self.top_k < num_experts:
            rows = tokens * self.top_k
            chosen = topk_idx.reshape(-1)  # [R]
            w13 = torch.index_select(w.experts_w13, 0, chosen, out=self._w13_buffer[:rows])  # [R, 2I, D]
            gate_up = torch.bmm(w13.view(tokens, -1, x.shape[1]), x[:, :, None])  # [N, K·2I, 1]
            gate, up = gate_up.view(tokens, self.top_k, -1).chunk(2, dim=-1)  # [N, K, I] each
            hidden = (F.silu(gate) * up * topk_weight.unsqueeze(-1).to(x.dtype)).reshape(tokens, 1, -1)
            w2t = torch.index_select(w.experts_w2t, 0, chosen, out=self._w2_buffer[:rows])  # [R, I, D]
            routed = torch.bmm(hidden, w2t.view(tokens, self.top_k * width, -1))[:, 0]  # [N, D]
        else:
            dense_weight = torch.zeros_like(scores).scatter_(1, topk_idx, topk_weight)  # [N, E]
            gate, up = torch.matmul(x, w.experts_w13.transpose(1, 2)).chunk(2, dim=-1)  # [E, N, I] each
            hidden = F.silu(gate) * up * dense_weight.t().unsqueeze(-1).to(x.dtype)
            hidden = hidden.transpose(0, 1).reshape(tokens, -1)  # [N, E·I]
            routed = hidden @ w.experts_w2t.view(-1, w.experts_w2t.shape[-1])  # [N, D]
        routed = routed.to(x.dtype)
        if w.shared_w13 is not None:
            routed = routed + gated_mlp(x, w.shared_w13, w.shared_w2)
        return routed

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                attend_len: Optional[int], causal_prefill: bool) -> torch.Tensor:
        """x [B, T, D] at `positions` [B, T] of cache rows `slots` [B] → hidden states [B, T, D].

        Prefill (one sequence, T tokens) attends causally among its own tokens; decode (T = 1) runs
        slots 0..B-1 and each attends to its cache row up to its own position.
        """
        batch, length, _ = x.shape
        cos = self.cos_table[positions].unsqueeze(1)  # [B, 1, T, Dh]
        sin = self.sin_table[positions].unsqueeze(1)
        if causal_prefill:
            mask = None
        else:  # decode: each slot sees its cache up to its own position
            span = torch.arange(attend_len, device=x.device)
            mask = (span[None, :] <= positions[:, -1:])[:, None, None, :]  # [B, 1, 1, S]
        rows = slots[:, None].expand(batch, length)
        for index, w in enumerate(self.layers):
            h = self._rms_norm(x, w.input_norm)
            q, k, v = (h @ w.wqkv.t()).split(
                [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
            q = self._rotate(q.view(batch, length, self.heads, -1).transpose(1, 2), cos, sin)
            k = self._rotate(k.view(batch, length, self.kv_heads, -1).transpose(1, 2), cos, sin)
            v = v.view(batch, length, self.kv_heads, -1).transpose(1, 2)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]  # [slots, H, S, Dh]
            k_cache[rows, :, positions] = k.transpose(1, 2)
            v_cache[rows, :, positions] = v.transpose(1, 2)
            if causal_prefill:
                keys, values = k, v
            else:  # a view of the first B rows, not a gathered copy
                keys, values = k_cache[:batch, :, :attend_len], v_cache[:batch, :, :attend_len]
            if self.kv_heads != self.heads:
                keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
                values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal_prefill)
            x = x + attn.transpose(1, 2).reshape(batch, length, -1) @ w.wo.t()
            h = self._rms_norm(x, w.post_norm)
            if w.router is not None:
                x = x + self._moe(h.reshape(batch * length, -1), w).view(batch, length, -1)
            else:
                x = x + gated_mlp(h, w.dense_w13, w.dense_w2)
        return self.model.model.norm(x)

    # ------------------------------------------------------------------ prefill and decode

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, slot: int) -> torch.Tensor:
        """Fill cache row `slot` with a prompt's embeddings [T, D]; returns the last position's logits [V]."""
        length = embeds.shape[0]
        if length >= self.max_seq_len:
            raise ValueError(f"prompt of {length} tokens does not fit the cache of {self.max_seq_len}")
        positions = torch.arange(length, device=self.device)[None]
        slots = torch.tensor([slot], device=self.device)
        hidden = self._layers(embeds[None].to(self.dtype), positions, slots, None, causal_prefill=True)
        return self.model.lm_head(hidden[0, -1]).float()

    def move_slot(self, source: int, target: int) -> None:
        """Copy a sequence's cache row (used to keep active sequences in the first rows)."""
        self.k_cache[:, target] = self.k_cache[:, source]
        self.v_cache[:, target] = self.v_cache[:, source]

    def decode_logits(self, tokens: torch.Tensor, positions: torch.Tensor, attend_len: int) -> torch.Tensor:
        """One decode step for slots 0..B-1: tokens [B] at positions [B] → logits [B, V] (float32)."""
        batch = tokens.shape[0]
        slots = torch.arange(batch, device=self.device)
        x = self.model.model.embed_tokens(tokens)[:, None]
        hidden = self._layers(x, positions[:, None], slots, attend_len, causal_prefill=False)
        return self.model.lm_head(hidden[:, 0]).float()


class NgramBanGPU:
    """The no-repeat n-gram rule on a [B, S] token history, as tensor ops with no host synchronisation.

    A token t is banned for row b when some earlier window history[b, j : j+n-1] equals the row's last
    n-1 tokens and history[b, j+n-1] = t (with j+n-1 < length). Unused history is padded with -1.
    """

    def __init__(self, n: int):
        self.n = n

    def apply(self, logits: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        n = self.n
        if n <= 0 or history.shape[1] < n:
            return logits
        batch, size = history.shape
        idx = (lengths[:, None] - (n - 1) + torch.arange(n - 1, device=history.device)).clamp(min=0)
        last = history.gather(1, idx)  # [B, n-1]
        windows = history.unfold(1, n - 1, 1)[:, : size - n + 1]  # [B, S-n+1, n-1] starting at j
        followers = history[:, n - 1:]  # [B, S-n+1] token after each window
        starts = torch.arange(size - n + 1, device=history.device)[None]
        match = (windows == last[:, None, :]).all(-1) & (starts + n - 1 < lengths[:, None])
        match &= (lengths[:, None] + 1 >= n)
        vocab = logits.shape[1]
        banned = torch.where(match, followers, torch.full_like(followers, vocab))  # vocab = "no ban" column
        extended = torch.cat([logits, logits.new_zeros(batch, 1)], dim=1)
        extended.scatter_(1, banned.clamp(min=0), float("-inf"))
        return extended[:, :vocab]


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: torch.Tensor  # [T] long, the prompt's token ids (for the n-gram guard)
    embeds: torch.Tensor  # [T, D] prompt embeddings, images included
    max_new_tokens: int
    tokens: Optional[list] = None  # filled in: generated ids, EOS excluded
    finished: bool = False  # filled in: True when EOS ended it
    cancelled: bool = False  # set by the caller: the request leaves the batch at the next sync point
    on_done: Optional[Callable] = None  # called once the request has left the batch (done or cancelled)
    error: Optional[BaseException] = None  # set when the batch it was in failed


class BatchGenerator:
    """Greedy decoding of many prompts at once over a FastDecoder, each sequence stopping on its own.

    Up to `max_batch` sequences decode together; the others wait and take the rows of finished ones
    (continuous batching at `sync_every`-step granularity). Active sequences always occupy rows
    0..n-1, so a step runs on the smallest captured batch size ≥ n.
    """

    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

    def __init__(self, model, max_batch: int = 8, max_seq_len: int = 10240, no_repeat_ngram_size: int = 20,
                 eos_token_id: int = 1, sync_every: int = 16, use_cuda_graphs: Optional[bool] = None):
        self.decoder = FastDecoder(model, max_batch, max_seq_len, use_cuda_graphs)
        self.eos, self.sync_every, self.max_batch = eos_token_id, sync_every, max_batch
        self.ngram = NgramBanGPU(no_repeat_ngram_size)
        device = self.decoder.device
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.prompt_lengths = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.limits = torch.ones(max_batch, dtype=torch.long, device=device)
        self.done = torch.ones(max_batch, dtype=torch.bool, device=device)
        self.history = torch.full((max_batch, max_seq_len), -1, dtype=torch.long, device=device)
        self.attend_buckets = sorted({min(max_seq_len, 1024 << i) for i in range(8)})
        self._graphs = {}

    # One decode step for rows 0..b-1, entirely on the device.
    def _step(self, batch: int, attend_len: int) -> None:
        rows = slice(0, batch)
        logits = self.decoder.decode_logits(self.tokens[rows], self.positions[rows], attend_len)
        logits = self.ngram.apply(logits, self.history[rows], self.lengths[rows])
        next_tokens = logits.argmax(-1)
        last = self.history.shape[1] - 1
        self.history[rows].scatter_(1, self.lengths[rows, None].clamp(max=last), next_tokens[:, None])
        self.lengths[rows] = (self.lengths[rows] + 1).clamp(max=last)
        self.positions[rows] = (self.positions[rows] + 1).clamp(max=last)
        self.tokens[rows] = next_tokens
        generated = self.lengths[rows] - self.prompt_lengths[rows]
        self.done[rows] |= (next_tokens == self.eos) | (generated >= self.limits[rows])

    def _run_step(self, batch: int, attend_len: int) -> None:
        if not self.decoder.use_cuda_graphs:
            self._step(batch, attend_len)
            return
        key = (batch, attend_len)
        if key not in self._graphs:
            self._graphs[key] = self._capture(batch, attend_len)
        self._graphs[key].replay()

    def _capture(self, batch: int, attend_len: int):
        # Warm-up and capture run the step for real: save and restore the state they change.
        saved = [t.clone() for t in self._state()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(batch, attend_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=getattr(self, "_pool", None)):
            self._step(batch, attend_len)
        self._pool = graph.pool()
        for tensor, value in zip(self._state(), saved):
            tensor.copy_(value)
        return graph

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture the decode step for every batch size and cache span up front (at load time), so that no
        request pays for a capture. Returns how many graphs there are."""
        if self.decoder.use_cuda_graphs:
            for batch in (b for b in self.BATCH_BUCKETS if b <= self.max_batch):
                for attend_len in self.attend_buckets:
                    if (batch, attend_len) not in self._graphs:
                        self._graphs[(batch, attend_len)] = self._capture(batch, attend_len)
        return len(self._graphs)

    def _state(self):
        return [self.tokens, self.positions, self.lengths, self.done, self.history]

    def _admit(self, request: GenerationRequest, row: int) -> None:
        length = request.prompt_ids.numel()
        if length + request.max_new_tokens >= self.history.shape[1]:
            raise ValueError(f"{length} prompt + {request.max_new_tokens} new tokens exceed the cache "
                             f"({self.history.shape[1]})")
        logits = self.decoder.prefill(request.embeds, row)[None]
        self.history[row].fill_(-1)
        self.history[row, :length] = request.prompt_ids.to(self.history.device)
        self.lengths[row] = length
        logits = self.ngram.apply(logits, self.history[row:row + 1], self.lengths[row:row + 1])
        first = logits.argmax(-1)[0]
        self.history[row, length] = first
        self.lengths[row] = length + 1
        self.prompt_lengths[row] = length
        self.positions[row] = length
        self.tokens[row] = first
        self.limits[row] = request.max_new_tokens
        self.done[row] = (first == self.eos) | (request.max_new_tokens <= 1)

    def _move(self, source: int, target: int) -> None:
        self.decoder.move_slot(source, target)
        for tensor in self._state() + [self.prompt_lengths, self.limits]:
            tensor[target] = tensor[source]

    def _collect(self, request: GenerationRequest, row: int) -> None:
        start = int(self.prompt_lengths[row])
        ids = self.history[row, start:int(self.lengths[row])].tolist()[: request.max_new_tokens]
        if self.eos in ids:
            request.tokens, request.finished = ids[: ids.index(self.eos)], True
        else:
            request.tokens, request.finished = ids, False

    @torch.inference_mode()
    def generate(self, requests: list, on_progress=None, incoming: Optional[Callable] = None) -> list:
        """Decode every request; fills `request.tokens`/`finished` and returns the requests.

        `incoming()`, if given, is asked at every synchronisation point for requests that arrived
        meanwhile; they join the batch as rows free up. `on_progress(request, tokens_so_far)` is called at
        each synchronisation point.
        """
        waiting = deque(requests)
        active: list = []  # active[i] occupies row i
        while True:
            if incoming is not None:
                waiting.extend(incoming())
            while waiting and len(active) < self.max_batch:
                request = waiting.popleft()
                if request.cancelled:
                    self._retire(request)
                    continue
                self._admit(request, len(active))
                active.append(request)
            if not active:
                return list(requests)
            batch = min(next(b for b in self.BATCH_BUCKETS if b >= len(active)), self.max_batch)
            if len(active) < batch:  # rows past the active ones must not run away with stale state
                self.done[len(active):batch] = True
            done = self.done[: len(active)].tolist()
            if not all(done):
                horizon = int(self.positions[: len(active)].max()) + self.sync_every + 1
                attend_len = next((a for a in self.attend_buckets if a >= horizon), self.history.shape[1])
                for _ in range(self.sync_every):
                    self._run_step(batch, attend_len)
                done = self.done[: len(active)].tolist()
            if on_progress is not None:
                generated = (self.lengths[: len(active)] - self.prompt_lengths[: len(active)]).tolist()
                for request, count in zip(active, generated):
                    on_progress(request, count)
            for row in reversed(range(len(active))):
                request = active[row]
                if done[row] or request.cancelled:
                    if not request.cancelled:
                        self._collect(request, row)
                    last = len(active) - 1
                    if row != last:
                        self._move(last, row)
                        active[row] = active[last]
                    active.pop()
                    self._retire(request)

    @staticmethod
    def _retire(request: GenerationRequest) -> None:
        if request.on_done is not None:
            request.on_done()
