"""Loads DeepSeek-OCR (or DeepSeek-OCR 2: the model the weights folder holds) once and serves pages: one
thread owns the GPU and runs every prediction's pages. What depends on the model (its views, tiling and
image tokens, its resolution modes) is asked of the model; the engine knows none of it.

Predictions hand pages to `OCREngine.submit`; the serving thread then, round after round:
takes new work and cancellations, starts preprocessing on the CPU pool, encodes the views of the
pages waiting for the vision encoder in batched passes, admits encoded pages into free decode rows
with one batched prefill, and decodes every row `sync_every` steps at a time (CUDA-graph replays),
retiring finished pages and handing back their rows and cache blocks. Which page goes next at each
stage is the policy's decision (`scheduler.py`); the device state is `decode_batch.py`.

A failure in one prediction's preprocessing, encoding or prefill fails that prediction alone (a
batched pass that fails is retried page by page to find whose it was); its rows and blocks return
to the pool. A cancelled or timed-out prediction leaves at the next round.

With DEEPSEEK_OCR_ENGINE=reference, pages are decoded one by one in the caller's thread by the
model's plain `generate_tokens` (the readable reference path).
"""

import contextlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Optional

# Two streams (vision, decoding) allocate beside each other: segments that grow in place keep what the
# caching allocator reserves close to what is allocated. Set before CUDA starts; an operator's value wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import checkpoints  # noqa: E402
from checkpoints import triton_common  # noqa: E402
from checkpoints.generation import (
    DEFAULT_LOOP_STOP, LOOP_STOP_OFF, ORIGINAL_NO_REPEAT_RULE, SERVING_NO_REPEAT_RULE, STOP_EOS, STOP_REPETITION,
)
from checkpoints.processing_deepseekocr import IMAGE_TOKEN

from .decode_batch import DecodeBatch, Entry, MemoryBudget
from .errors import InputError
from .presets import (
    DEFAULT_RESOLUTION, DEFAULT_TASK_TYPE, Resolution, build_prompt, model_presets, resolution as preset_resolution,
)
from .scheduler import BlockPool, SchedulingPolicy, Stage
from .settings import Settings
from .vision import (
    PREFILL_RANGE, DECODE_RANGE, Preprocessor, VisionWorker, limit_cpu_threads, pass_pixels, record_function,
    vision_pass_shapes,
)
from .vision_compile import compile_vision_towers, view_sides
from .vision_graphs import GraphedTowers
from .weights import model_in

BLOCK_SIZE = 64  # cache positions per block
MAX_NEW_TOKENS = 8192
# Longest sequence a row can hold: the longest prompt of either model (the first model's Gundam 3×3 tiles,
# 1,203 image tokens, plus the text of a Locate prompt with its longest reference) and MAX_NEW_TOKENS.
MAX_SEQUENCE = MAX_NEW_TOKENS + 2048


@dataclass
class PageResult:
    text: str  # decoded output, special tokens kept (grounding tags, table cells), EOS removed
    token_ids: list  # generated ids, EOS excluded (cut where a loop began, for "repetition")
    prompt_tokens: int
    image_tokens: int
    finished: bool  # the model emitted EOS
    stop_reason: str  # checkpoints.generation's STOP_*: "eos", "max_new_tokens" or "repetition"
    first_token_s: float  # from submission to this page's first token
    seconds: float  # from submission to this page's last token


class JobCancelled(RuntimeError):
    pass


class JobTimeout(RuntimeError):
    def __init__(self, limit_s: float):
        super().__init__(f"the prediction took longer than its {limit_s:.0f} s limit (DEEPSEEK_OCR_REQUEST_TIMEOUT); "
                         "try fewer pages or a smaller max_new_tokens")


def model_class(folder: Path) -> type:
    """The class of the model whose weights `folder` holds (its config.json names it)."""
    return getattr(checkpoints, model_in(folder).architecture)


