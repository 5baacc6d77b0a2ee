"""Who runs next: the serving policy, as plain bookkeeping (no torch, no device), so that it can be
tested on its own.

Predictions hand in pages. A page goes through stages — preprocessing (CPU), vision encoding (GPU,
batched across pages), admission to a decode row with its prompt's cache blocks (prefill, batched),
decoding — and ends done. At every stage the policy picks pages round robin across predictions: the
prediction picked least recently goes first, and one never picked at that stage goes before all that
were (oldest arrival first). So the page of a one-page prediction arriving behind a 100-page job is
the next page picked at every stage (its first token comes promptly), after which the predictions
alternate: a long PDF cannot take every row.

Memory is bounded here too: pages in flight between preprocessing and admission are capped
(their images, pixels and embeddings wait in memory), and cache blocks are handed out from a fixed
pool (`BlockPool`). A running sequence grows block by block; when the pool runs dry, the sequence
admitted last among those of the prediction holding the most rows is preempted: its blocks return to
the pool and it waits to be admitted again, resuming from the tokens it had (its cache is recomputed).
Nothing is ever written to a block another sequence owns.

The engine (`engine.py`) owns the device and asks this object what to do; this object never waits.
Each page has one record (`Page`) and each prediction one (`Prediction`), and only this module writes
them: the engine reads them, and reports what happened on its side (a page preprocessed or encoded, the
cache lengths the device read, the tokens a preempted page had) through the methods named for those
events. `Page.payload` is the engine's own (its inputs, embeddings, results), which this module never reads.
"""

import itertools
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional


class Stage(Enum):
    QUEUED = "queued"  # waiting for preprocessing
    PREPROCESSING = "preprocessing"
    PREPROCESSED = "preprocessed"  # views ready, waiting for the vision encoder
    ENCODING = "encoding"
    ENCODED = "encoded"  # prompt embeddings ready, waiting for a row and blocks
    RUNNING = "running"  # holds a row and blocks
    DONE = "done"  # finished, failed or cancelled: holds nothing


@dataclass(eq=False)
class Page:
    prediction: "Prediction"
    index: int  # position in its prediction (0-based)
    prompt_tokens: int  # known before preprocessing: it sizes the blocks the prompt needs
    max_new_tokens: int
    stage: Stage = Stage.QUEUED
    row: Optional[int] = None
    blocks: list = field(default_factory=list)
    cache_length: int = 0  # positions it holds in the cache, as the device last reported (0 when not running)
    generated_tokens: list = field(default_factory=list)  # kept across a preemption (resumed from)
    admitted: int = 0  # the policy's clock at its (latest) admission
    payload: Any = None  # the engine's data for this page (inputs, embeddings, results): the engine writes it

    @property
    def context_tokens(self) -> int:
        """Positions the sequence holds in the cache when (re)admitted: its prompt and the tokens it resumes from."""
        return self.prompt_tokens + max(len(self.generated_tokens) - 1, 0)


@dataclass(eq=False)
class Prediction:
    id: Any
    pages: list = field(default_factory=list)
    order: int = 0  # when it arrived, on the policy's clock
    last_pick: dict = field(default_factory=dict)  # stage → the policy's clock when it last had a page picked
    closed: bool = False  # it has left (completed, cancelled, failed or timed out): nothing of it is picked
    background: bool = False  # nobody waits on its first token (a bulk run's document): see `goes_first`

    def pages_in(self, stage: Stage) -> list:
        return [p for p in self.pages if p.stage is stage]

    @property
    def finished(self) -> bool:
        return all(p.stage is Stage.DONE for p in self.pages)


