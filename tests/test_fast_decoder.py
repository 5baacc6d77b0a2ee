"""The fast batched decode path gives the reference path's greedy tokens (float32, CPU)."""

import random

import pytest
import torch

from checkpoints.generation import NoRepeatNGramGuard
from conftest import document_image
from ocr_service.fast_decoder import BatchGenerator, GenerationRequest, NgramBanGPU

PRESETS = [(512, 512, False), (640, 640, False), (1024, 1024, False), (1280, 1280, False), (1024, 640, True)]


def request_for(model, tokenizer, preset, seed, max_new_tokens, prompt="<image>\nFree OCR."):
    inputs = model.prepare_inputs(tokenizer, prompt, [document_image(600 + 150 * seed, 900, seed=seed)], *preset)
    with torch.inference_mode():
        embeds = model.model.embed_prompt(inputs.input_ids[None], inputs.image_mask[None], [inputs.images])[0]
    return inputs, GenerationRequest(inputs.input_ids, embeds, max_new_tokens)


@pytest.mark.parametrize("ngram", [3, 20])
def test_batched_fast_path_matches_reference_tokens(tiny_model, tiny_tokenizer, ngram):
    cases = [request_for(tiny_model, tiny_tokenizer, preset, seed, 24 + seed)
             for seed, preset in enumerate(PRESETS)]
    generator = BatchGenerator(tiny_model, max_batch=2, max_seq_len=1536 + 64, no_repeat_ngram_size=ngram,
                               sync_every=5)
    generator.generate([request for _, request in cases])  # 5 prompts through 2 rows: rows are reused
    for inputs, request in cases:
        reference, finished = tiny_model.generate_tokens(inputs, request.max_new_tokens, ngram)
        assert request.tokens == reference
        assert request.finished == finished


def test_each_sequence_stops_on_its_own(tiny_model, tiny_tokenizer):
    short = request_for(tiny_model, tiny_tokenizer, PRESETS[0], 0, 3)[1]
    long = request_for(tiny_model, tiny_tokenizer, PRESETS[0], 1, 30)[1]
    BatchGenerator(tiny_model, max_batch=4, max_seq_len=1536 + 64, sync_every=7).generate([short, long])
    assert len(short.tokens) == 3 and len(long.tokens) == 30


def test_gpu_ngram_rule_matches_the_guard():
    rng = random.Random(1)
    for n in (2, 3, 4):
        histories, guards, lengths = [], [], []
        for _ in range(6):
            seq = [rng.randrange(6) for _ in range(rng.randrange(1, 30))]
            histories.append(seq + [-1] * (40 - len(seq)))
            guards.append(NoRepeatNGramGuard(n, seq))
            lengths.append(len(seq))
        logits = torch.zeros(6, 6)
        banned = NgramBanGPU(n).apply(logits, torch.tensor(histories), torch.tensor(lengths))
        for row, guard in enumerate(guards):
            assert {t for t in range(6) if torch.isinf(banned[row, t])} == guard.banned()
