"""The no-repeat n-gram rules: the original's whole-sequence rule bans exactly what transformers' logits
processor bans, DeepSeek's serving rule (30-gram within the last 90 generated tokens, <td> and </td>
exempt) bans what its definition says, and the batched tensor version agrees with the host guard."""

import random

import pytest
import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from checkpoints.generation import (
    NO_REPEAT_OFF,
    ORIGINAL_EVAL_NO_REPEAT_RULE,
    ORIGINAL_NO_REPEAT_RULE,
    SERVING_NO_REPEAT_RULE,
    TD_CLOSE_TOKEN_ID,
    TD_TOKEN_ID,
    NoRepeatNGramGuard,
    NoRepeatNGramRule,
    greedy_tokens,
    mask_repeated_ngrams,
    pick_next_token,
)

TR, TR_CLOSE = 128823, 128824


def serving_rule_by_definition(generated: list, n: int, window: int, exempt: set) -> set:
    """DeepSeek's serving rule, read straight from its definition: over the generated ids only, every
    n-gram starting in [max(0, len - window), len - n] whose first n-1 ids equal the last n-1 ids bans
    its last id, unless that id is exempt."""
    if len(generated) < n:
        return set()
    prefix = generated[len(generated) - n + 1:]
    banned = {generated[i + n - 1] for i in range(max(0, len(generated) - window), len(generated) - n + 1)
              if generated[i:i + n - 1] == prefix}
    return banned - exempt


def banned_by_rows(logits: torch.Tensor) -> list:
    return [set(torch.nonzero(torch.isinf(row)).flatten().tolist()) for row in logits]


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


def test_windowed_guard_matches_the_serving_rule_definition():
    rng = random.Random(1)
    for n, window in ((2, 2), (3, 7), (4, 10), (5, 30), (30, 90)):
        for trial in range(12):
            vocab = rng.choice((3, 5, 12))
            exempt = set(rng.sample(range(vocab), rng.randrange(0, 2)))
            rule = NoRepeatNGramRule(n, window=window, exempt_ids=exempt)
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 30))]
            guard = NoRepeatNGramGuard(rule, prompt)  # the serving rule ignores the prompt
            generated = []
            for _ in range(160):
                expected = serving_rule_by_definition(generated, n, window, exempt)
                assert guard.banned() == expected, (n, window, generated)
                # Mostly repeat the token from a few positions back, so that bans happen.
                back = rng.randrange(1, 4)
                token = generated[-back] if len(generated) >= back and rng.random() < 0.8 else rng.randrange(vocab)
                guard.append(token)
                generated.append(token)


def test_whole_sequence_guard_with_exempt_ids_bans_the_rest():
    rule = NoRepeatNGramRule(2, exempt_ids={7})
    guard = NoRepeatNGramGuard(rule, [5, 7, 5, 8, 5])
    assert guard.banned() == {8}  # 5→7 and 5→8 were seen; 7 is exempt


def test_guard_blocks_a_loop():
    guard = NoRepeatNGramGuard(3, [5, 6, 7, 5, 6])
    assert guard.banned() == {7}
    assert torch.isinf(guard.mask_banned(torch.zeros(10))[7])


def test_guard_off_for_non_positive_sizes():
    assert NoRepeatNGramGuard(0, [1, 1, 1, 1]).banned() == set()
    assert NoRepeatNGramGuard(-3, [1, 1, 1, 1]).banned() == set()
    assert NoRepeatNGramGuard(NO_REPEAT_OFF, [1, 1, 1, 1]).banned() == set()
    history = torch.tensor([[1, 1, 1, 1]])
    logits = torch.zeros(1, 4)
    assert mask_repeated_ngrams(logits, history, torch.tensor([4]), torch.tensor([0]), NO_REPEAT_OFF) is logits


def test_named_rules():
    assert (SERVING_NO_REPEAT_RULE.ngram_size, SERVING_NO_REPEAT_RULE.window) == (30, 90)
    assert SERVING_NO_REPEAT_RULE.exempt_ids == {TD_TOKEN_ID, TD_CLOSE_TOKEN_ID} == {128821, 128822}
    assert ORIGINAL_NO_REPEAT_RULE == NoRepeatNGramRule.whole_sequence(20) == NoRepeatNGramRule(20)
    assert ORIGINAL_EVAL_NO_REPEAT_RULE == NoRepeatNGramRule(35, window=None, exempt_ids=())
    assert NoRepeatNGramGuard(20).rule == ORIGINAL_NO_REPEAT_RULE


def test_rule_rejects_impossible_settings():
    with pytest.raises(ValueError, match="window"):
        NoRepeatNGramRule(30, window=20)
    with pytest.raises(ValueError, match="ngram_size"):
        NoRepeatNGramRule(-1)


