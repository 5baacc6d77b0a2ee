"""From page images to prompt embeddings: preprocessing on a bounded CPU pool, and the vision encoder
run on the views of many pages (of many predictions) at once, on its own thread and CUDA stream.

Preprocessing (resizing, padding, tiling, tokenising) is CPU work done in worker threads. Its torch
operations would each spread over every core by default, so N workers would run N × cores threads:
on a GPU host the workers share the cores the process may use (`DEEPSEEK_OCR_CPUS`) as intra-op threads
(`limit_cpu_threads`), and the pool's size is what bounds the CPU work.

Encoding runs beside decoding (`VisionWorker`): decoding is bound by memory bandwidth and encoding by
compute and kernel launches, so on one GPU the two overlap, and a page that arrives while the batch
decodes is encoded without waiting for it. Encoding groups the views by size (the global views of one
preset, the tiles) and runs each group through the model's towers in calls bounded by pixels: with SAM's
relative positions folded into its attention kernel a call's memory grows only linearly with its views,
and one call per view size for a whole pass of pages keeps the GPU busy with few, large kernels; in the
original's order (a dense bias of (side/16)⁴ values per head and view) calls stay small.
"""

import contextlib
import functools
import itertools
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional, Sequence

import torch

from checkpoints.processing_deepseekocr import PromptInputs

# Names of the stages' spans as a profiler sees them (the serving thread's prefills and decode rounds, the
# vision worker's passes): benchmarks/timeline.py reads a job's GPU time by stage from them.
VISION_RANGE, PREFILL_RANGE, DECODE_RANGE = "ocr.vision_pass", "ocr.prefill", "ocr.decode"
record_function = torch.profiler.record_function

# Pixels of views given to the towers in one call, with SAM's dense bias (the original's order): four
# 1024×1024 views, or ten 640×640 tiles.
MATERIALISED_PASS_PIXELS = 4 * 1024 * 1024


def pass_views(model, pages: int, modes: Optional[Iterable[tuple]] = None) -> set:
    """(side, views): the most views of each size a pass of `pages` pages can hold, over the model's resolution
    modes, or `modes` ((base_size, image_size, crop_mode) each: those an engine serves) (a global view per page;
    in crop mode, as many tiles as the model cuts at most)."""
    processing = model.processing
    views = set()
    for base_size, image_size, crop_mode in (processing.RESOLUTION_MODES.values() if modes is None else modes):
        if crop_mode:
            views.add((base_size, pages))
            views.add((image_size, pages * processing.MAX_TILES))
        else:
            views.add((image_size, pages))
    return views


