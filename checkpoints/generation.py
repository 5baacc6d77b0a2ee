"""Token selection for DeepSeek-OCR decoding: greedy or temperature sampling, the no-repeat n-gram rule
that keeps the model from repeating itself, and the loop detector that stops a page whose output has
become one block repeated over and over.

Each rule has two implementations that decide the same thing:
  - a host one for the reference path (one sequence, Python ints, incremental);
  - a tensor one for the batched path (B rows at once, fixed shapes, no host synchronisation, so that
    it can be captured in a CUDA graph; it also runs on the CPU).

Shapes in comments: B rows, S history length, V vocabulary, W window, P longest loop period.
"""

import copy
import functools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch

TD_TOKEN_ID = 128821  # <td>
TD_CLOSE_TOKEN_ID = 128822  # </td>

# Why a page stopped: `pages[].stop_reason`. The one definition; the service reads these too.
STOP_EOS = "eos"  # the model wrote its end-of-sequence token
STOP_MAX_NEW_TOKENS = "max_new_tokens"  # cut at the limit
STOP_REPETITION = "repetition"  # the output had become a loop (`LoopStopRule`)
STOP_REASONS = (STOP_EOS, STOP_MAX_NEW_TOKENS, STOP_REPETITION)


# ---------------------------------------------------------------------------------------------- n-gram rule

@dataclass(frozen=True)
class NoRepeatNGramRule:
    """Which n-grams may not repeat: a token is banned when it would complete an n-gram that is already
    there.

    window None: the whole sequence, prompt included, is searched (the original code's rule, the same
    as transformers' `no_repeat_ngram_size`). window W: only the generated tokens are searched, and only
    n-grams lying entirely within the last W of them (DeepSeek's serving rule). `exempt_ids` are never
    banned. ngram_size 0 turns the rule off.
    """

    ngram_size: int
    window: Optional[int] = None
    exempt_ids: frozenset = field(default_factory=frozenset)

    def __post_init__(self):
        object.__setattr__(self, "exempt_ids", frozenset(int(t) for t in self.exempt_ids))
        if self.ngram_size < 0:
            raise ValueError(f"ngram_size must be 0 (off) or positive, got {self.ngram_size}")
        if self.window is not None and self.window < self.ngram_size:
            raise ValueError(f"window ({self.window}) must hold at least one n-gram of {self.ngram_size}")

    @classmethod
    def whole_sequence(cls, ngram_size: int) -> "NoRepeatNGramRule":
        """The original's rule for an `no_repeat_ngram_size` int (0 or less: off)."""
        return cls(max(int(ngram_size), 0))

    @property
    def enabled(self) -> bool:
        return self.ngram_size > 0


# DeepSeek's serving scripts (images): no 30-gram twice within the last 90 generated tokens, and the
# table-cell tags may always repeat, so that a row of empty cells can be written out. The default.
SERVING_NO_REPEAT_RULE = NoRepeatNGramRule(30, window=90, exempt_ids={TD_TOKEN_ID, TD_CLOSE_TOKEN_ID})
# The original Hugging Face code: no 20-gram twice anywhere in the sequence (35 in `infer(eval_mode=True)`).
ORIGINAL_NO_REPEAT_RULE = NoRepeatNGramRule.whole_sequence(20)
ORIGINAL_EVAL_NO_REPEAT_RULE = NoRepeatNGramRule.whole_sequence(35)
NO_REPEAT_OFF = NoRepeatNGramRule(0)