def random_batch(rng, rows: int, size: int, vocab: int):
    """Histories of different lengths, each a prompt then generated tokens, padded with -1 or with
    leftovers of an earlier sequence (the rule must read neither)."""
    histories, lengths, prompt_lengths, sequences = [], [], [], []
    for _ in range(rows):
        length = rng.randrange(0, size + 1)
        prompt_length = rng.randrange(0, length + 1)
        sequence = []
        for _ in range(length):
            repeat = sequence and rng.random() < 0.7
            sequence.append(sequence[-rng.randrange(1, min(len(sequence), 5) + 1)] if repeat else rng.randrange(vocab))
        padding = -1 if rng.random() < 0.5 else rng.randrange(vocab)
        histories.append(sequence + [padding] * (size - length))
        lengths.append(length)
        prompt_lengths.append(prompt_length)
        sequences.append(sequence)
    return (torch.tensor(histories, dtype=torch.long), torch.tensor(lengths), torch.tensor(prompt_lengths),
            sequences)


def host_banned(rule: NoRepeatNGramRule, sequence: list, prompt_length: int) -> set:
    guard = NoRepeatNGramGuard(rule, sequence[:prompt_length])
    for token in sequence[prompt_length:]:
        guard.append(token)
    return guard.banned()


@pytest.mark.parametrize("size", [48, 3000])  # a short history is compared in one go, a long one by offsets
def test_tensor_rule_matches_the_guard(size):
    rng = random.Random(size)
    vocab = 9
    rules = [NoRepeatNGramRule(1), NoRepeatNGramRule(2), NoRepeatNGramRule(3, exempt_ids={4}), NoRepeatNGramRule(23),
             NoRepeatNGramRule(1, window=4), NoRepeatNGramRule(2, window=5, exempt_ids={0, 8}),
             NoRepeatNGramRule(4, window=9), NoRepeatNGramRule(8, window=40),
             NoRepeatNGramRule(30, window=90, exempt_ids={2})]
    for rule in rules:
        for _ in range(3):
            history, lengths, prompt_lengths, sequences = random_batch(rng, 7, size, vocab)
            logits = torch.randn(7, vocab)
            masked = mask_repeated_ngrams(logits, history, lengths, prompt_lengths, rule)
            for row, sequence in enumerate(sequences):
                expected = host_banned(rule, sequence, int(prompt_lengths[row]))
                assert banned_by_rows(masked)[row] == expected, (rule, row)
                kept = [t for t in range(vocab) if t not in expected]
                assert torch.equal(masked[row, kept], logits[row, kept])


def test_tensor_rule_in_place_bans_the_same_tokens_in_the_same_tensor():
    rng = random.Random(5)
    history, lengths, prompt_lengths, _ = random_batch(rng, 7, 48, 9)
    rule = NoRepeatNGramRule(2, window=5, exempt_ids={0})
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(7, 9).to(dtype)
        expected = mask_repeated_ngrams(logits, history, lengths, prompt_lengths, rule)
        assert any(banned_by_rows(expected)), "the batch bans nothing: the comparison would be empty"
        masked = mask_repeated_ngrams(logits, history, lengths, prompt_lengths, rule, in_place=True)
        assert masked is logits and torch.equal(masked, expected)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_is_argmax_ties_included(device, dtype):
    generator = torch.Generator().manual_seed(3)
    for rows, vocab in ((1, 129280), (5, 129280), (3, 1000), (2, 97)):  # split in 256 slices, in 2, not split
        # Few distinct values, so that a row's maximum is often tied within a slice and across slices.
        logits = torch.randint(-4, 4, (rows, vocab), generator=generator).to(dtype)
        logits[0, -1] = 10  # the maximum in the last slice alone
        logits[-1, :] = 1  # a row of equal logits: the first index
        logits = logits.to(device)
        assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1)), (rows, vocab)
    banned = torch.zeros(2, 129280, dtype=dtype, device=device)
    banned[:, 7] = float("-inf")
    assert greedy_tokens(banned).tolist() == [0, 0]


def test_tensor_rule_on_the_serving_rule_with_real_table_tokens():
    # A row of 12 empty cells under a prompt: the history holds several rows at different points of it.
    prompt = [0, 128815, 128815, 128815, 201]
    row = [TR] + [TD_TOKEN_ID, TD_CLOSE_TOKEN_ID] * 12 + [TR_CLOSE]
    generated = [64, 65, 66] + row + row
    history = torch.full((len(generated), 200), -1)
    lengths, prompt_lengths, expected = [], [], []
    for cut in range(len(generated)):
        sequence = prompt + generated[:cut]
        history[cut, :len(sequence)] = torch.tensor(sequence)
        lengths.append(len(sequence))
        prompt_lengths.append(len(prompt))
        expected.append(host_banned(SERVING_NO_REPEAT_RULE, sequence, len(prompt)))
    masked = mask_repeated_ngrams(torch.zeros(len(generated), 128830), history, torch.tensor(lengths),
                                  torch.tensor(prompt_lengths), SERVING_NO_REPEAT_RULE)
    assert banned_by_rows(masked) == expected