class BlockPool:
    """Fixed pool of cache blocks numbered 1..count (block 0 is the shared scratch block of rows that
    hold no sequence, never handed out)."""

    def __init__(self, count: int, block_size: int):
        if count < 1:
            raise ValueError("the cache needs at least one block")
        self.block_size = block_size
        self.capacity = count
        self._free = list(range(count, 0, -1))  # pop() hands out low numbers first

    @property
    def free(self) -> int:
        return len(self._free)

    def blocks_for(self, cache_length: int) -> int:
        """Blocks that hold `cache_length` positions."""
        return math.ceil(cache_length / self.block_size)

    def take(self, count: int) -> list:
        if count > len(self._free):
            raise RuntimeError(f"{count} blocks asked, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def give_back(self, blocks: list) -> None:
        self._free.extend(reversed(blocks))


@dataclass(frozen=True)
class Admission:
    page: Page
    row: int


class SchedulingPolicy:
    """The state of every prediction and page, and the decisions of what to do next.

    Limits: `max_rows` sequences decode at once; `max_waiting` pages may be between preprocessing and
    admission at once, and of them `max_ahead` between preprocessing and the encoder (their views are held
    in pinned host memory; a prediction's first page is never held back by this bound);
    `prefill_tokens` bounds the tokens of one batched prefill (whole prompts only);
    `growth_tokens` positions a running sequence must have room for at each synchronisation (the steps
    between two looks at the batch).
    """

    def __init__(self, blocks: BlockPool, max_rows: int, max_waiting: int, prefill_tokens: int,
                 growth_tokens: int, max_ahead: Optional[int] = None):
        self.blocks = blocks
        self.max_rows, self.max_waiting = max_rows, max_waiting
        self.max_ahead = max_waiting if max_ahead is None else max_ahead
        self.prefill_tokens, self.growth_tokens = prefill_tokens, growth_tokens
        self.predictions: list = []
        self.rows: list = [None] * max_rows  # rows[i] = the Page decoding in row i
        self._clock = itertools.count(1)

    # ------------------------------------------------------------------ intake and exits

    def add(self, prediction_id, pages: list, payloads: Optional[list] = None, background: bool = False) -> Prediction:
        """`pages`: (prompt_tokens, max_new_tokens) per page, in order; `payloads`: the engine's data for each;
        `background`: nobody waits on its first token (`goes_first`)."""
        prediction = Prediction(prediction_id, order=next(self._clock), background=background)
        payloads = payloads if payloads is not None else [None] * len(pages)
        prediction.pages = [Page(prediction, i, prompt, new, payload=payload)
                            for i, ((prompt, new), payload) in enumerate(zip(pages, payloads))]
        self.predictions.append(prediction)
        return prediction

    def close(self, prediction: Prediction) -> list:
        """A prediction leaves (completed, cancelled, failed or timed out): every page it has leaves its stage
        and frees what it holds. Returns the rows that were freed (the engine must stop decoding them)."""
        prediction.closed = True
        freed = []
        for page in prediction.pages:
            if page.stage is Stage.RUNNING:
                freed.append(page.row)
            self.finish(page)
        return freed

    def finish(self, page: Page) -> None:
        """A page is done (finished, failed or cancelled): free its row and blocks."""
        if page.row is not None:
            self.rows[page.row] = None
            page.row = None
        if page.blocks:
            self.blocks.give_back(page.blocks)
            page.blocks = []
        page.cache_length = 0
        page.stage = Stage.DONE

    def forget_finished(self) -> list:
        """Drop finished predictions from the books; returns them."""
        done = [p for p in self.predictions if p.finished]
        self.predictions = [p for p in self.predictions if not p.finished]
        return done

    # ------------------------------------------------------------------ round robin

    def _pick(self, stage: Stage, from_stage: Stage, limit: int, fits=lambda page: True) -> list:
        """Move up to `limit` pages from `from_stage` to `stage`, one per prediction per round, least
        recently picked first; a page that does not `fit` ends the picking (later pages would overtake it)."""
        picked = []
        while len(picked) < limit:
            candidates = [p for p in self.predictions if not p.closed and p.pages_in(from_stage)]
            if not candidates:
                break
            prediction = min(candidates, key=lambda p: (p.last_pick.get(stage, 0), p.order))
            page = prediction.pages_in(from_stage)[0]
            if not fits(page):
                break
            prediction.last_pick[stage] = next(self._clock)
            picked.append(page)
            page.stage = stage
        return picked

    def _waiting(self) -> int:
        return sum(len(p.pages_in(s)) for p in self.predictions
                   for s in (Stage.PREPROCESSING, Stage.PREPROCESSED, Stage.ENCODING, Stage.ENCODED))

    # ------------------------------------------------------------------ a prediction's first page first

    FIRST_PAGE_VISION_PRIORITY, OTHER_PAGE_VISION_PRIORITY = 0, 1

    @staticmethod
    def goes_first(page: Page) -> bool:
        """A prediction's first page is what its first token waits on: so that a newly arrived prediction never
        waits for a long job's pages, it is not held back by the bound on pages preprocessed ahead of the
        encoder (`to_preprocess`), it is handed to the encoder beyond the encoder's limit (`to_encode`), and
        the encoder takes it ahead of other queued pages (`vision_priority`).

        Not so for a background prediction (the bulk command's documents, where the run's throughput is what
        is waited on): its first page would only cut the encoder's passes short (a pass holds pages of one
        priority), and a run of many documents would pay for a small pass per document."""
        return page.index == 0 and not page.prediction.background

    def vision_priority(self, page: Page) -> int:
        """The vision encoder's priority for `page` (a lower value is encoded first, in passes of one value)."""
        return self.FIRST_PAGE_VISION_PRIORITY if self.goes_first(page) else self.OTHER_PAGE_VISION_PRIORITY

    # ------------------------------------------------------------------ stages

    def to_preprocess(self, free_workers: int) -> list:
        """Pages to start preprocessing now (bounded by the workers, by pages waiting downstream and by
        pages not yet handed to the encoder; a newly arrived prediction's page is picked first, by the round
        robin, and only the first two bounds apply to a first page: see `goes_first`)."""
        room = min(free_workers, self.max_waiting - self._waiting())
        ahead = sum(len(p.pages_in(s)) for p in self.predictions for s in (Stage.PREPROCESSING, Stage.PREPROCESSED))
        ahead_room = self.max_ahead - ahead

        def fits(page: Page) -> bool:  # _pick takes the page iff this says so
            nonlocal ahead_room
            if self.goes_first(page):
                return True
            ahead_room -= 1
            return ahead_room >= 0

        return self._pick(Stage.PREPROCESSING, Stage.QUEUED, max(room, 0), fits=fits)

    def preprocessed(self, page: Page, prompt_tokens: Optional[int] = None) -> None:
        """Its views and ids are ready; `prompt_tokens`: its prompt's tokens as counted then (the estimate's check)."""
        if prompt_tokens is not None:
            page.prompt_tokens = prompt_tokens
        if page.stage is Stage.PREPROCESSING:
            page.stage = Stage.PREPROCESSED

    def to_encode(self, limit: int) -> list:
        """Pages whose views to encode next (they move to ENCODING): every prediction's first page that is
        ready (`goes_first`), then others round robin up to `limit` in all.

        The limit keeps the encoder's queue short, so that pages of different predictions interleave here
        rather than queue there. A first page is what a newly arrived prediction waits on and the encoder
        takes it ahead of its queue; held back by the limit, it would wait for the passes of other
        predictions' pages queued before it."""
        firsts = [page for prediction in self.predictions if not prediction.closed
                  for page in prediction.pages_in(Stage.PREPROCESSED) if self.goes_first(page)]
        for page in firsts:
            page.stage = Stage.ENCODING
            page.prediction.last_pick[Stage.ENCODING] = next(self._clock)
        return firsts + self._pick(Stage.ENCODING, Stage.PREPROCESSED, max(limit - len(firsts), 0))

    def encoded(self, page: Page) -> None:
        if page.stage is Stage.ENCODING:
            page.stage = Stage.ENCODED

    def to_admit(self) -> list:
        """Admissions for the next batched prefill: free rows, blocks for each prompt plus a growth margin
        (a sequence that cannot grow at once would be preempted), whole prompts up to the prefill budget."""
        free_rows = [i for i, page in enumerate(self.rows) if page is None]
        budget = {"tokens": self.prefill_tokens, "blocks": self.blocks.free}

        def fits(page: Page) -> bool:
            need = self.blocks.blocks_for(page.context_tokens + self.growth_tokens)
            tokens = page.context_tokens
            admitted_any = budget["tokens"] < self.prefill_tokens
            if need > budget["blocks"] or (admitted_any and tokens > budget["tokens"]):
                return False
            budget["blocks"] -= need
            budget["tokens"] -= tokens
            return True

        pages = self._pick(Stage.RUNNING, Stage.ENCODED, len(free_rows), fits)
        admissions = []
        for page, row in zip(pages, free_rows):
            page.blocks = self.blocks.take(self.blocks.blocks_for(page.context_tokens + self.growth_tokens))
            page.row, page.admitted = row, next(self._clock)
            self.rows[row] = page
            admissions.append(Admission(page, row))
        return admissions

    def admission_failed(self, page: Page) -> None:
        """Its prefill failed: it holds nothing any more (the engine fails its prediction)."""
        self.finish(page)

    # ------------------------------------------------------------------ growth and preemption

    def observed(self, cache_lengths: dict) -> None:
        """What the device read at a synchronisation point: `cache_lengths[row]`, the positions the sequence in
        that row holds in the cache now (rows that hold no page are ignored)."""
        for row, length in cache_lengths.items():
            page = self.rows[row]
            if page is not None:
                page.cache_length = length

    def grow(self) -> tuple:
        """Make room for the next synchronisation interval, from the cache lengths last `observed`. Returns
        (rows whose block list grew, [(preempted page, its row)]).

        Sequences are served oldest admission first; when the pool runs dry the victim is the newest
        sequence of the prediction holding the most rows (it gives its blocks back and waits, ENCODED,
        to be admitted again with the tokens it has: the engine reports them with `preempted`).
        """
        grown, preempted = [], []
        for page in sorted((p for p in self.rows if p is not None), key=lambda p: p.admitted):
            if page.stage is not Stage.RUNNING:
                continue  # preempted meanwhile
            need = self.blocks.blocks_for(page.cache_length + self.growth_tokens) - len(page.blocks)
            while need > self.blocks.free:
                victim = self._victim()
                preempted.append((victim, self._preempt(victim)))
                if victim is page:
                    break
            if page.stage is not Stage.RUNNING:
                continue
            if need > 0:
                page.blocks += self.blocks.take(need)
                grown.append(page.row)
        return grown, preempted

    def preempted(self, page: Page, generated_tokens: list) -> None:
        """The tokens a page `grow` preempted had generated (read from its row before the row is cleared): it
        resumes from them when admitted again."""
        page.generated_tokens = list(generated_tokens)

    def _victim(self) -> Page:
        running = [p for p in self.rows if p is not None]
        held: dict = {}
        for page in running:
            held[page.prediction] = held.get(page.prediction, 0) + 1
        return max(running, key=lambda p: (held[p.prediction], p.admitted))

    def _preempt(self, page: Page) -> int:
        row = page.row
        self.rows[row] = None
        page.row = None
        self.blocks.give_back(page.blocks)
        page.blocks = []
        page.cache_length = 0
        page.stage = Stage.ENCODED
        return row

    # ------------------------------------------------------------------ rows

    def live_rows(self) -> int:
        """Rows a decode step must run: up to the last one that holds a page."""
        occupied = [i for i, page in enumerate(self.rows) if page is not None]
        return occupied[-1] + 1 if occupied else 0

    def compact(self) -> list:
        """Keep the live rows at the front when no page waits to fill the holes, so steps run a smaller batch:
        the page in the last live row moves to the first free one, until no row is free below the last live
        one. Returns the moves, [(source row, target row)] in order, for the engine to make on the device."""
        if any(p.pages_in(Stage.ENCODED) for p in self.predictions if not p.closed):
            return []
        moves = []
        while True:
            live = self.live_rows()
            hole = next((i for i in range(live) if self.rows[i] is None), None)
            if hole is None:
                return moves
            self.move(live - 1, hole)
            moves.append((live - 1, hole))

    def move(self, source: int, target: int) -> None:
        """The page in row `source` moves to the free row `target`, with all it holds (blocks, cache length)."""
        page = self.rows[source]
        if page is None or self.rows[target] is not None:
            raise RuntimeError(f"cannot move row {source} to row {target}")
        self.rows[target], self.rows[source] = page, None
        page.row = target

    # ------------------------------------------------------------------ state, for tests and logs

    def holdings(self) -> dict:
        """What the policy holds: rows in use, blocks handed out, pages between preprocessing and admission."""
        return {"rows": sum(p is not None for p in self.rows),
                "blocks": self.blocks.capacity - self.blocks.free,
                "waiting": self._waiting(),
                "predictions": len(self.predictions)}
