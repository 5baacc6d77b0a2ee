"""Token selection for DeepSeek-OCR decoding: greedy or temperature sampling, and the
no-repeat n-gram guard that stops the model from looping on a document."""

from collections import defaultdict

import torch


class NoRepeatNGramGuard:
    """Bans any token that would complete an n-gram already present in the sequence.

    Same rule as transformers' `no_repeat_ngram_size`, applied over the whole sequence (prompt
    included), kept incrementally: each new token adds one n-gram to a prefix → next-tokens table,
    so a step costs O(n) instead of a rescan of the sequence.
    """

    def __init__(self, n: int, prompt_ids):
        self.n = n
        self.sequence = []
        self.followers = defaultdict(set)  # (n-1)-gram → tokens seen right after it
        for token in prompt_ids:
            self.append(int(token))

    def append(self, token: int) -> None:
        self.sequence.append(token)
        if self.n > 0 and len(self.sequence) >= self.n:
            gram = self.sequence[-self.n:]
            self.followers[tuple(gram[:-1])].add(gram[-1])

    def banned(self) -> set:
        if self.n <= 0 or len(self.sequence) + 1 < self.n:
            return set()
        return self.followers.get(tuple(self.sequence[len(self.sequence) - self.n + 1:]), set())

    def mask_banned(self, logits: torch.Tensor) -> torch.Tensor:
        banned = self.banned()
        if banned:
            logits = logits.clone()
            logits[list(banned)] = float("-inf")
        return logits


def pick_next_token(logits: torch.Tensor, temperature: float = 0.0) -> int:
    """argmax for temperature 0, else a sample from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1))