class NoRepeatNGramGuard:
    """The n-gram rule for one sequence, kept incrementally: a table of (n-1)-gram → counts of the tokens
    that followed it, over the n-grams the rule searches. Each new token adds one n-gram (and, with a
    window, drops the one that left it), so a step costs O(n) instead of a rescan.

    `rule` may be an int, read as the original's whole-sequence rule of that size.
    """

    def __init__(self, rule: Union[NoRepeatNGramRule, int], prompt_ids: Iterable[int] = ()):
        self.rule = rule if isinstance(rule, NoRepeatNGramRule) else NoRepeatNGramRule.whole_sequence(rule)
        self.n = self.rule.ngram_size
        self.seen = []  # the tokens the rule searches: prompt + generated, or generated only (window)
        self.followers = defaultdict(Counter)  # (n-1)-gram → {next token: times}
        if self.rule.window is None:
            for token in prompt_ids:
                self.append(int(token))

    def append(self, token: int) -> None:
        """Record one generated token."""
        self.seen.append(int(token))
        length, n, window = len(self.seen), self.n, self.rule.window
        if n <= 0 or length < n:
            return
        self._count(length - n, +1)
        if window is not None and length - window - 1 >= 0:
            self._count(length - window - 1, -1)  # the n-gram that starts just before the window now

    def _count(self, start: int, delta: int) -> None:
        gram = self.seen[start:start + self.n]
        prefix = tuple(gram[:-1])
        counts = self.followers[prefix]
        counts[gram[-1]] += delta
        if counts[gram[-1]] == 0:
            del counts[gram[-1]]
            if not counts:
                del self.followers[prefix]

    def banned(self) -> set:
        n = self.n
        if n <= 0 or len(self.seen) < n:
            return set()
        prefix = tuple(self.seen[len(self.seen) - n + 1:])
        return set(self.followers.get(prefix, ())) - self.rule.exempt_ids

    def mask_banned(self, logits: torch.Tensor) -> torch.Tensor:
        banned = self.banned()
        if banned:
            logits = logits.clone()
            logits[list(banned)] = float("-inf")
        return logits


def mask_repeated_ngrams(logits: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor,
                         prompt_lengths: torch.Tensor, rule: NoRepeatNGramRule, in_place: bool = False) -> torch.Tensor:
    """The n-gram rule for a batch, as tensor operations: returns `logits` with each row's banned tokens
    set to -inf (a new tensor, or `logits` itself with `in_place`: the decode step's own logits, which
    nothing else reads, are not copied).

    logits [B, V] float; history [B, S] long, each row its prompt then its generated tokens (what lies
    past `lengths` is ignored); lengths [B] tokens in the history; prompt_lengths [B] of which prompt.
    No host synchronisation and shapes fixed by (B, S, rule), so it can be captured in a CUDA graph.
    With a window only the last W positions of each row are read: the cost does not grow with S.
    """
    n = rule.ngram_size
    if n <= 0:
        return logits
    device = history.device
    if rule.window is not None:
        window = rule.window
        window_indices = lengths[:, None] - window + torch.arange(window, device=device)  # [B, W] into history
        tokens = history.gather(1, window_indices.clamp(0, history.shape[1] - 1))  # [B, W]
        # An n-gram counts when its first token is a generated one (its last is then the row's latest or
        # earlier by construction); the serving rule never looks at the prompt.
        start_ok = (window_indices >= prompt_lengths[:, None])[:, : window - n + 1]  # [B, W-n+1]
        prefix = tokens[:, window - n + 1:]  # [B, n-1] the row's last n-1 tokens
    else:
        size = history.shape[1]
        if size < n:
            return logits
        tokens = history  # [B, S]
        last = lengths[:, None] - (n - 1) + torch.arange(n - 1, device=device)  # [B, n-1]
        prefix = history.gather(1, last.clamp(0, size - 1))
        starts = torch.arange(size - n + 1, device=device)
        start_ok = starts[None] + n - 1 < lengths[:, None]  # [B, S-n+1] the n-gram ends inside the row
    matches = _starts_matching_prefix(tokens, prefix, start_ok)  # [B, L-n+1]
    followers = tokens[:, n - 1:]  # [B, L-n+1] the token that completes each n-gram
    for token_id in sorted(rule.exempt_ids):
        matches &= followers != token_id
    # Lower each banned logit to -inf in one scatter; the other entries scatter +inf onto token 0,
    # which `amin` leaves unchanged.
    penalties = logits.new_full(matches.shape, float("inf")).masked_fill_(matches, float("-inf"))
    scatter = logits.scatter_reduce_ if in_place else logits.scatter_reduce
    return scatter(1, torch.where(matches, followers, 0), penalties, reduce="amin", include_self=True)


# A row's greedy choice in two steps when the vocabulary splits into this many equal slices of at least
# GREEDY_MIN_SLICE: the first index of each slice's maximum, then the first slice holding the row's maximum.
# PyTorch reduces a row to one index in one block: 27 µs for one row of 129,280 logits on the H200, 45 µs
# for 128 rows (benchmarks/results/h200-2026-11-30d profiles); each step of the split is parallel.
GREEDY_SLICES = 256
GREEDY_MIN_SLICE = 256


