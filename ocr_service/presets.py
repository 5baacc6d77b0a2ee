"""The predictor's choices: task types (→ prompt) and resolution presets (→ view sizes and cropping)."""

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .errors import InputError

LOCATE_TASK = "Locate Object by Reference"
PROMPTS = {
    "Convert to Markdown": "<image>\n<|grounding|>Convert the document to markdown.",
    "Free OCR": "<image>\nFree OCR.",
    "Parse Figure": "<image>\nParse the figure.",
    LOCATE_TASK: "<image>\nLocate <|ref|>{reference_text}<|/ref|> in the image.",
}
TASK_TYPES = tuple(PROMPTS)
DEFAULT_TASK_TYPE = "Convert to Markdown"


@dataclass(frozen=True)
class Resolution:
    base_size: int  # side of the global view
    image_size: int  # side of a tile (crop mode) or of the only view
    crop_mode: bool  # tile large images ("Gundam")
    # The resolution_size it was chosen by: an engine serving another model than the one whose geometry this
    # is reads the choice with its own (OCREngine.prepare). None: geometry given directly, used as it is.
    choice: Optional[str] = field(default=None, compare=False)


# The predictor's resolution_size choices, each the name of a resolution mode of the model's processing module
# (its RESOLUTION_MODES, which hold the geometry): every mode of the first model. A model without a mode of that
# name refuses the choice.
MODE_OF_CHOICE = {
    "Gundam (Recommended)": "Gundam",
    "Tiny": "Tiny",
    "Small": "Small",
    "Base": "Base",
    "Large": "Large",
}
RESOLUTIONS = tuple(MODE_OF_CHOICE)
DEFAULT_RESOLUTION = "Gundam (Recommended)"


def model_presets(processing) -> dict:
    """resolution_size choice → Resolution, for the choices the model whose processing module this is has."""
    modes = processing.RESOLUTION_MODES
    return {name: Resolution(*modes[mode], choice=name) for name, mode in MODE_OF_CHOICE.items() if mode in modes}


MAX_REFERENCE_CHARS = 500
# What the DeepSeek tokenizer would read as control tokens rather than text.
SPECIAL_TOKEN_PATTERN = re.compile(r"<\|[^<>|]*\|>|<｜[^<>｜]*｜>|<image>|</?td>|</?tr>", re.IGNORECASE)


def resolution(name: str, presets: Optional[dict] = None, model_title: str = "DeepSeek-OCR") -> Resolution:
    """The geometry of a resolution_size choice for a model: `presets` is its `model_presets` (the engine's
    `presets`); without them, the first model's, which an engine serving DeepSeek-OCR 2 replaces by its own
    for the same choice (the choice travels with the Resolution)."""
    if presets is None:
        from checkpoints import processing_deepseekocr  # torch: only where a preset is resolved

        presets = model_presets(processing_deepseekocr)
    if name in presets:
        return presets[name]
    choices = ", ".join(presets)
    if name in RESOLUTIONS:
        raise InputError(f"resolution_size {name!r} has no equivalent in {model_title}, the model this service "
                         f"runs; choose one of {choices}")
    raise InputError(f"unknown resolution_size {name!r}; choose one of {choices}")


def clean_reference_text(text: Optional[str], extra_forbidden: Iterable[str] = ()) -> str:
    """The object description for the Locate prompt, on one line, with nothing that reads as a control token."""
    cleaned = " ".join((text or "").split())  # newlines and tabs would break the prompt's format
    if not cleaned:
        raise InputError(f"reference_text is required for '{LOCATE_TASK}': say what to locate")
    if len(cleaned) > MAX_REFERENCE_CHARS:
        raise InputError(f"reference_text is {len(cleaned)} characters long; the limit is {MAX_REFERENCE_CHARS}")
    found = SPECIAL_TOKEN_PATTERN.search(cleaned)
    if found is None:
        found_text = next((t for t in extra_forbidden if t and t in cleaned), None)
    else:
        found_text = found.group(0)
    if found_text is not None:
        raise InputError(f"reference_text must not contain special tokens such as {found_text!r}")
    return cleaned


def build_prompt(task_type: str, reference_text: Optional[str] = None, extra_forbidden: Iterable[str] = ()) -> str:
    """The model prompt for a task; reference_text is used (and required) only to locate an object."""
    if task_type not in PROMPTS:
        raise InputError(f"unknown task_type {task_type!r}; choose one of {', '.join(TASK_TYPES)}")
    if task_type != LOCATE_TASK:
        return PROMPTS[task_type]
    return PROMPTS[task_type].format(reference_text=clean_reference_text(reference_text, extra_forbidden))