def checkpoint_tensor_shapes(folder: Path) -> dict:
    """name → shape of every tensor the model built from `folder/config.json` expects (meta device: no memory)."""
    model_type = model_class(folder)
    config = model_type.config_class(**json.loads((Path(folder) / "config.json").read_text()))
    with torch.device("meta"):
        model = model_type(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def choose_vision_kernels(model, settings: Settings, graphs: bool) -> None:
    """SAM's attention kernels as the engine serves them (README "Faithfulness"), `graphs`: whether the towers
    are replayed as CUDA graphs. Unless the towers run in the original's order: every block's attention through
    the Triton kernel that adds the relative positions inside (DEEPSEEK_OCR_SAM_KERNEL=all, the default: the
    windows read in the grid, their relative terms computed in the kernel from the tables; `1`: only the grids it
    walks a whole row at a time, a 1024 or 512 view's global blocks, README "Performance"), and any folded
    attention left through cuDNN's kernels when the shapes are the graphs' (cuDNN builds a plan per new shape;
    captured at load, each is built once; DEEPSEEK_OCR_VISION_CUDNN). SAM's MLP GELU in the first product's
    epilogue (cuBLASLt's; DEEPSEEK_OCR_SAM_GELU=epilogue, the default: 0.56 ms a page faster, its hidden layer
    closer to float32 than F.gelu after the rounded product, README "Faithfulness"), `1` through the Triton kernel
    (`triton_ops.gelu`), `0` F.gelu after the product as the original. Within windows, the padding past the grid
    made up in the window kernel (DEEPSEEK_OCR_SAM_WINDOW_PADDING=kernel, the default), or the grid padded first
    (`grid`)."""
    sam = model.model.sam_model
    own_kernels = settings.vision != "original"  # the original's order keeps PyTorch's kernels throughout
    every_block = settings.sam_kernel == "all"
    sam.use_relative_attention_kernel(own_kernels and settings.sam_kernel != "0",
                                      any_grid=every_block, terms_in_kernel=every_block,
                                      padding_in_kernel=every_block and settings.sam_window_padding == "kernel")
    sam.use_gelu({"0": "exact", "1": "kernel", "epilogue": "epilogue"}[settings.sam_gelu] if own_kernels else "exact")
    sam.use_cudnn_attention(own_kernels and settings.vision_cudnn and graphs)


class OCREngine:
    def __init__(self, weights_dir: Path, settings: Optional[Settings] = None,
                 log: Callable[[str], None] = print, ignore_eos: bool = False,
                 resolutions: Optional[Iterable[str]] = None):
        """`ignore_eos`: for benchmarks, every page decodes its max_new_tokens. `resolutions`: the resolution_size
        choices this engine will serve (a bulk run's one), whose view sizes alone the towers are compiled and
        captured for at load (Gundam's two of the first model's four: on a fresh H200 the compile took 34 s and the
        load 60, against 53 and 74 for every preset's views; benchmarks/results/h200-2026-12-01); a page of another
        choice is refused. None: every choice the model has (the predictor's engine)."""
        from transformers import PreTrainedTokenizerFast

        self.settings = settings = settings or Settings.from_env()
        self.log = log
        self.device = torch.device(settings.device)
        self.dtype = getattr(torch, settings.dtype)
        if self.device.type == "cuda" and settings.vision != "original":
            # SDPA's cuDNN kernels build an execution plan for every new shape; the vision passes and prefills
            # change shape all the time (pages a pass, prompts a prefill), and each new plan stalls the pass
            # that meets it. Flash and memory-efficient attention have no plans. The original's order
            # (DEEPSEEK_OCR_VISION=original) keeps PyTorch's choice, which is what the original runs with.
            torch.backends.cuda.enable_cudnn_sdp(False)
        started = time.monotonic()
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(weights_dir))
        self.eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 1
        if ignore_eos:
            self.eos = -1  # no token has it
        # The model the folder holds is served, whatever DEEPSEEK_OCR_MODEL says: that setting only picks which
        # official weights setup() downloads.
        self.served = model_in(weights_dir)
        if self.served.model != settings.model:
            log(f"{weights_dir} holds {self.served.title} weights: serving them (DEEPSEEK_OCR_MODEL="
                f"{settings.model} only picks what setup() downloads)")
        self.model = getattr(checkpoints, self.served.architecture).from_pretrained(
            str(weights_dir), dtype=self.dtype, attn_implementation=settings.attention,
            rope_inv_freq_dtype="bfloat16" if settings.rotary == "original" else "float32",
            sam_relative_positions="materialised" if settings.vision == "original" else "folded",
        ).to(self.device).eval()
        choose_vision_kernels(self.model, settings, self.graphs_vision)
        # The decode step's Triton kernels start while the kernel before them ends (README "Performance")
        triton_common.use_programmatic_launch(settings.programmatic_launch)
        self.every_preset = model_presets(self.model.processing)  # resolution_size choice → this model's geometry
        self.restricted = resolutions is not None  # the choices it serves: these (each one of the model's), or all
        self.presets = ({name: preset_resolution(name, self.every_preset, self.served.title)
                         for name in dict.fromkeys(resolutions)} if self.restricted else self.every_preset)
        # (base_size, image_size, crop_mode) of what it serves: the view sizes compiled and captured at load
        self.view_modes = sorted({(r.base_size, r.image_size, r.crop_mode) for r in self.presets.values()})
        self.repetition = {"serving": SERVING_NO_REPEAT_RULE, "original": ORIGINAL_NO_REPEAT_RULE}[
            settings.repetition_rule]
        self.loop_rule = DEFAULT_LOOP_STOP if settings.stop_loops else LOOP_STOP_OFF
        self.server = None
        if settings.engine == "batched":
            self.server = ServingLoop(self, log)
        log(f"{self.served.title} loaded on {self.device} ({settings.dtype}, {settings.engine} engine) "
            f"in {time.monotonic() - started:.1f} s")

    @property
    def limits_cpu_threads(self) -> bool:
        """On a GPU host the preprocessing workers share the process's cores as their threads (`limit_cpu_threads`);
        on the CPU the model itself needs them."""
        return self.device.type == "cuda"

    @property
    def compiles_vision(self) -> bool:
        """The batched engine compiles the vision towers at load on CUDA (DEEPSEEK_OCR_VISION=compiled)."""
        return self.device.type == "cuda" and self.settings.vision == "compiled"

    @property
    def graphs_vision(self) -> bool:
        """The batched engine replays the vision towers as CUDA graphs on CUDA (DEEPSEEK_OCR_VISION_GRAPHS), unless
        they run in the original's order: its bit-identity holds for its own calls of the towers."""
        return (self.device.type == "cuda" and self.settings.vision_graphs
                and self.settings.vision != "original")

    def compile_vision(self) -> Optional[dict]:
        """The towers compiled at load (`vision_compile.py`) for the view sizes it serves; if compiling fails the
        engine serves them eagerly, slower but the same model, and says so."""
        try:
            return compile_vision_towers(self.model, log=self.log, sides=view_sides(self.model, self.view_modes))
        except Exception as error:  # the compiler's failure must not keep the service from starting
            self.log(f"compiling the vision towers failed ({type(error).__name__}: {str(error)[:300]}); "
                     "encoding with the eager towers (DEEPSEEK_OCR_VISION=fast does so without trying)")
            return None

    @property
    def special_token_texts(self) -> list:
        """Strings the tokenizer would read as special tokens (user text must not contain them)."""
        return list(self.tokenizer.get_added_vocab())

    # ------------------------------------------------------------------ requests

    def resolution(self, name: str) -> Resolution:
        """This model's geometry for a resolution_size choice (InputError for a choice it has no mode for, or that
        this engine was not started for: `resolutions`)."""
        if name in self.every_preset and name not in self.presets:
            raise InputError(f"resolution_size {name!r}: this engine was started for {', '.join(self.presets)} only "
                             "(its towers are compiled for their view sizes); use one of those")
        return preset_resolution(name, self.every_preset, self.served.title)

    def model_resolution(self, resolution: Resolution) -> Resolution:
        """The geometry this model reads a preset with: a preset chosen by name (presets.resolution, whatever
        model's geometry it holds) → this model's for that choice; one given by geometry alone → as it is, if the
        engine serves it (`resolutions`)."""
        if resolution.choice:
            return self.resolution(resolution.choice)
        geometry = (resolution.base_size, resolution.image_size, resolution.crop_mode)
        if self.restricted and geometry not in self.view_modes:
            raise InputError(f"views of {geometry[:2]}: this engine was started for {', '.join(self.presets)} only")
        return resolution

    def prompt_tokens(self, prompt: str, image_size: tuple, resolution) -> int:
        """Tokens a page's prompt takes (BOS, text, image tokens), computed without preprocessing the image."""
        width, height = image_size
        resolution = self.model_resolution(resolution)
        try:
            count = self.model.count_image_tokens(width, height, resolution.base_size, resolution.image_size,
                                                  resolution.crop_mode)
        except ValueError as error:  # views the model has no encoder for
            raise InputError(f"resolution_size: {self.served.title} cannot read this preset ({error}); choose one "
                             f"of {', '.join(self.presets)}") from None
        pieces = prompt.strip().split(IMAGE_TOKEN)  # as the model's prepare_inputs tokenises it
        text = sum(len(self.tokenizer.encode(piece, add_special_tokens=False)) for piece in pieces if piece)
        return 1 + text + (len(pieces) - 1) * count

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """A page that could never be decoded is refused before it joins, naming the input to change."""
        limit = self.server.capacity if self.server is not None else MAX_SEQUENCE
        if prompt_tokens + max_new_tokens > limit:
            room = limit - prompt_tokens
            if room < 1:
                raise InputError(f"the prompt takes {prompt_tokens} tokens, more than the {limit} this service can "
                                 "hold: use a smaller resolution_size or a shorter reference_text")
            raise InputError(f"max_new_tokens={max_new_tokens} does not fit: this page's prompt takes "
                             f"{prompt_tokens} of the {limit} tokens a page can hold; use max_new_tokens ≤ {room}")

    def submit(self, images: list, prompt: str, resolution, max_new_tokens: int, background: bool = False) -> "Job":
        job = self.prepare(images, prompt, resolution, max_new_tokens, background)
        self.start(job)
        return job

    def prepare(self, images: list, prompt: str, resolution, max_new_tokens: int, background: bool = False) -> "Job":
        """A job for these pages, checked to fit, not started: its caller holds it before anything runs, so that
        a cancellation can reach it however early it comes. `background`: nobody waits on its first token (a
        bulk run's document), so its first page is not put ahead of other pages (`SchedulingPolicy.goes_first`)."""
        resolution = self.model_resolution(resolution)
        sizes = [self.prompt_tokens(prompt, image.size, resolution) for image in images]
        for size in sizes:
            self.check_fits(size, max_new_tokens)
        return Job(self, images, prompt, resolution, max_new_tokens, sizes, background)

    def start(self, job: "Job") -> None:
        """Hands the job to the serving thread (the reference path: runs it here). A job cancelled before the
        serving thread takes it never starts."""
        if self.server is None:
            job.run_here()
        else:
            self.server.submit(job)

    def run_pages(self, images: list, prompt: str, resolution, max_new_tokens: int,
                  timeout: Optional[float] = None) -> list:
        """OCR several images with one prompt; returns one PageResult per image, in order."""
        job = self.submit(images, prompt, resolution, max_new_tokens)
        try:
            return job.wait(timeout)
        except BaseException:
            job.cancel()
            raise

    def result(self, token_ids: list, stop_reason: str, prompt_tokens: int, image_tokens: int, first: float,
               total: float) -> PageResult:
        return PageResult(text=self.model.decode_text(self.tokenizer, token_ids), token_ids=token_ids,
                          prompt_tokens=prompt_tokens, image_tokens=image_tokens, finished=stop_reason == STOP_EOS,
                          stop_reason=stop_reason, first_token_s=first, seconds=total)

    @contextlib.contextmanager
    def translate_oom(self, what: str):
        try:
            yield
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise RuntimeError(f"the GPU ran out of memory while {what}; try a smaller resolution_size "
                               "or fewer pages") from None


