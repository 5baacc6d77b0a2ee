"""The no-repeat n-gram guard bans exactly what transformers' logits processor bans."""

import random

import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from checkpoints.generation import NoRepeatNGramGuard, pick_next_token


def test_guard_matches_transformers_on_random_repetitive_sequences():
    rng = random.Random(0)
    vocab = 12
    for n in (2, 3, 5, 20):
        for _ in range(30):
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
            guard = NoRepeatNGramGuard(n, prompt)
            sequence = list(prompt)
            processor = NoRepeatNGramLogitsProcessor(n)
            for _ in range(60):
                logits = torch.zeros(vocab)
                ours = guard.mask_banned(logits)
                theirs = processor(torch.tensor([sequence or [0]]) if sequence else torch.zeros(1, 0, dtype=torch.long),
                                   logits[None].clone())[0]
                assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), (n, sequence)
                token = rng.choice([t for t in range(vocab) if not torch.isinf(ours[t])] or [0])
                guard.append(token)
                sequence.append(token)


def test_guard_blocks_a_loop():
    guard = NoRepeatNGramGuard(3, [5, 6, 7, 5, 6])
    assert guard.banned() == {7}
    assert torch.isinf(guard.mask_banned(torch.zeros(10))[7])


def test_guard_off_for_non_positive_sizes():
    guard = NoRepeatNGramGuard(0, [1, 1, 1, 1])
    assert guard.banned() == set()


def test_pick_next_token_greedy_and_sampled():
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert pick_next_token(logits) == 1
    torch.manual_seed(0)
    samples = {pick_next_token(logits, temperature=5.0) for _ in range(200)}
    assert samples == {0, 1, 2}
