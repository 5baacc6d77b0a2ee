"""One document through the engine, as a prediction runs it: check the options, read the pages, submit
them, assemble the result. The predictor and the bulk command (`bulk.py`, `bulk_ray.py`) share these
steps, so that a document gives the same output either way.

Reading needs neither torch nor the model: what does is imported where it is used, so that processes that
only read documents (Ray's CPU workers) stay small.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .errors import InputError
from .inputs import Limits, load_pages
from .presets import DEFAULT_RESOLUTION, DEFAULT_TASK_TYPE, build_prompt, resolution

MARKDOWN_TASK = "Convert to Markdown"  # the task whose `text` is clean markdown with figure links
# Figure crops and annotated pages, in the folder of a document's JSON: where its markdown links the
# figures (checkpoints.grounding.FIGURE_PREFIX; a test checks that they agree).
FILES_FOLDER = "images"


def engine_max_new_tokens() -> int:
    from .engine import MAX_NEW_TOKENS

    return MAX_NEW_TOKENS


@dataclass(frozen=True)
class Options:
    """The predictor's inputs other than the file, with its defaults."""

    task_type: str = DEFAULT_TASK_TYPE
    resolution_size: str = DEFAULT_RESOLUTION
    pages: str = ""
    max_new_tokens: int = field(default_factory=engine_max_new_tokens)
    reference_text: str = ""

    def prompt_and_preset(self, special_token_texts: Iterable[str] = ()) -> tuple:
        """(prompt, Resolution), or InputError saying which option is wrong."""
        limit = engine_max_new_tokens()
        if not 1 <= self.max_new_tokens <= limit:
            raise InputError(f"max_new_tokens={self.max_new_tokens} is out of range: use 1 to {limit}")
        prompt = build_prompt(self.task_type, self.reference_text, extra_forbidden=special_token_texts)
        return prompt, resolution(self.resolution_size)

    def as_dict(self) -> dict:
        return asdict(self)


def read_document(path: Path, options: Options, limits: Limits) -> list:
    """The pages of `path` the options select, within the limits (InputError otherwise)."""
    return load_pages(path, pages=options.pages or None, **limits.as_kwargs())


def submit_document(engine, pages: list, prompt: str, preset, options: Options, background: bool = False):
    """The engine's Job for the pages (InputError when a page cannot fit the engine); `background`: one of a bulk
    run's documents, whose first page nobody waits on (`OCREngine.prepare`)."""
    return engine.submit([page.image for page in pages], prompt, preset, options.max_new_tokens, background)


def wait_for(job, timeout: Optional[float]) -> list:
    """The job's PageResults; a job that fails, times out or is interrupted here leaves the engine."""
    try:
        return job.wait(timeout)
    except BaseException:
        job.cancel()
        raise


def page_outputs(pages: list, results: list) -> list:
    from .document import PageOutput

    return [
        PageOutput(page.number, result.text, len(result.token_ids), result.image_tokens, result.finished,
                   result.seconds, result.stop_reason, result.first_token_s)
        for page, result in zip(pages, results)
    ]


def assemble_document(pages: list, results: list, options: Options, files_dir: Path,
                      added_tokens: Iterable[str] = ()) -> "DocumentOutput":
    """The document's result; figure crops and annotated pages are written into `files_dir`.
    `added_tokens`: the tokenizer's added vocabulary (`OCREngine.special_token_texts`), whose tokens that
    are not content are kept out of the text."""
    from .document import assemble

    return assemble(page_outputs(pages, results), [page.image for page in pages],
                    options.task_type == MARKDOWN_TASK, Path(files_dir), added_tokens)


def run_document(engine, path: Path, options: Options, limits: Limits, files_dir: Path,
                 timeout: Optional[float]) -> tuple:
    """(pages, PageResults, DocumentOutput) of one document, the predictor's steps in order."""
    prompt, preset = options.prompt_and_preset(engine.special_token_texts)
    pages = read_document(path, options, limits)
    results = wait_for(submit_document(engine, pages, prompt, preset, options), timeout)
    return pages, results, assemble_document(pages, results, options, files_dir, engine.special_token_texts)


def output_fields(merged: "DocumentOutput", relative_to: Path) -> dict:
    """The predictor's Output as JSON data, its files named by their paths relative to `relative_to`."""
    def relative(paths: list) -> list:
        return [Path(p).relative_to(relative_to).as_posix() for p in paths]

    return {
        "text": merged.text,
        "raw_output": merged.raw_output,
        "regions": merged.regions,
        "annotated_images": relative(merged.annotated_images),
        "figures": relative(merged.figures),
        "pages": merged.pages,
        "blocks": merged.blocks,
    }


def write_document(merged: "DocumentOutput", folder: Path, json_name: str, markdown_name: str) -> None:
    """The output JSON and the markdown (`text`) beside the files `assemble_document` wrote into
    folder/FILES_FOLDER."""
    (folder / json_name).write_text(json.dumps(output_fields(merged, folder), ensure_ascii=False, indent=1),
                                    encoding="utf-8")
    (folder / markdown_name).write_text(merged.text, encoding="utf-8")
    files = folder / FILES_FOLDER
    if files.is_dir() and not any(files.iterdir()):
        files.rmdir()  # nothing grounded: no empty folder