class Job:
    """The pages of one prediction on their way through the engine."""

    def __init__(self, engine: OCREngine, images: list, prompt: str, resolution, max_new_tokens: int,
                 prompt_sizes: list, background: bool = False):
        self.engine, self.images, self.prompt, self.resolution = engine, images, prompt, resolution
        self.max_new_tokens, self.prompt_sizes, self.background = max_new_tokens, prompt_sizes, background
        self.submitted = time.monotonic()
        self.results: list = [None] * len(images)
        self.error: Optional[BaseException] = None
        self.prediction = None  # the policy's record (serving thread only)
        self.cancelled = False
        self._done = threading.Event()
        self._when_done: list = []
        self._lock = threading.Lock()

    def complete(self, error: Optional[BaseException] = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.error = error
            self._done.set()
            callbacks, self._when_done = self._when_done, []
        for callback in callbacks:
            callback()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """`callback()` runs once the job is done (at once if it is), in the thread that completes it, and must
        not raise: an event loop awaits a job this way instead of holding a thread in `wait` for its whole run."""
        with self._lock:
            if not self._done.is_set():
                self._when_done.append(callback)
                return
        callback()

    def cancel(self) -> None:
        """Safe at any time, from any thread: before `start`, while the serving thread has not yet taken the job,
        or while it runs. Its pages leave the engine and `wait` raises JobCancelled."""
        if self._done.is_set():
            return
        self.cancelled = True  # read when the serving thread takes the job (a cancel message may come first)
        if self.engine.server is not None:
            self.engine.server.cancel(self)

    def wait(self, timeout: Optional[float] = None) -> list:
        """The pages' results; past `timeout` seconds the job leaves the engine and JobTimeout is raised."""
        deadline = None if timeout is None else self.submitted + timeout
        # Short waits, so that a cancellation delivered to this thread is handled promptly.
        while not self._done.wait(0.1):
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise JobTimeout(timeout)
        if self.error is not None:
            raise self.error
        total = sum(len(r.token_ids) for r in self.results)
        elapsed = time.monotonic() - self.submitted
        self.engine.log(f"{len(self.results)} page(s): {total} tokens in {elapsed:.1f} s "
                        f"({total / max(elapsed, 1e-9):.1f} tokens/s)")
        return self.results

    def run_here(self) -> None:
        """The reference path: each page through the model's plain generate_tokens, in this thread."""
        engine = self.engine
        model = engine.model

        def on_token(_, first: list) -> None:
            if self.cancelled:  # a cancellation from another thread ends the page at its next token
                error = JobCancelled("the prediction was cancelled")
                self.complete(error)
                raise error
            if not first:
                first.append(time.monotonic())

        for index, image in enumerate(self.images):
            inputs = model.prepare_inputs(engine.tokenizer, self.prompt, [image], self.resolution.base_size,
                                          self.resolution.image_size, self.resolution.crop_mode)
            first = []
            with engine.translate_oom("decoding"):
                ids, stop_reason = model.generate_tokens(
                    inputs, self.max_new_tokens, repetition=engine.repetition, loops=engine.loop_rule,
                    eos_token_id=engine.eos, on_token=lambda token: on_token(token, first))
            now = time.monotonic()
            self.results[index] = engine.result(
                ids, stop_reason, int(inputs.input_ids.numel()), int(inputs.image_mask.sum()),
                (first[0] if first else now) - self.submitted, now - self.submitted)
            engine.log(f"page {index + 1}/{len(self.images)} done: {len(ids)} tokens ({stop_reason})")
        self.complete()


@dataclass
class PagePayload:
    """What the serving loop keeps for a page between stages: its data, which the serving loop alone writes.
    Where the page is (its stage, row, blocks, cache length, the tokens it resumes from) is the policy's record
    (`scheduler.Page`, whose `payload` this is), which only the policy writes."""

    job: Job
    future: object = None  # preprocessing in the CPU pool
    inputs: object = None  # PromptInputs
    embeds: Optional[torch.Tensor] = None  # [P, D] on the device
    first_token_at: Optional[float] = None


class ServingLoop:
    """The thread that owns the decode batch: policy decisions applied to the device, round after round.
    The vision encoder runs beside it (`VisionWorker`)."""

    # Vision passes of up to 16 pages, 32 pages handed to the worker at once so that it never waits for the
    # next round between passes (smaller passes cost long jobs throughput: the README has the figures). A
    # prediction's first page is handed over beyond that bound and goes ahead of queued pages of long jobs
    # (the rule: SchedulingPolicy.goes_first), so a newcomer waits for at most the pass under way, not for
    # every page queued before it.
    PAGES_PER_VISION_PASS = 16
    # CUDA stream priority of the prefills and decode steps (lower is higher; the vision worker's is 0).
    STREAM_PRIORITY = 0
    ENCODING_PAGES = 32
    # Pages preprocessed ahead of the encoder, beyond those in the workers' hands: preprocessing is faster
    # than encoding, and unbounded it would hold every waiting page's views in pinned host memory (the
    # allocator then pins fresh memory page after page, which is slow and stalls other threads' CUDA calls).
    PREPROCESSED_AHEAD = 16
    A4_AT_150_DPI = (1240, 1754)  # the page whose views' pinned memory is reserved at start
    SLOW_ROUND_S = 1.0

    def __init__(self, engine: OCREngine, log: Callable[[str], None]):
        self.engine, self.log = engine, log
        settings = engine.settings
        on_gpu = engine.device.type == "cuda"
        self.sync_every = settings.sync_every
        workers = settings.preprocess_workers
        if engine.limits_cpu_threads:
            limit_cpu_threads(workers, settings.cpus)
        # After the thread limit: Dynamo's guards include the number of CPU threads, and compiled graphs would
        # not be used (every pass eager) once it changed. Before the memory profile: it measures the passes
        # as they will run.
        self.vision_compile: Optional[dict] = None  # seconds, graphs and view sizes of the compile (None: eager)
        self.vision_graphs: Optional[dict] = None  # graphs captured of the towers and their seconds (None: none)
        if engine.compiles_vision:
            self.vision_compile = engine.compile_vision()
        self.preprocessor = Preprocessor(engine.model, engine.tokenizer, workers, pin=on_gpu)
        model = engine.model
        # What the vision worker calls on a pass's views of one size: the towers as CUDA graphs (captured while
        # the cache is sized, `_largest_vision_pass`), or None: the model's encode_views, as it is.
        self.towers: Optional[GraphedTowers] = None
        if engine.graphs_vision:
            self.towers = GraphedTowers(model, self._most_views_per_call())
        self.card_bytes = (torch.cuda.get_device_properties(engine.device).total_memory
                           if on_gpu else None)  # None: not on a GPU
        self.max_rows, self.budget_gib = settings.rows_and_budget(self.card_bytes)
        growth = self.sync_every + 1  # tokens a sequence may grow by between two looks at it
        budget = MemoryBudget(settings.cpu_cache_gib, self.budget_gib if on_gpu else None, self.card_bytes)
        self.batch = DecodeBatch.within_budget(
            model, budget, BLOCK_SIZE, self.max_rows, MAX_SEQUENCE, growth_tokens=growth,
            prefill_tokens=settings.prefill_tokens, other_work=self._largest_vision_pass,
            prefill_mode=None if settings.prefill_graphs else "exact",
            repetition=engine.repetition, loop_rule=engine.loop_rule, eos_token_id=engine.eos)
        blocks, block_bytes = self.batch.num_blocks, self.batch.block_bytes
        self.policy = SchedulingPolicy(BlockPool(blocks, BLOCK_SIZE), self.max_rows, max_waiting=2 * self.max_rows,
                                       prefill_tokens=settings.prefill_tokens, growth_tokens=growth,
                                       max_ahead=workers + self.PREPROCESSED_AHEAD)
        # The longest sequence a page may ask for: a row's block table, and the whole pool.
        self.capacity = min(MAX_SEQUENCE, blocks * BLOCK_SIZE - growth)
        started = time.monotonic()
        graphs = self.batch.capture_all()
        if graphs:
            log(f"captured {graphs} CUDA graphs of the decode step in {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        graphs = self.batch.prefill.capture_all()
        if graphs:
            log(f"captured {graphs} CUDA graphs of the batched prefill (up to {settings.prefill_tokens} tokens) "
                f"in {time.monotonic() - started:.1f} s")
        log(f"KV cache: {blocks} blocks of {BLOCK_SIZE} positions ({blocks * block_bytes / 2**30:.1f} GiB), "
            f"up to {self.max_rows} sequences at once"
            + (f", within a {self.budget_gib:g} GiB budget" if on_gpu else ""))
        if on_gpu:
            started = time.monotonic()
            self.warm_admission()
            log(f"ran a prefill of dummy prompts in {time.monotonic() - started:.1f} s (its kernels ready for the "
                "first prediction)")
            started = time.monotonic()
            pinned = self.preprocessor.reserve_pinned_memory(
                workers + self.PREPROCESSED_AHEAD + self.ENCODING_PAGES, Image.new("RGB", self.A4_AT_150_DPI, "white"),
                build_prompt(DEFAULT_TASK_TYPE), engine.resolution(DEFAULT_RESOLUTION))
            log(f"pinned {pinned / 2**30:.1f} GiB of host memory for pages' views in {time.monotonic() - started:.1f} s")
        self.inbox: "queue.Queue" = queue.Queue()
        # seconds the serving thread spent on each kind of device work (logged with the progress)
        self.busy_s = {"prefill": 0.0, "decode": 0.0}
        self.prefilled_tokens = 0  # prompt tokens (and resumed tokens) read by prefills
        self.prefills = 0  # batched prefills run (their mean size: are admissions batched?)
        # Held while this thread launches a prefill or decode steps, and by the vision worker while it launches
        # the towers: the two take turns at the interpreter (VisionWorker).
        self.launch_turn = threading.Lock()
        self.vision = VisionWorker(model, engine.translate_oom, max_pages_per_pass=self.PAGES_PER_VISION_PASS, log=log,
                                   launch_turn=self.launch_turn, towers=self.towers)
        self.stream = (torch.cuda.Stream(engine.device, priority=self.STREAM_PRIORITY)
                       if on_gpu else None)
        self._last_progress = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="deepseek-ocr-serving", daemon=True)
        self.thread.start()

    # A4 Gundam pages' prompts are ~920 tokens; a batched prefill admits several at once.
    WARM_PROMPTS, WARM_PROMPT_TOKENS = 2, 920

    @torch.inference_mode()
    def warm_admission(self) -> None:
        """One batched prefill of dummy prompts the size of the first pages', through the real admission, then
        cleared (every row and block is free again): on a fresh machine the first real prefill took ~2 s of
        Triton compiling (the start's memory profile runs one prefill, but of other sizes and with dummy
        routing), which the first prediction would otherwise wait for. Random embeddings, from a generator of
        its own (the process's random state stays as it was), spread the tokens over the experts as real pages do."""
        engine = self.engine
        generator = torch.Generator(engine.device).manual_seed(0)
        hidden = engine.model.config.hidden_size
        entries = []
        for row in range(min(self.WARM_PROMPTS, self.max_rows)):
            blocks = self.policy.blocks.take(self.policy.blocks.blocks_for(self.WARM_PROMPT_TOKENS + 1))
            embeds = torch.randn(self.WARM_PROMPT_TOKENS, hidden, generator=generator, device=engine.device,
                                 dtype=engine.dtype) * 0.02
            entries.append(Entry(row, embeds, torch.zeros(self.WARM_PROMPT_TOKENS, dtype=torch.long), blocks, 1, []))
        try:
            self.batch.admit(entries)
            self.batch.read(len(entries))
        finally:
            for entry in entries:
                self.batch.clear(entry.row)
                self.policy.blocks.give_back(entry.blocks)

    # ------------------------------------------------------------------ memory

    def _largest_vision_pass(self) -> None:
        """The vision encoder's largest calls, on dummy views: what runs beside the decode batch (its memory is
        measured as the cache is sized, `DecodeBatch.within_budget`). Graphed towers are captured here: their
        pool is that memory."""
        model, engine = self.engine.model, self.engine
        if self.towers is not None:
            self.vision_graphs = self.towers.capture(self.log)
            return
        with torch.inference_mode():
            for views in vision_pass_shapes(model, self.PAGES_PER_VISION_PASS, pass_pixels(model), engine.view_modes):
                model.model.encode_views(torch.zeros(views, device=engine.device, dtype=engine.dtype))

    def _most_views_per_call(self) -> dict:
        """side → the most views of that side one call of the towers holds in a pass."""
        most: dict = {}
        model = self.engine.model
        for views, _, side, _ in vision_pass_shapes(model, self.PAGES_PER_VISION_PASS, pass_pixels(model),
                                                    self.engine.view_modes):
            most[side] = max(most.get(side, 0), views)
        return most

    # ------------------------------------------------------------------ requests from other threads

    def submit(self, job: Job) -> None:
        self.inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        self.inbox.put(("cancel", job))

    # ------------------------------------------------------------------ the loop

    @torch.inference_mode()  # inference mode is per thread: this one needs it too
    def _run(self) -> None:
        while True:
            if self.stream is not None:
                torch.cuda.set_stream(self.stream)  # per thread: prefills and decode steps go there
            try:
                self._round()
            except Exception as error:  # the engine's own failure: every job in flight fails with it
                self.log(f"serving failed: {error!r}")
                self._fail_everything(error)

    def _has_work(self) -> bool:
        return any(p is not None for p in self.policy.rows) or any(
            not p.closed and not p.finished for p in self.policy.predictions)

    def _round(self) -> None:
        self._take_messages(wait=not self._has_work())
        started = time.monotonic()
        self._expire()
        self._preprocess()
        preprocessed = time.monotonic()
        self._encode()
        encoded = time.monotonic()
        self._admit()
        admitted = time.monotonic()
        if any(p is not None for p in self.policy.rows):
            self._decode()
        elif self._has_work():
            time.sleep(0.002)  # only CPU work in flight: let it progress
        self.policy.forget_finished()
        ended = time.monotonic()
        if ended - started > self.SLOW_ROUND_S:  # a round is a few decode steps: say where a long one went
            self.log(f"slow round ({ended - started:.2f} s): preprocessing {preprocessed - started:.2f} s, handing "
                     f"pages to the encoder {encoded - preprocessed:.2f} s, prefill {admitted - encoded:.2f} s, "
                     f"decode {ended - admitted:.2f} s")

    def _take_messages(self, wait: bool) -> None:
        try:
            message = self.inbox.get(timeout=0.5) if wait else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, job = message
            if kind == "submit" and job.cancelled:  # cancelled before this thread took it: it never joins
                self.log(f"cancelled before it started: {len(job.images)} page(s) never joined the engine")
                job.complete(JobCancelled("the prediction was cancelled"))
            elif kind == "submit":
                pages = [(size, job.max_new_tokens) for size in job.prompt_sizes]
                job.prediction = self.policy.add(id(job), pages, payloads=[PagePayload(job) for _ in pages],
                                                 background=job.background)
            elif kind == "cancel" and job.prediction is not None:
                self._close(job, JobCancelled("the prediction was cancelled"))
                self.log(f"cancelled: {len(job.images)} page(s) left the engine")
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _close(self, job: Job, error: Optional[BaseException]) -> None:
        """A prediction leaves: its rows are cleared, its blocks return to the pool, the caller is told."""
        if job.prediction is None or job.prediction.closed:
            job.complete(error)
            return
        for row in self.policy.close(job.prediction):
            self.batch.clear(row)
        for page in job.prediction.pages:
            page.payload.embeds = None
        job.complete(error)

    def _expire(self) -> None:
        limit = self.engine.settings.request_timeout_s
        now = time.monotonic()
        for prediction in list(self.policy.predictions):
            job = prediction.pages[0].payload.job if prediction.pages else None
            if job is not None and not prediction.closed and now - job.submitted > limit:
                self._close(job, JobTimeout(limit))

    def _preprocess(self) -> None:
        running = [p for pred in self.policy.predictions for p in pred.pages_in(Stage.PREPROCESSING)]
        for page in running:
            future = page.payload.future
            if not future.done():
                continue
            try:
                page.payload.inputs = future.result()
            except Exception as error:  # this page's input could not be prepared: its prediction fails
                self._close(page.payload.job, _user_error(error, "preparing the page"))
                continue
            page.payload.future = None
            self.policy.preprocessed(page, prompt_tokens=int(page.payload.inputs.input_ids.numel()))
        # as many pages in the pool as it has workers: a newly arrived page never queues behind others there
        free = self.preprocessor.workers - sum(
            1 for pred in self.policy.predictions for p in pred.pages_in(Stage.PREPROCESSING))
        for page in self.policy.to_preprocess(max(free, 0)):
            job = page.payload.job
            page.payload.future = self.preprocessor.submit(job.images[page.index], job.prompt, job.resolution)

    def _encode(self) -> None:
        """Take the pages the vision worker has finished, and hand it the next ones (round robin, bounded)."""
        for page, embeds, error in self.vision.finished():
            if page.prediction.closed or page.stage is not Stage.ENCODING:
                continue
            if error is not None:
                self._close(page.payload.job, _user_error(error, "encoding the page"))
                continue
            page.payload.embeds = embeds
            # The views are not needed once encoded: their pinned memory goes back to the allocator's cache
            # for the next pages rather than staying with the page until it finishes decoding.
            page.payload.inputs = replace(page.payload.inputs, images=[])
            self.policy.encoded(page)
        in_flight = sum(len(p.pages_in(Stage.ENCODING)) for p in self.policy.predictions)
        pages = self.policy.to_encode(limit=max(0, self.ENCODING_PAGES - in_flight))
        self.vision.submit([(self.policy.vision_priority(page), page, page.payload.inputs) for page in pages])

    def _admit(self) -> None:
        admissions = self.policy.to_admit()
        if not admissions:
            return
        started = time.monotonic()
        try:
            with record_function(PREFILL_RANGE):
                self._prefill(admissions)
        finally:
            self.busy_s["prefill"] += time.monotonic() - started
            self.prefilled_tokens += sum(a.page.context_tokens for a in admissions)
            self.prefills += 1

    def _prefill(self, admissions: list) -> None:
        entries = [self._entry(a.page, a.row) for a in admissions]
        try:
            with self.engine.translate_oom("reading the prompts"), self.launch_turn:
                self.batch.admit(entries)
        except Exception as error:
            if len(entries) == 1:
                self._admission_failed(admissions[0].page, entries[0], error)
                return
            for admission, entry in zip(admissions, entries):  # find whose prompt failed: one by one
                if admission.page.stage is not Stage.RUNNING:
                    continue  # its prediction failed meanwhile: its row and blocks went back to the pool
                try:
                    with self.engine.translate_oom("reading the prompt"), self.launch_turn:
                        self.batch.admit([entry])
                except Exception as error:
                    self._admission_failed(admission.page, entry, error)
        now = time.monotonic()
        states = self.batch.read(max(a.row for a in admissions) + 1)
        admitted = [a for a in admissions if a.page.stage is Stage.RUNNING]
        self.policy.observed({a.row: states[a.row].cache_length for a in admitted})
        for admission in admitted:
            if admission.page.payload.first_token_at is None:
                admission.page.payload.first_token_at = now

    def _entry(self, page, row: int) -> Entry:
        inputs = page.payload.inputs
        return Entry(row=row, embeds=page.payload.embeds, prompt_ids=inputs.input_ids, blocks=list(page.blocks),
                     max_new_tokens=page.max_new_tokens, generated_tokens=list(page.generated_tokens))

    def _admission_failed(self, page, entry: Entry, error: BaseException) -> None:
        self.batch.clear(entry.row)
        self.policy.admission_failed(page)
        self._close(page.payload.job, _user_error(error, "reading the prompt"))

    def _decode(self) -> None:
        grown, preempted = self.policy.grow()
        for page, row in preempted:
            self.policy.preempted(page, self.batch.generated_tokens(row))
            self.batch.clear(row)
            self.log(f"cache full: a page with {len(page.generated_tokens)} tokens waits for room (preempted)")
        for row in grown:
            self.batch.set_blocks(row, self.policy.rows[row].blocks)
        live = self.policy.live_rows()
        if live == 0:
            return
        started = time.monotonic()
        with record_function(DECODE_RANGE):
            with self.launch_turn:
                self.batch.run(live, self.sync_every)
            states = self.batch.read(live)
        now = time.monotonic()
        self.busy_s["decode"] += now - started
        self.policy.observed({row: state.cache_length for row, state in enumerate(states)})
        for row, state in enumerate(states):
            page = self.policy.rows[row]
            if page is not None and state.stop_reason is not None:
                self._retire(page, row, state.stop_reason, now)
        for source, target in self.policy.compact():  # live rows at the front: steps run a smaller batch
            self.batch.move(source, target)
        self._report_progress(states)

    def _retire(self, page, row: int, stop_reason: str, now: float) -> None:
        payload = page.payload
        job = payload.job
        ids = self.batch.generated_tokens(row)
        if stop_reason == STOP_EOS:
            ids = ids[:-1]
        elif stop_reason == STOP_REPETITION:
            ids = ids[:self.batch.loop_cut(row)]
        ids = ids[:page.max_new_tokens]
        inputs = payload.inputs
        job.results[page.index] = self.engine.result(
            ids, stop_reason, int(inputs.input_ids.numel()), int(inputs.image_mask.sum()),
            payload.first_token_at - job.submitted, now - job.submitted)
        self.policy.finish(page)
        self.batch.clear(row)
        payload.embeds = payload.inputs = None
        if job.prediction.finished and not job.prediction.closed:
            self.policy.close(job.prediction)  # every page done: it holds nothing, and leaves
            job.complete()

    def _report_progress(self, states) -> None:
        now = time.monotonic()
        if now - self._last_progress >= 5:
            self._last_progress = now
            held = self.policy.holdings()
            busy = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.busy_seconds().items())
            passes = self.vision.passes
            self.log(f"decoding {held['rows']} page(s), {held['waiting']} waiting, "
                     f"{held['blocks']}/{self.policy.blocks.capacity} cache blocks in use; busy so far: {busy} "
                     f"({passes} vision passes of {self.vision.pages / max(passes, 1):.1f} pages)")

    def _fail_everything(self, error: Exception) -> None:
        if isinstance(error, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
            error = RuntimeError("the GPU ran out of memory while decoding; try fewer pages at once")
        jobs = [p.pages[0].payload.job for p in self.policy.predictions if p.pages and not p.closed]
        try:
            for job in jobs:
                self._close(job, error)
            for row in range(self.max_rows):
                self.batch.clear(row)
        except Exception as cleanup_error:  # the device itself is failing: at least no caller waits forever
            self.log(f"clearing the batch failed too: {cleanup_error!r}")
            for job in jobs:
                job.complete(error)
            self.policy = SchedulingPolicy(BlockPool(self.policy.blocks.capacity, BLOCK_SIZE), self.max_rows,
                                           self.policy.max_waiting, self.policy.prefill_tokens,
                                           self.policy.growth_tokens, self.policy.max_ahead)
        self.policy.forget_finished()

    def busy_seconds(self) -> dict:
        """Seconds of device work so far: vision encoding (beside the rest), prefill, decode."""
        return {"encode": self.vision.busy_s, **self.busy_s}

    def work_done(self) -> dict:
        """Counts so far, for benchmarks to take differences of: busy seconds per stage (`busy_seconds`), vision
        passes and the pages they held, prompt tokens prefilled and the prefills that read them."""
        return {**{f"{stage}_s": seconds for stage, seconds in self.busy_seconds().items()},
                "vision_passes": self.vision.passes, "vision_pages": self.vision.pages,
                "prefill_tokens": self.prefilled_tokens, "prefills": self.prefills}

    def holdings(self) -> dict:
        """What the engine holds now (rows, blocks, pages waiting, predictions): all zero when idle."""
        return self.policy.holdings()


def _user_error(error: BaseException, what: str) -> BaseException:
    if isinstance(error, (InputError, RuntimeError)):
        return error
    return RuntimeError(f"{what} failed: {error}")
