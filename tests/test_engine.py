"""The engine decodes pages the same way through the fast batched path and the reference path."""

import pytest
import torch

from conftest import document_image
from ocr_service.engine import OCREngine, RuntimeChoice, checkpoint_tensor_shapes
from ocr_service.presets import resolution


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    cpu = torch.device("cpu")
    logs = []
    fast = OCREngine(tiny_checkpoint, RuntimeChoice(cpu, torch.float32, "sdpa", fast=True, max_batch=2), logs.append)
    reference = OCREngine(tiny_checkpoint, RuntimeChoice(cpu, torch.float32, "sdpa", fast=False), logs.append)
    return fast, reference, logs


def test_fast_and_reference_engines_agree_on_several_pages(engines):
    fast, reference, logs = engines
    pages = [document_image(700, 900, seed=i) for i in range(3)]  # more pages than batch rows
    for preset in ("Gundam (Recommended)", "Small"):
        prompt = "<image>\n<|grounding|>Convert the document to markdown."
        ours = fast.run_pages(pages, prompt, resolution(preset), 12)
        plain = reference.run_pages(pages, prompt, resolution(preset), 12)
        assert [r.token_ids for r in ours] == [r.token_ids for r in plain]
        assert [r.text for r in ours] == [r.text for r in plain]
        assert all(len(r.token_ids) == 12 and not r.finished for r in ours)
    assert any("3 page(s): 36 tokens" in line for line in logs)


def test_special_token_texts_come_from_the_tokenizer(engines):
    texts = engines[0].special_token_texts
    assert "<|ref|>" in texts and "<image>" in texts and len(texts) == 830


def test_checkpoint_tensor_shapes_match_the_file(tiny_checkpoint):
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint / "model-00001-of-000001.safetensors"), "pt") as handle:
        in_file = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    assert checkpoint_tensor_shapes(tiny_checkpoint) == in_file