def vision_pass_shapes(model, pages: int, call_pixels: int, modes: Optional[Iterable[tuple]] = None) -> list:
    """The largest calls of the towers a pass of `pages` pages can make, per view size of the model's modes (or
    `modes`, as `pass_views`): [views, 3, side, side] each (what sizes the vision encoder's memory)."""
    return sorted((min(views, max(1, call_pixels // side**2)), 3, side, side)
                  for side, views in pass_views(model, pages, modes))


def pass_pixels(model, pages: int = 16) -> int:
    """Pixels per call of the towers: every view of one size of a pass of `pages` pages at once when
    SAM's relative positions are folded into its attention, else MATERIALISED_PASS_PIXELS."""
    if getattr(model.config, "sam_relative_positions", "folded") != "folded":
        return MATERIALISED_PASS_PIXELS
    return max(views * side ** 2 for side, views in pass_views(model, pages))


def limit_cpu_threads(workers: int, cores: int) -> None:
    """Keep preprocessing workers × intra-op threads within the cores this process may use (GPU hosts: the
    model is not on the CPU). Oversubscribed OpenMP threads spin while they wait for each other, and the
    serving thread, which must launch every decode step on time, then waits for a core."""
    torch.set_num_threads(max(1, cores // max(workers, 1)))


class Preprocessor:
    """A bounded pool that turns (image, prompt, preset) into PromptInputs (views and token ids) by the model's
    own `prepare_inputs`, the views as uint8 pixels and, for a GPU, in pinned memory: the resizing and cutting
    is done here, in parallel; the vision pass copies the pixels to the device (half the bytes of bf16) and
    normalises them there by the model's own table (`views_for_towers`), which gives the numbers the
    original computes on the CPU, bit for bit, without a CPU pass over every pixel in float32."""

    def __init__(self, model, tokenizer, workers: int, pin: bool = False):
        self.model, self.tokenizer, self.pin = model, tokenizer, pin
        self.workers = max(1, workers)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="deepseek-ocr-preprocess")

    def submit(self, image, prompt: str, resolution):
        return self.pool.submit(self._prepare, image, prompt, resolution)

    def _prepare(self, image, prompt: str, resolution) -> PromptInputs:
        inputs = self.model.prepare_inputs(self.tokenizer, prompt, [image], resolution.base_size,
                                           resolution.image_size, resolution.crop_mode, raw_pixels=True)
        for views in inputs.images:
            views.global_view = self._ready(views.global_view)
            if views.has_tiles:
                views.tiles = self._ready(views.tiles)
        return inputs

    def reserve_pinned_memory(self, pages: int, image, prompt: str, resolution) -> int:
        """Pin, at start, the host memory that `pages` pages like `image` hold at once, and leave it in the
        allocator's cache (it keeps freed pinned blocks by size): pinning is slow and takes a lock that
        stalls the other threads' CUDA calls, so a run should not pin page after page. Returns the bytes."""
        if not self.pin:
            return 0
        inputs = self._prepare(image, prompt, resolution)
        sizes = [t.nbytes for views in inputs.images for t in (views.global_view, views.tiles) if t is not None]
        del inputs
        blocks = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(pages) for size in sizes]
        reserved = sum(block.nbytes for block in blocks)
        del blocks
        return reserved

    def _ready(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.pin_memory() if self.pin else pixels


_NORMALISATION_TABLES: dict = {}  # (processing module, device, dtype) → the model's normalisation table there


def views_for_towers(model, views: torch.Tensor) -> torch.Tensor:
    """Views [N, 3, S, S] as the towers take them: uint8 pixels normalised by the model's table on their device
    in the model's dtype (the same numbers as the model's CPU normalisation, then rounded to that dtype), or
    views already normalised, in that dtype."""
    inner = model.model
    dtype = inner.vision_dtype
    if views.dtype != torch.uint8:
        return views.to(dtype)
    key = (model.processing.__name__, views.device, dtype)
    if key not in _NORMALISATION_TABLES:
        _NORMALISATION_TABLES[key] = model.processing.normalisation_table().to(views.device, dtype)
    return model.processing.normalise_by_table(views, _NORMALISATION_TABLES[key])


@torch.inference_mode()
def encode_prompts(model, prompts: Sequence[PromptInputs], call_pixels: Optional[int] = None,
                   launch_turn=contextlib.nullcontext(), towers: Optional[Callable] = None) -> list:
    """Prompt embeddings [T, D] for each prompt, its images encoded together with the other prompts' views.
    Each call of the towers (`towers`, by default the model's `encode_views`; `GraphedTowers` in the engine on
    a GPU) is launched holding `launch_turn` (`VisionWorker`). Nothing here waits for the GPU: the token ids
    and image positions travel in one upload from pinned memory, and the image features are written at
    positions, not through a boolean mask (which reads the mask back to count it)."""
    call_pixels = call_pixels or pass_pixels(model, max(len(prompts), 1))
    inner = model.model
    towers = towers or inner.encode_views
    device = inner.vision_device
    # (size → list of (key, views [n, 3, S, S])); key = (prompt index, image index, "global" | "tiles")
    groups: dict = {}
    for p, prompt in enumerate(prompts):
        for i, views in enumerate(prompt.images):
            groups.setdefault(views.global_view.shape[-1], []).append(((p, i, "global"), views.global_view[None]))
            if views.has_tiles:
                groups.setdefault(views.tiles.shape[-1], []).append(((p, i, "tiles"), views.tiles))
    features = {}
    uploads = _upload(groups, device)
    for size, members in groups.items():
        pixels, uploaded = uploads[size]()
        if uploaded is not None:
            torch.cuda.current_stream(device).wait_event(uploaded)
        per_pass = max(1, call_pixels // (size * size))
        calls = []
        for start in range(0, pixels.shape[0], per_pass):
            with launch_turn:
                calls.append(towers(views_for_towers(model, pixels[start:start + per_pass])))
        encoded = torch.cat(calls)
        start = 0
        for key, views in members:
            features[key] = encoded[start:start + views.shape[0]]
            start += views.shape[0]
    ids, positions = _ids_and_image_positions(prompts, pin=device.type == "cuda")
    ids, positions = ids.to(device, non_blocking=True), positions.to(device, non_blocking=True)
    embeds = inner.embed_tokens(ids)  # every prompt's tokens, one after another
    arranged = [inner.arrange_image(views, features[(p, i, "global")][0], features.get((p, i, "tiles")))
                for p, prompt in enumerate(prompts) for i, views in enumerate(prompt.images)]
    if arranged:
        embeds.index_copy_(0, positions, torch.cat(arranged).to(embeds.dtype))
    return list(embeds.split([int(prompt.input_ids.numel()) for prompt in prompts]))


_UPLOAD_STREAMS: dict = {}  # CUDA device → the stream that copies views to it


def _upload(groups: dict, device: torch.device) -> dict:
    """The views of each size (`encode_prompts`' groups) joined on `device`: size → `upload()`, which copies each
    view as it is (the Preprocessor leaves them pinned, as uint8 pixels) into its place and returns (the views,
    the event after their copies, or None off CUDA). On CUDA every size's buffer is taken here, at once, and its
    copies are queued on a stream of their own when `upload()` is called, just before that size's towers are
    launched: one size's upload runs while the towers encode the size before it (a pass of 16 A4 Gundam pages
    uploads 168 MB of pixels, 3.7 ms of copies over the H200's host link, traced), and the first size's towers do
    not wait for the host to queue every other size's copies first (a copy a page and size: ~100 launches)."""
    if device.type != "cuda":
        def joined(size: int) -> tuple:
            return torch.cat([views for _, views in groups[size]]).to(device), None

        return {size: functools.partial(joined, size) for size in groups}
    towers_stream = torch.cuda.current_stream(device)
    if device not in _UPLOAD_STREAMS:
        _UPLOAD_STREAMS[device] = torch.cuda.Stream(device)
    upload_stream = _UPLOAD_STREAMS[device]
    # The buffers come from the towers' stream's share of the allocator, free in its order only: the copies
    # wait for what that stream has queued until now, and that stream waits for each size's copies before
    # reading them.
    upload_stream.wait_stream(towers_stream)
    buffers = {}
    for size, members in groups.items():
        first = members[0][1]
        buffers[size] = torch.empty((sum(views.shape[0] for _, views in members), *first.shape[1:]),
                                    dtype=first.dtype, device=device)

    def upload(size: int) -> tuple:
        pixels = buffers[size]
        with torch.cuda.stream(upload_stream):
            start = 0
            for _, views in groups[size]:
                pixels[start:start + views.shape[0]].copy_(views, non_blocking=True)
                start += views.shape[0]
            return pixels, upload_stream.record_event()

    return {size: functools.partial(upload, size) for size in groups}


def _ids_and_image_positions(prompts: Sequence[PromptInputs], pin: bool) -> tuple:
    """The prompts' token ids one after another, and the positions there of their `<image>` tokens (in the
    order their images' embeddings come), as one int64 host tensor cut in two (pinned for an asynchronous
    upload when `pin`)."""
    ids = torch.cat([prompt.input_ids.reshape(-1).long() for prompt in prompts])
    offsets, positions = 0, []
    for prompt in prompts:
        if prompt.images:
            positions.append(prompt.image_mask.reshape(-1).nonzero()[:, 0] + offsets)
        offsets += prompt.input_ids.numel()
    positions = torch.cat(positions) if positions else ids.new_empty(0)
    both = torch.cat([ids, positions])
    if pin:
        both = both.pin_memory()
    return both[:ids.numel()], both[ids.numel():]


class VisionWorker:
    """Encodes pages on a thread (and, on CUDA, a stream) of its own.

    `submit(items)` queues (priority, key, PromptInputs); `finished()` returns (key, embeddings or None,
    error or None) for every page done since the last call. Each pass takes queued pages of the lowest
    priority value there is, and only of that value, up to `max_pages_per_pass`, in one batched pass (the
    priorities are the caller's: the serving policy's `vision_priority` puts a prediction's first page
    ahead of a long job's queued pages, in a pass of its own kind, so it waits for at most the pass under
    way and its own pass is not a long job's). If a pass fails, its pages are encoded one by one so that
    the error lands on the page that caused it.
    The embeddings are complete when handed over, and marked as used by the caller's stream, so that their
    memory is not reused before the caller's work on them is done.

    `launch_turn` (a lock the serving thread holds while it launches a prefill or decode steps) is held while
    the towers' kernels are launched: both threads launch from Python, and launching at the same time each
    waited for the other's hold of the interpreter lock at nearly every operator (in a 256-page job the two
    took ~250 ms to launch a pass and a prefill that the GPU ran in ~170 ms, the GPU idle 30% of the time).
    Taking turns, each launches at its own speed while the other's kernels run.
    """

    SLOW_PASS_S = 2.0
    # CUDA stream priority of the passes (lower is higher): the decode's own (0). Ahead of the decode steps
    # (-1) the jobs ran no faster on the H200: 13.55 and 16.03 pages/s for 128 and 256 pages, against 13.53
    # and 16.67 at 0 in the same run, and the bulk command 0.90 of its job against 0.93.
    STREAM_PRIORITY = 0

    def __init__(self, model, translate_oom: Callable, max_pages_per_pass: int = 16,
                 log: Callable[[str], None] = lambda line: None, launch_turn=contextlib.nullcontext(),
                 towers: Optional[Callable] = None):
        self.model, self.translate_oom, self.log = model, translate_oom, log
        self.launch_turn = launch_turn
        self.towers = towers  # what encodes a call's views (None: the model's encode_views)
        self.max_pages_per_pass = max_pages_per_pass
        device = model.model.vision_device
        self.stream = torch.cuda.Stream(device, priority=self.STREAM_PRIORITY) if device.type == "cuda" else None
        self.requests: "queue.PriorityQueue" = queue.PriorityQueue()
        self._order = itertools.count()  # ties in priority: first come, first served
        self.results: "queue.Queue" = queue.Queue()
        self.busy_s = 0.0  # seconds spent encoding
        self.passes = self.pages = 0  # passes run and the pages they held (their mean size: is the encoder fed?)
        # On the CPU there is nothing to overlap (the same cores decode), and a second thread allocating
        # the towers' large temporaries gets its own malloc arena: the process's memory only grows. There
        # the caller's thread encodes, at submit.
        self.thread = None
        if self.stream is not None:
            self.thread = threading.Thread(target=self._run, name="deepseek-ocr-vision", daemon=True)
            self.thread.start()

    def submit(self, items: list) -> None:
        for priority, key, inputs in items:
            self.requests.put((priority, next(self._order), key, inputs))
        while self.thread is None and not self.requests.empty():
            self._encode_next_pass()

    def finished(self) -> list:
        done = []
        while True:
            try:
                key, embeds, error = self.results.get_nowait()
            except queue.Empty:
                return done
            if embeds is not None and embeds.is_cuda:
                embeds.record_stream(torch.cuda.current_stream(embeds.device))
            done.append((key, embeds, error))

    @torch.inference_mode()
    def _run(self) -> None:
        while True:
            self._encode_next_pass()

    def _encode_next_pass(self) -> None:
        first = self.requests.get()
        items = [first[2:]]
        while len(items) < self.max_pages_per_pass:  # a pass holds pages of one priority only
            try:
                queued = self.requests.get_nowait()
            except queue.Empty:
                break
            if queued[0] != first[0]:
                self.requests.put(queued)
                break
            items.append(queued[2:])
        started = time.monotonic()
        with record_function(VISION_RANGE):
            results = self._encode(items)
        for result in results:
            self.results.put(result)
        elapsed = time.monotonic() - started
        self.busy_s += elapsed
        self.passes += 1
        self.pages += len(items)
        if elapsed > self.SLOW_PASS_S:
            self.log(f"slow vision pass: {len(items)} page(s) of priority {first[0]} in {elapsed:.2f} s")

    def _encode(self, items: list) -> list:
        try:
            embeddings = self._encode_on_stream([inputs for _, inputs in items])
            return [(key, embeds, None) for (key, _), embeds in zip(items, embeddings)]
        except Exception as error:
            if len(items) == 1:
                return [(items[0][0], None, error)]
            self.log(f"a vision pass of {len(items)} pages failed ({error}): encoding them one by one")
        results = []
        for key, inputs in items:  # find whose page failed: one by one
            try:
                results.append((key, self._encode_on_stream([inputs])[0], None))
            except Exception as error:
                results.append((key, None, error))
        return results

    def _encode_on_stream(self, prompts: list) -> list:
        with self.translate_oom("encoding the images"):
            if self.stream is None:
                return encode_prompts(self.model, prompts, towers=self.towers)
            with torch.cuda.stream(self.stream):
                embeddings = encode_prompts(self.model, prompts, launch_turn=self.launch_turn, towers=self.towers)
            self.stream.synchronize()  # complete before another stream reads them
            return embeddings