def first_banned_step(rule: NoRepeatNGramRule, prompt: list, generated: list):
    """The index of the first token of `generated` that `rule` would have banned, or None."""
    guard = NoRepeatNGramGuard(rule, prompt)
    for step, token in enumerate(generated):
        if token in guard.banned():
            return step
        guard.append(token)
    return None


def test_a_row_of_twelve_empty_cells_under_each_rule():
    prompt = [0, 128815, 128815, 201, 128820, 36, 80, 87, 201]  # <image>…\n<|grounding|>Conv…
    table = [60, 86, 67, 68, 71, 69, 62]  # "<table>" as text tokens
    row = [TR] + [TD_TOKEN_ID, TD_CLOSE_TOKEN_ID] * 12 + [TR_CLOSE]
    generated = table + row
    assert first_banned_step(SERVING_NO_REPEAT_RULE, prompt, generated) is None
    # The original's rule bans the 11th </td>: the 22nd token of <td></td><td></td>… would repeat the
    # 20-gram that began the alternation.
    step = first_banned_step(ORIGINAL_NO_REPEAT_RULE, prompt, generated)
    assert step == len(table) + 1 + 21 and generated[step] == TD_CLOSE_TOKEN_ID


def test_the_serving_rule_still_bans_the_end_of_a_third_identical_short_row():
    # Only <td> and </td> are exempt: a third identical row of 12 empty cells (26 tokens, well inside the
    # 90-token window) repeats a 30-gram ending in </tr>, which is banned.
    row = [TR] + [TD_TOKEN_ID, TD_CLOSE_TOKEN_ID] * 12 + [TR_CLOSE]
    generated = [60, 86, 67] + row * 3
    step = first_banned_step(SERVING_NO_REPEAT_RULE, [0], generated)
    assert step == 3 + 3 * len(row) - 1 and generated[step] == TR_CLOSE
    widened = NoRepeatNGramRule(30, window=90, exempt_ids={TD_TOKEN_ID, TD_CLOSE_TOKEN_ID, TR, TR_CLOSE})
    assert first_banned_step(widened, [0], generated) is None


def test_a_sentence_repeated_400_tokens_later(tiny_tokenizer):
    sentence = tiny_tokenizer.encode("Confidential: this notice must appear on every page of the agreement, "
                                     "as section 12 requires.", add_special_tokens=False)
    assert len(sentence) >= 30
    rng = random.Random(3)
    filler = [rng.randrange(100, 500) for _ in range(400)]
    generated = sentence + filler + sentence
    assert first_banned_step(SERVING_NO_REPEAT_RULE, [0, 128815], generated) is None
    # The original's rule bans the token that completes the sentence's first 20-gram, 400 tokens later.
    step = first_banned_step(ORIGINAL_NO_REPEAT_RULE, [0, 128815], generated)
    assert step == len(sentence) + len(filler) + 19


def capture(function, *arguments):
    """Capture `function(*arguments)` as a CUDA graph (after a warm-up on a side stream, as the engine does);
    returns the graph and the output tensor its replays write."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function(*arguments)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = function(*arguments)
    return graph, output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule", [SERVING_NO_REPEAT_RULE, ORIGINAL_NO_REPEAT_RULE], ids=["serving", "original"])
def test_tensor_rule_replays_in_a_cuda_graph(rule):
    # Real ids (the exempt table tags among them) and a full vocabulary; each replay reads new contents of
    # the same buffers, as the engine's decode step does.
    real_ids = torch.tensor([TD_TOKEN_ID, TD_CLOSE_TOKEN_ID, TR, TR_CLOSE, 201, 60, 61, 62, 63])
    vocab, rows, size = 129280, 8, 10240
    rng = random.Random(11)

    def batch():
        history, lengths, prompt_lengths, _ = random_batch(rng, rows, size, len(real_ids))
        history = torch.where(history >= 0, real_ids[history.clamp(min=0)], history)
        return torch.randn(rows, vocab), history, lengths, prompt_lengths

    buffers = [t.cuda() for t in batch()]
    graph, output = capture(lambda *args: mask_repeated_ngrams(*args, rule), *buffers)
    for _ in range(3):
        inputs = batch()
        for buffer, value in zip(buffers, inputs):
            buffer.copy_(value)
        graph.replay()
        assert torch.equal(output.cpu(), mask_repeated_ngrams(*inputs, rule))


def test_pick_next_token_greedy_and_sampled():
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert pick_next_token(logits) == 1
    torch.manual_seed(0)
    samples = {pick_next_token(logits, temperature=5.0) for _ in range(200)}
    assert samples == {0, 1, 2}
