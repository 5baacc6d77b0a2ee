"""Loads DeepSeek-OCR once and runs pages through it.

Our model code is imported from the repository's `checkpoints` package; the weights and tokenizer
come from a folder of the official format (checkpoints/ itself once downloaded, or an operator's).
On CUDA the model runs in bf16 with flash-attention-2 when it is installed (SDPA otherwise); on the
CPU in float32 with SDPA. DEEPSEEK_OCR_DEVICE, DEEPSEEK_OCR_DTYPE and DEEPSEEK_OCR_ATTENTION override.
"""

import contextlib
import json
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image

from checkpoints import DeepseekOCRConfig, DeepseekOCRForCausalLM, OCRResult

from .fast_decoder import BatchGenerator, GenerationRequest

PROGRESS_EVERY_TOKENS = 256
NO_REPEAT_NGRAM_SIZE = 20  # the original's streaming setting
MAX_NEW_TOKENS = 8192
# The longest prompt: Gundam with a 3×3 grid takes 1203 image tokens, plus the text of the prompt.
MAX_PROMPT_TOKENS = 1536


@dataclass(frozen=True)
class RuntimeChoice:
    device: torch.device
    dtype: torch.dtype
    attention: str
    fast: bool = True
    max_batch: int = 4


def choose_runtime() -> RuntimeChoice:
    device = torch.device(os.environ.get("DEEPSEEK_OCR_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, os.environ.get("DEEPSEEK_OCR_DTYPE") or default_dtype)
    attention = os.environ.get("DEEPSEEK_OCR_ATTENTION")
    if not attention:
        attention = "flash_attention_2" if device.type == "cuda" and flash_attn_available() else "sdpa"
    fast = os.environ.get("DEEPSEEK_OCR_ENGINE", "fast") != "reference"
    max_batch = int(os.environ.get("DEEPSEEK_OCR_MAX_BATCH") or (32 if device.type == "cuda" else 4))
    return RuntimeChoice(device, dtype, attention, fast, max_batch)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def checkpoint_tensor_shapes(folder: Path) -> dict:
    """name → shape of every tensor the model built from `folder/config.json` expects (meta device: no memory)."""
    config = DeepseekOCRConfig(**json.loads((Path(folder) / "config.json").read_text()))
    with torch.device("meta"):
        model = DeepseekOCRForCausalLM(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


class OCREngine:
    def __init__(self, weights_dir: Path, runtime: Optional[RuntimeChoice] = None,
                 log: Callable[[str], None] = print):
        from transformers import PreTrainedTokenizerFast

        self.log = log
        self.runtime = runtime or choose_runtime()
        started = time.monotonic()
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(weights_dir))
        self.model = DeepseekOCRForCausalLM.from_pretrained(
            str(weights_dir), dtype=self.runtime.dtype, attn_implementation=self.runtime.attention,
        ).to(self.runtime.device).eval()
        self.worker = None
        if self.runtime.fast:
            generator = BatchGenerator(self.model, max_batch=self.runtime.max_batch,
                                       max_seq_len=MAX_PROMPT_TOKENS + MAX_NEW_TOKENS,
                                       no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE,
                                       eos_token_id=self.tokenizer.eos_token_id)
            graphs = generator.capture_all()
            if graphs:
                log(f"captured {graphs} CUDA graphs of the decode step")
            self.worker = DecodeWorker(generator, log)
        log(f"model loaded on {self.runtime.device} ({self.runtime.dtype}, {self.runtime.attention}, "
            f"{'fast batched' if self.worker else 'reference'} decoding) in {time.monotonic() - started:.1f} s")

    @property
    def special_token_texts(self) -> list:
        """Strings the tokenizer would read as special tokens (user text must not contain them)."""
        return list(self.tokenizer.get_added_vocab())

    def run_pages(self, images: list, prompt: str, resolution, max_new_tokens: int) -> list:
        """OCR several images with one prompt; returns one OCRResult per image, in order.

        Pages of one call, and the calls of concurrent predictions, decode together in one batch.
        If the caller is interrupted (a cancelled prediction), its pages leave the batch.
        """
        job = self.submit_pages(images, prompt, resolution, max_new_tokens)
        try:
            return job.wait()
        except BaseException:
            job.cancel()
            raise

    def submit_pages(self, images: list, prompt: str, resolution, max_new_tokens: int) -> "PagesJob":
        started = time.monotonic()
        # Preprocessing is CPU work (resizing, tiling): done in threads, off the device's critical path.
        with ThreadPoolExecutor(max_workers=min(4, len(images))) as pool:
            inputs = list(pool.map(lambda image: self.model.prepare_inputs(
                self.tokenizer, prompt, [image], resolution.base_size, resolution.image_size, resolution.crop_mode),
                images))
        job = PagesJob(self, inputs, max_new_tokens, started)
        if self.worker is None:  # reference decoding: one page after another, in this thread
            job.results = [self._reference_decode(page_inputs, max_new_tokens, index, len(inputs))
                           for index, page_inputs in enumerate(inputs, 1)]
            job.finish()
            return job
        with torch.inference_mode(), self._translate_oom():
            for page_inputs in inputs:
                embeds = self.model.model.embed_prompt(
                    page_inputs.input_ids.to(self.runtime.device)[None],
                    page_inputs.image_mask.to(self.runtime.device)[None], [page_inputs.images])[0]
                job.requests.append(GenerationRequest(page_inputs.input_ids, embeds, max_new_tokens,
                                                      on_done=job.request_done))
        self.log(f"encoded the images of {len(inputs)} page(s) in {time.monotonic() - started:.1f} s")
        self.worker.submit(job.requests)
        return job

    def _reference_decode(self, page_inputs, max_new_tokens: int, index: int, count: int):
        with self._translate_oom():
            ids, finished = self.model.generate_tokens(page_inputs, max_new_tokens, NO_REPEAT_NGRAM_SIZE,
                                                       self.tokenizer.eos_token_id)
        self.log(f"page {index}/{count} done: {len(ids)} tokens")
        return ids, finished

    def result_for(self, page_inputs, ids: list, finished: bool) -> OCRResult:
        return OCRResult(text=self.model.decode_text(self.tokenizer, ids), token_ids=ids,
                         prompt_tokens=int(page_inputs.input_ids.numel()),
                         image_tokens=int(page_inputs.image_mask.sum()), finished=finished)

    @contextlib.contextmanager
    def _translate_oom(self):
        try:
            yield
        except torch.OutOfMemoryError:
            self.release_memory()
            raise RuntimeError(
                "the GPU ran out of memory on this input; try a smaller resolution_size or fewer pages"
            ) from None

    def release_memory(self) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.empty_cache()


class JobCancelled(RuntimeError):
    pass


class JobTimeout(RuntimeError):
    pass


class PagesJob:
    """The pages of one call on their way through the decode worker."""

    def __init__(self, engine: OCREngine, inputs: list, max_new_tokens: int, started: float):
        self.engine, self.inputs, self.started = engine, inputs, started
        self.requests: list = []
        self.results: Optional[list] = None  # (ids, finished) per page, when decoded in the caller's thread
        self._left = len(inputs)
        self._lock = threading.Lock()
        self._finished = threading.Event()

    def request_done(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.finish()

    def finish(self) -> None:
        self._finished.set()

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled = True
        if self.requests:
            self.engine.log(f"cancelled: {len(self.requests)} page(s) left the batch")

    def wait(self, timeout: Optional[float] = None) -> list:
        """The pages' results; past `timeout` seconds the pages leave the batch and JobTimeout is raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # Short waits, so that a cancellation signal delivered to this thread is handled promptly.
        while not self._finished.wait(0.1):
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise JobTimeout(f"the prediction took longer than its {timeout:.0f} s limit "
                                 "(DEEPSEEK_OCR_REQUEST_TIMEOUT); try fewer pages or a smaller max_new_tokens")
        errors = [r.error for r in self.requests if r.error is not None]
        if errors:
            raise errors[0]
        if any(r.cancelled for r in self.requests):
            raise JobCancelled("the prediction was cancelled")
        pairs = self.results or [(r.tokens, r.finished) for r in self.requests]
        results = [self.engine.result_for(i, ids, finished) for i, (ids, finished) in zip(self.inputs, pairs)]
        total = sum(len(r.token_ids) for r in results)
        elapsed = time.monotonic() - self.started
        self.engine.log(f"{len(results)} page(s): {total} tokens in {elapsed:.1f} s "
                        f"({total / max(elapsed, 1e-9):.1f} tokens/s)")
        return results


class DecodeWorker:
    """One thread that owns the decode batch: submitted requests join it at the next sync point."""

    def __init__(self, generator: BatchGenerator, log: Callable[[str], None]):
        self.generator, self.log = generator, log
        self.queue: "queue.Queue" = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="deepseek-ocr-decode", daemon=True)
        self.thread.start()

    def submit(self, requests: list) -> None:
        for request in requests:
            self.queue.put(request)

    def _drain(self) -> list:
        arrived = []
        while True:
            try:
                arrived.append(self.queue.get_nowait())
            except queue.Empty:
                return arrived

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()] + self._drain()
            seen = list(batch)

            def incoming() -> list:
                arrived = self._drain()
                seen.extend(arrived)
                return arrived

            try:
                self.generator.generate(batch, on_progress=self._progress(), incoming=incoming)
            except BaseException as error:  # the batch is lost: fail every request in it
                if isinstance(error, torch.OutOfMemoryError):
                    torch.cuda.empty_cache()
                    error = RuntimeError("the GPU ran out of memory while decoding; try fewer pages at once")
                self.log(f"decoding failed: {error}")
                for request in seen:
                    if request.tokens is None and request.on_done is not None:
                        request.tokens, request.error = [], error
                        request.on_done()

    def _progress(self):
        """Log tokens generated across the batch every few seconds of long work."""
        counts, last, started = {}, [time.monotonic()], time.monotonic()

        def on_progress(request, count) -> None:
            counts[id(request)] = count
            now = time.monotonic()
            if now - last[0] >= 5:
                last[0] = now
                self.log(f"decoding: {sum(counts.values())} tokens for {len(counts)} page(s) "
                         f"in {now - started:.0f} s")

        return on_progress
