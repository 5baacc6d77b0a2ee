"""Task prompts and resolution presets are exactly the product's, and reference text cannot inject tokens."""

import pytest

from ocr_service.errors import InputError
from ocr_service.presets import (
    DEFAULT_RESOLUTION, DEFAULT_TASK_TYPE, RESOLUTIONS, TASK_TYPES, Resolution, build_prompt, resolution,
)


def test_task_prompts():
    assert TASK_TYPES == ("Convert to Markdown", "Free OCR", "Parse Figure", "Locate Object by Reference")
    assert DEFAULT_TASK_TYPE == "Convert to Markdown"
    assert build_prompt("Convert to Markdown") == "<image>\n<|grounding|>Convert the document to markdown."
    assert build_prompt("Free OCR") == "<image>\nFree OCR."  # not the markdown prompt (the old predictor's bug)
    assert build_prompt("Parse Figure") == "<image>\nParse the figure."
    assert build_prompt("Locate Object by Reference", "the red stamp") == \
        "<image>\nLocate <|ref|>the red stamp<|/ref|> in the image."
    assert build_prompt("Free OCR", "ignored <|ref|>") == "<image>\nFree OCR."


def test_resolution_presets():
    assert RESOLUTIONS == ("Gundam (Recommended)", "Tiny", "Small", "Base", "Large")
    assert DEFAULT_RESOLUTION == "Gundam (Recommended)"
    assert resolution("Gundam (Recommended)") == Resolution(1024, 640, True)
    assert resolution("Tiny") == Resolution(512, 512, False)
    assert resolution("Small") == Resolution(640, 640, False)
    assert resolution("Base") == Resolution(1024, 1024, False)
    assert resolution("Large") == Resolution(1280, 1280, False)
    with pytest.raises(InputError, match="Tiny"):
        resolution("Huge")
    with pytest.raises(InputError, match="Free OCR"):
        build_prompt("Summarise")


@pytest.mark.parametrize("text", [None, "", "   \n\t "])
def test_locate_needs_reference_text(text):
    with pytest.raises(InputError, match="reference_text is required"):
        build_prompt("Locate Object by Reference", text)


def test_reference_text_is_put_on_one_line():
    assert build_prompt("Locate Object by Reference", "  the\nsecond\t\ttable  ") == \
        "<image>\nLocate <|ref|>the second table<|/ref|> in the image."


@pytest.mark.parametrize("text", ["a<|/ref|>b", "<image>", "x <|det|>[[1,2,3,4]]", "<|grounding|>", "<td>cell",
                                  "</tr>", "<｜end▁of▁sentence｜>", "<|User|>", "<|anything|>"])
def test_reference_text_cannot_carry_special_tokens(text):
    with pytest.raises(InputError, match="special tokens"):
        build_prompt("Locate Object by Reference", text)


def test_reference_text_limit_and_tokenizer_tokens():
    with pytest.raises(InputError, match="limit is 500"):
        build_prompt("Locate Object by Reference", "x" * 501)
    assert build_prompt("Locate Object by Reference", "x" * 500).count("x") == 500
    with pytest.raises(InputError, match="special tokens"):
        build_prompt("Locate Object by Reference", "a <custom> b", extra_forbidden=["<custom>"])
    # Angle brackets that are not tokens are ordinary text.
    assert "a < b > c" in build_prompt("Locate Object by Reference", "a < b > c")