@functools.lru_cache(maxsize=None)
def _greedy_slices(vocab: int) -> int:
    return next((n for n in range(GREEDY_SLICES, 1, -1) if vocab % n == 0 and vocab // n >= GREEDY_MIN_SLICE), 1)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] → [B] the index of each row's largest logit, the first of equal ones (torch.argmax's
    choice; NaN counts as the largest, as there), without a host synchronisation."""
    rows, vocab = logits.shape
    slices = _greedy_slices(vocab)
    if slices == 1:
        return logits.argmax(dim=-1)
    width = vocab // slices
    slice_best, slice_index = logits.view(rows, slices, width).max(dim=-1)  # [B, S]: first index of ties
    best_slice = slice_best.argmax(dim=-1, keepdim=True)  # [B, 1]: the first slice holding the maximum
    return (slice_index.gather(1, best_slice) + best_slice * width)[:, 0]


def _starts_matching_prefix(tokens: torch.Tensor, prefix: torch.Tensor, start_ok: torch.Tensor) -> torch.Tensor:
    """[B, L-n+1]: where tokens[:, j : j+n-1] equals prefix (and start_ok). A short window is compared in
    one go ([B, L-n+1, n-1]); a whole history one offset at a time, never holding more than [B, L]."""
    starts, width = start_ok.shape[1], prefix.shape[1]
    if width == 0:
        return start_ok.clone()
    if tokens.shape[1] * width <= 1 << 16:
        grams = tokens.unfold(1, width, 1)[:, :starts]  # [B, L-n+1, n-1]
        return start_ok & (grams == prefix[:, None, :]).all(-1)
    matches = start_ok.clone()
    for offset in range(width):
        matches &= tokens[:, offset:offset + starts] == prefix[:, offset:offset + 1]
    return matches


# ---------------------------------------------------------------------------------------------- loops

@dataclass(frozen=True)
class LoopStopRule:
    """When a page's output counts as a loop, so that decoding stops.

    For each period p ≤ max_period, a stretch of output repeats with period p when each of its tokens
    equals the one p positions before, except a few: one differing token is forgiven for every
    `matches_per_difference` equal ones (at most two close together), in blocks of at least
    `forgiving_from_period` tokens that are not one token repeated. The forgiveness is there because
    the n-gram rule changes a looping model's output here and there (the serving rule bans a repeat
    within 90 tokens, so a model that keeps copying a 40-token row gets one token changed about every
    30), and an exact test would never see those loops. The output is a loop once such a stretch spans

        required_span(p) = max(min_span, min(min_repeats · p, long_span)) tokens,

    so an exact loop is stopped `long_span` tokens after it begins at the latest (a loop with changes
    counts from its last unforgiven difference). The page keeps its text up to where the stretch
    begins plus one copy of the block (`keep_length`): what the model meant to write once, it keeps
    once. When the text before the loop ends like the block does (rows ending in `</td></tr>`), the
    stretch begins at those shared tokens, and the kept copy stops short of the block's own ending.

    Why these numbers (estimates in tokens of DeepSeek's tokenizer; the tests' tiny tokenizer splits
    text into far more tokens, so they are on the strict side):
      - Real pages repeat short blocks, but not for long: dotted leaders and rules (period 1-2) stay
        within one line, under ~150 tokens; a row of empty cells (`<td></td>`, period 2) or a markdown
        separator (`| --- |`, period 2-3) has at most a few dozen columns, ~100 tokens. min_span = 256
        clears them; a model stuck on `<td></td>` is stopped after 256 tokens.
      - Lines and rows repeat more: a blank form is one row of empty cells many times (period
        2·columns + 2), a ruled log one row with only a date or a number changing. min_repeats = 100
        copies is more rows than a page holds, and long_span = 2048 tokens caps it for rows of more
        than 20 tokens: a blank table that long has ~1,000 empty cells. Real loops run on to
        max_new_tokens (8,192 by default), so stopping after 2,048 saves most of a loop's time.
      - matches_per_difference = 16: content whose copies differ in more than one token in 17 is never
        a loop, so numbered lists (a number every few tokens), tables of different values and leaders
        between different titles are not; a looping row changed once in 30 by the n-gram rule is.
        Blocks of 1 or 2 tokens (forgiving_from_period = 3), and blocks that are one token repeated,
        are never forgiven a difference: ruled, dashed and dotted lines broken by line breaks are not
        loops, however the tokenizer splits them.
      - max_period = 256 covers looping sentences, paragraphs and rows of ~25 filled cells, and two
        alternating copies of a row (which the serving rule can force).
    """

    enabled: bool = True
    max_period: int = 256
    min_repeats: int = 100
    min_span: int = 256
    long_span: int = 2048
    matches_per_difference: int = 16
    forgiving_from_period: int = 3

    def __post_init__(self):
        if self.max_period < 1:
            raise ValueError(f"max_period must be at least 1, got {self.max_period}")
        if self.min_repeats < 2:
            raise ValueError(f"min_repeats must be at least 2 (one copy is no repetition), got {self.min_repeats}")
        if self.long_span < 2 * self.max_period:
            raise ValueError(f"long_span ({self.long_span}) must hold two copies of the longest period "
                             f"({self.max_period})")
        if not 1 <= self.min_span <= self.long_span:
            raise ValueError(f"min_span must be between 1 and long_span ({self.long_span}), got {self.min_span}")
        if self.matches_per_difference < 1:
            raise ValueError(f"matches_per_difference must be at least 1, got {self.matches_per_difference}")
        if self.forgiving_from_period < 1:
            raise ValueError(f"forgiving_from_period must be at least 1, got {self.forgiving_from_period}")

    def required_span(self, period: int) -> int:
        return max(self.min_span, min(self.min_repeats * period, self.long_span))

    @property
    def credit_cap(self) -> int:
        return 2 * self.matches_per_difference


DEFAULT_LOOP_STOP = LoopStopRule()
LOOP_STOP_OFF = LoopStopRule(enabled=False)


class LoopDetector:
    """The loop rule for one sequence, fed one generated token at a time.

    For every period p: `runs[p]`, how many of the latest tokens belong to the stretch (each compared
    with the token p before; the last runs[p] + p tokens repeat with period p), and `credits[p]`, the
    equal tokens banked to forgive a differing one. O(max_period) per token. Once looping it stops
    changing: `looping` stays True and `keep_length` is final.
    """

    def __init__(self, rule: LoopStopRule = DEFAULT_LOOP_STOP):
        self.rule = rule
        self.required = [0] + [rule.required_span(p) for p in range(1, rule.max_period + 1)]
        self.recent = [-1] * rule.max_period  # recent[p - 1]: the token p positions back (-1: none yet)
        self.runs = [0] * (rule.max_period + 1)  # runs[p], p = 1..max_period
        self.credits = [0] * (rule.max_period + 1)
        self.generated = 0
        self.looping = False
        self.keep_length: Optional[int] = None  # generated tokens to keep, once looping

    def append(self, token: int) -> bool:
        """Record one generated token; True when the output is now a loop."""
        if not self.rule.enabled or self.looping:
            return self.looping
        rule, recent, runs, credits = self.rule, self.recent, self.runs, self.credits
        cost = rule.matches_per_difference
        # A difference is forgiven with enough credit, in a block that is long enough and not one token
        # repeated (the last runs[1] + 1 tokens, before this one, are one token repeated).
        same_token_run = runs[1] + 1
        self.generated += 1
        earliest = None  # (start of the stretch, period) of the loop found, earliest first
        for period in range(1, rule.max_period + 1):
            if recent[period - 1] == token:
                runs[period] += 1
                credits[period] = min(credits[period] + 1, rule.credit_cap)
            elif credits[period] >= cost and period >= rule.forgiving_from_period and period > same_token_run:
                runs[period] += 1
                credits[period] -= cost
            else:
                runs[period] = credits[period] = 0
            span = runs[period] + period
            if span >= self.required[period]:
                start = self.generated - span
                if earliest is None or start < earliest[0]:
                    earliest = (start, period)
        recent.insert(0, token)
        recent.pop()
        if earliest is not None:
            self.looping = True
            self.keep_length = earliest[0] + earliest[1]
        return self.looping


class BatchedLoopDetector:
    """The loop rule for B rows at once, on the device: the same counters as `LoopDetector`, as tensors of
    fixed shape, updated with one token per row per step (O(B · max_period), no host synchronisation).

    `looping` [B] and `keep_lengths` [B] are read by the host at its synchronisation points; a row's
    keep_length is the number of its generated tokens to keep, valid where looping. A looping row stops
    changing until `reset`.
    """

    def __init__(self, rule: LoopStopRule, max_batch: int, device=None):
        self.rule = rule
        periods = torch.arange(1, rule.max_period + 1, device=device)  # [P]
        self.periods = periods
        # A stretch of period p is a loop once runs[p] reaches required_span(p) - p.
        self.required_runs = torch.tensor([rule.required_span(p) - p for p in range(1, rule.max_period + 1)],
                                          device=device)  # [P]
        # A difference is forgiven at period p only while runs[1] < forgive_below[p]: the block is long
        # enough and not one token repeated (the last runs[1] + 1 tokens are one token repeated).
        self.forgive_below = torch.where(periods >= rule.forgiving_from_period, periods - 1, 0)  # [P]
        rows = dict(dtype=torch.long, device=device)
        self.recent = torch.full((max_batch, rule.max_period), -1, **rows)  # [B, P] [:, p-1]: token p back
        self.runs = torch.zeros(max_batch, rule.max_period, **rows)  # [B, P]
        self.credits = torch.zeros(max_batch, rule.max_period, **rows)  # [B, P]
        self.generated = torch.zeros(max_batch, **rows)  # [B]
        self.looping = torch.zeros(max_batch, dtype=torch.bool, device=device)  # [B]
        self.keep_lengths = torch.zeros(max_batch, **rows)  # [B]

    def tensors(self) -> list:
        """The state, every tensor with the row first: to save and restore around a graph capture, or to
        move a row. Row r of recent, runs and credits holds the host detector's recent, runs[1:] and
        credits[1:]."""
        return [self.recent, self.runs, self.credits, self.generated, self.looping, self.keep_lengths]

    def reset(self, rows) -> None:
        """Start rows (an int, a slice or an index tensor) afresh, for sequences just admitted."""
        self.recent[rows] = -1
        for tensor in (self.runs, self.credits, self.generated, self.keep_lengths):
            tensor[rows] = 0
        self.looping[rows] = False

    def update(self, next_tokens: torch.Tensor, active: Optional[torch.Tensor] = None,
               first_row: int = 0, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Record one generated token for rows first_row .. first_row + b - 1, or for the rows of the index
        tensor `rows` [b].

        next_tokens [b] long; active [b] bool, False for rows whose sequence has already ended (their
        state is left as it is). Returns those rows' `looping` [b] (a view of the state for a range of
        rows, a copy for an index).
        """
        if rows is not None:  # the same update on a copy of those rows, written back
            state = [tensor.index_select(0, rows) for tensor in self.tensors()]
            rows_state = copy.copy(self)  # the rule and its constants shared, the state its own
            (rows_state.recent, rows_state.runs, rows_state.credits, rows_state.generated, rows_state.looping,
             rows_state.keep_lengths) = state
            looping = rows_state.update(next_tokens, active)
            for tensor, value in zip(self.tensors(), state):
                tensor.index_copy_(0, rows, value)
            return looping
        rows = slice(first_row, first_row + next_tokens.shape[0])
        looping = self.looping[rows]  # [b]
        if not self.rule.enabled:
            return looping
        rule, cost, width = self.rule, self.rule.matches_per_difference, self.rule.max_period + 1
        recent, runs, credits, generated = self.recent[rows], self.runs[rows], self.credits[rows], self.generated[rows]
        observing = (~looping if active is None else active & ~looping)[:, None]  # [b, 1]
        tokens = next_tokens[:, None]  # [b, 1]
        same = recent == tokens  # [b, P] the token equals the one p back
        goes_on = same | ((credits >= cost) & (runs[:, :1] < self.forgive_below))  # equal, or forgiven
        new_runs = torch.where(goes_on, runs + 1, 0)  # [b, P]
        new_credits = torch.where(goes_on, (credits + torch.where(same, 1, -cost)).clamp(max=rule.credit_cap), 0)
        runs.copy_(torch.where(observing, new_runs, runs))
        credits.copy_(torch.where(observing, new_credits, credits))
        recent.copy_(torch.where(observing, torch.cat([tokens, recent[:, :-1]], dim=1), recent))
        generated += observing[:, 0]
        found = observing & (new_runs >= self.required_runs)  # [b, P]
        # The stretch of period p starts at generated - runs - p and keeps generated - runs tokens. Take
        # the earliest start, then the shortest period: key = start·(P+1) + period.
        keys = (generated[:, None] - new_runs) * width - self.periods * (width - 1)
        best = torch.where(found, keys, torch.iinfo(torch.long).max).amin(1)  # [b]
        newly = found.any(1)
        self.keep_lengths[rows] = torch.where(newly, best // width + best % width, self.keep_lengths[rows])
        looping |= newly
        return looping


def pick_next_token(logits: torch.Tensor, temperature: float = 0.0) -> int:
    """argmax for temperature 0, else a sample from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1))
