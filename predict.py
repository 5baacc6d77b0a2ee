"""Cog predictor for DeepSeek-OCR and DeepSeek-OCR 2: documents, figures and grounded references from an image or
a PDF (the model is the one the weights hold; DEEPSEEK_OCR_MODEL picks which official weights setup() fetches)."""

import asyncio
import contextlib
import tempfile
from pathlib import Path

from cog import BaseModel, BaseRunner, Input, Path as CogPath, concurrent

from ocr_service.engine import JobTimeout, OCREngine, checkpoint_tensor_shapes
from ocr_service.pipeline import Options, assemble_document, read_document
from ocr_service.settings import Settings
from ocr_service.weights import ensure_model_weights

REPOSITORY = Path(__file__).resolve().parent
SETTINGS = Settings.from_env()
# `cog build` reads the inputs' choices, defaults and bounds, and the concurrency, from this file's source
# without running it: they must be literals here (tests/test_predict.py checks them against presets.py,
# engine.py and settings.py).
TASK_TYPES = ["Convert to Markdown", "Free OCR", "Parse Figure", "Locate Object by Reference"]
RESOLUTIONS = ["Gundam (Recommended)", "Tiny", "Small", "Base", "Large"]


class Output(BaseModel):
    text: str  # markdown for "Convert to Markdown" (figure links, no grounding tags), else the model's text
    raw_output: str  # what the model wrote, grounding tags included
    regions: list[dict]  # grounded regions: label, box [x1, y1, x2, y2] in pixels, box_normalized (0-999), page
    annotated_images: list[CogPath]  # one per page that has regions, boxes drawn
    figures: list[CogPath]  # crops of the regions labelled "image", named as the markdown links them
    pages: list[dict]  # per page: size, image tokens, generated tokens, finished, stop_reason, seconds,
    #                    first_token_seconds, text (its share of text)
    blocks: list[dict]  # layout in reading order: page, type, box, box_normalized, text, figure (images/N.jpg)


# Cog's runner API (BaseRunner and run(), Cog 0.20 and newer); cog.yaml's `run:` names this class.
class Predictor(BaseRunner):
    def setup(self) -> None:
        weights_dir = ensure_model_weights(REPOSITORY, SETTINGS.model, expected_tensors=checkpoint_tensor_shapes,
                                           **SETTINGS.weights_source)
        self.engine = OCREngine(weights_dir, SETTINGS)

    # Concurrent predictions share the engine (their pages decode together). The image's server gets its
    # slot count from this; outside the image COG_MAX_CONCURRENCY sets it (scripts/serve-local.sh reads
    # it from here).
    @concurrent(max=64)
    async def run(
        self,
        image: CogPath = Input(description="Image (PNG, JPEG, WebP, TIFF, ...) or PDF document"),
        task_type: str = Input(description="What to do with the image", choices=TASK_TYPES,
                               default="Convert to Markdown"),
        reference_text: str = Input(description="What to locate, for 'Locate Object by Reference'", default=""),
        resolution_size: str = Input(description="Resolution preset: Gundam tiles large pages (recommended); "
                                                 "DeepSeek-OCR 2 has Gundam, Small and Base",
                                     choices=RESOLUTIONS, default="Gundam (Recommended)"),
        pages: str = Input(description="Pages of a PDF or multi-page TIFF to read, e.g. '1-3,5'; empty = all",
                           default=""),
        max_new_tokens: int = Input(description="Most tokens to generate per page", ge=1, le=8192,
                                    default=8192),
    ) -> Output:
        # The same steps as the bulk command's (ocr_service/pipeline.py), so a document gives the same output.
        options = Options(task_type, resolution_size, pages, max_new_tokens, reference_text)
        prompt, preset = options.prompt_and_preset(self.engine.special_token_texts)
        # The time limit counts from here, reading the file included. Past it, or on a cancellation, the
        # awaited step is abandoned wherever it is and the job, if there is one, leaves the engine.
        try:
            async with asyncio.timeout(SETTINGS.request_timeout_s) as time_limit:
                document = await asyncio.to_thread(read_document, Path(image), options, SETTINGS.limits)
                print(f"{len(document)} page(s), task {task_type!r}, preset {resolution_size!r}")
                results = await self._decode([p.image for p in document], prompt, preset, max_new_tokens)
        except TimeoutError:
            if time_limit.expired():
                raise JobTimeout(SETTINGS.request_timeout_s) from None
            raise
        out_dir = Path(tempfile.mkdtemp(prefix="deepseek-ocr-"))
        merged = await asyncio.to_thread(assemble_document, document, results, options, out_dir,
                                         self.engine.special_token_texts)
        return Output(
            text=merged.text,
            raw_output=merged.raw_output,
            regions=merged.regions,
            annotated_images=[CogPath(p) for p in merged.annotated_images],
            figures=[CogPath(p) for p in merged.figures],
            pages=merged.pages,
            blocks=merged.blocks,
        )

    async def _decode(self, images: list, prompt: str, preset, max_new_tokens: int) -> list:
        # The job exists before it is handed over: a cancellation during the hand-over still reaches it
        # (the serving thread drops a job cancelled before it takes it); one during `prepare` finds nothing
        # started.
        job = await asyncio.to_thread(self.engine.prepare, images, prompt, preset, max_new_tokens)
        try:
            await asyncio.to_thread(self.engine.start, job)
            await _finished(job)
            return job.wait()  # done: its results, or its error
        except BaseException:  # cancelled, timed out or failed: its pages leave the engine, freeing rows and blocks
            job.cancel()
            raise


async def _finished(job) -> None:
    """Until the job is done, holding no thread: asyncio.to_thread's pool has min(32, cores + 4) threads, so
    predictions each waiting in one would cap how many the engine sees at once below the declared concurrency."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def resolve() -> None:
        if not done.done():  # a cancelled prediction no longer awaits it
            done.set_result(None)

    def notify() -> None:  # in the thread that completes the job
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            loop.call_soon_threadsafe(resolve)

    job.add_done_callback(notify)
    await done
