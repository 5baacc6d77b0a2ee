"""Loop detection: real documents built from the real special tokens and the tiny tokenizer's text are
never stopped; a phrase or a row repeating without end is stopped within the rule's bound, keeping the
text up to the loop plus one copy; the host detector and the batched tensor one decide alike."""

import random

import pytest
import torch

from checkpoints.generation import (
    DEFAULT_LOOP_STOP,
    LOOP_STOP_OFF,
    SERVING_NO_REPEAT_RULE,
    TD_CLOSE_TOKEN_ID,
    TD_TOKEN_ID,
    BatchedLoopDetector,
    LoopDetector,
    LoopStopRule,
    NoRepeatNGramGuard,
)

TD, TD_CLOSE, TR, TR_CLOSE = TD_TOKEN_ID, TD_CLOSE_TOKEN_ID, 128823, 128824
REF, REF_CLOSE, DET, DET_CLOSE = 128816, 128817, 128818, 128819


def run_host(tokens: list, rule: LoopStopRule = DEFAULT_LOOP_STOP):
    """(tokens read when the loop was found, keep_length), or (None, None)."""
    detector = LoopDetector(rule)
    for count, token in enumerate(tokens, 1):
        if detector.append(token):
            return count, detector.keep_length
    return None, None


def run_batched(documents: list, rule: LoopStopRule = DEFAULT_LOOP_STOP) -> list:
    """The batched detector over several documents at once (one row each, shorter ones ending early):
    [(tokens read when the loop was found, keep_length) or (None, None)] per document."""
    detector = BatchedLoopDetector(rule, max_batch=len(documents))
    found = [(None, None)] * len(documents)
    longest = max(len(d) for d in documents)
    for step in range(longest):
        tokens = torch.tensor([d[step] if step < len(d) else 0 for d in documents])
        active = torch.tensor([step < len(d) for d in documents])
        looping = detector.update(tokens, active).tolist()
        for row, flag in enumerate(looping):
            if flag and found[row][0] is None:
                found[row] = (step + 1, int(detector.keep_lengths[row]))
    return found


# ------------------------------------------------------------------------------------ realistic pages

def text(tokenizer, value: str) -> list:
    return tokenizer.encode(value, add_special_tokens=False)


def grounded(tokenizer, label: str, box: tuple, body: list) -> list:
    """One block of the grounding prompt's output: <|ref|>label<|/ref|><|det|>[[box]]<|/det|> then body."""
    return ([REF] + text(tokenizer, label) + [REF_CLOSE, DET] + text(tokenizer, f"[[{', '.join(map(str, box))}]]")
            + [DET_CLOSE] + text(tokenizer, "\n") + body + text(tokenizer, "\n\n"))


def html_row(tokenizer, cells: list) -> list:
    """<tr><td>cell</td>…</tr> with the real <tr>/<td> ids; "" for an empty cell."""
    return [TR] + sum(([TD] + text(tokenizer, cell) + [TD_CLOSE] for cell in cells), []) + [TR_CLOSE]


def html_table(tokenizer, header: list, rows: list) -> list:
    tokens = text(tokenizer, "<table>")
    for cells in [header] + rows:
        tokens += html_row(tokenizer, cells)
    return tokens + text(tokenizer, "</table>")


def blank_form(tokenizer) -> list:
    header = ["Name", "Date", "Signature"] + [f"Q{i}" for i in range(1, 10)]
    table = html_table(tokenizer, header, [[""] * 12 for _ in range(60)])  # 60 rows of 12 empty cells
    return grounded(tokenizer, "table", (40, 120, 960, 940), table)


def wide_blank_grid(tokenizer) -> list:
    return html_table(tokenizer, [str(day) for day in range(1, 41)], [[""] * 40 for _ in range(20)])


def numbered_ledger(tokenizer) -> list:
    # Rows that differ only in their first cell: a date, then zeros.
    rows = [[f"2024-01-{day:02d}", "0.00", "0.00", "0.00", "-", "-"] for day in range(1, 32)]
    rows += [[str(number), "", "", "0", "0", "0"] for number in range(1, 61)]
    return html_table(tokenizer, ["Date", "In", "Out", "Balance", "Ref", "Note"], rows)


def markdown_table(tokenizer) -> list:
    columns = 20
    lines = ["| " + " | ".join(f"C{i}" for i in range(columns)) + " |",
             "| " + " | ".join(["---"] * columns) + " |"]
    lines += ["| " + " | ".join([f"r{row}"] + [" "] * (columns - 1)) + " |" for row in range(40)]
    lines += ["| " + " | ".join(["-"] * columns) + " |" for _ in range(10)]
    return text(tokenizer, "\n".join(lines) + "\n")


def table_of_contents(tokenizer) -> list:
    titles = ["Introduction", "Scope", "Definitions", "Requirements", "Design", "Testing", "Results",
              "Discussion", "Appendix"]
    lines = []
    for chapter, title in enumerate(titles, 1):
        for section in range(1, 6):
            entry = f"{chapter}.{section} {title} part {section}"
            lines.append(entry + " " + "." * (70 - len(entry)) + f" {chapter * 10 + section}")
    return text(tokenizer, "Contents\n\n" + "\n".join(lines) + "\n")


def numbered_list(tokenizer) -> list:
    same = "".join(f"{i}. Signature: ______________ Date: ________\n" for i in range(1, 121))
    different = "".join(f"{i}. The value of x_{i} is {i * 7 % 13}.\n" for i in range(1, 81))
    return text(tokenizer, same + different)


def dotted_and_ruled_lines(tokenizer) -> list:
    lines = ["Notes"] + ["." * 120] + ["_" * 110 for _ in range(6)] + ["- " * 60] + ["=" * 100]
    return text(tokenizer, "\n".join(lines) + "\n")


def grounded_page(tokenizer) -> list:
    tokens = []
    for block in range(30):
        body = text(tokenizer, f"Paragraph {block}: DeepSeek-OCR reads documents and converts them to markdown.")
        tokens += grounded(tokenizer, "text", (50, 30 * block, 950, 30 * block + 25), body)
    return tokens


REAL_PAGES = [blank_form, wide_blank_grid, numbered_ledger, markdown_table, table_of_contents, numbered_list,
              dotted_and_ruled_lines, grounded_page]


@pytest.mark.parametrize("make_page", REAL_PAGES, ids=lambda f: f.__name__)
def test_real_pages_are_never_stopped(tiny_tokenizer, make_page):
    page = make_page(tiny_tokenizer)
    assert len(page) > 400  # long enough to matter
    assert run_host(page) == (None, None)


def test_real_pages_are_never_stopped_in_a_batch(tiny_tokenizer):
    pages = [make_page(tiny_tokenizer) for make_page in REAL_PAGES]
    assert run_batched(pages) == [(None, None)] * len(pages)


def test_a_page_made_of_all_of_them_is_never_stopped(tiny_tokenizer):
    page = sum((make_page(tiny_tokenizer) for make_page in REAL_PAGES), [])
    assert len(page) > 8000
    assert run_host(page) == (None, None)


# ------------------------------------------------------------------------------------ genuine loops

def common_suffix(before: list, block: list) -> int:
    """How many tokens the text before a loop shares with the end of the block: the repetition is measured
    from there, so the kept copy ends that many tokens early."""
    shared = 0
    while shared < min(len(before), len(block)) and before[-1 - shared] == block[-1 - shared]:
        shared += 1
    return shared


def check_loop(before: list, block: list, rule: LoopStopRule = DEFAULT_LOOP_STOP, copies: int = 10_000):
    """`before` then `block` repeated: stopped exactly when the repetition spans the rule's required span,
    keeping `before` and one copy (less what `before` shares with the block's end)."""
    stream = before + block * copies
    found, keep = run_host(stream, rule)
    assert found is not None
    start = len(before) - common_suffix(before, block)
    assert found - start == rule.required_span(len(block)) <= rule.long_span
    assert keep == start + len(block)
    return keep


def test_a_phrase_repeating_without_end(tiny_tokenizer):
    before = text(tiny_tokenizer, "# Annual report\n\nThe company grew in every region this year.\n\n")
    phrase = text(tiny_tokenizer, "Sales rose by ten percent. ")
    keep = check_loop(before, phrase)
    assert tiny_tokenizer.decode((before + phrase * 10)[:keep]) == (
        "# Annual report\n\nThe company grew in every region this year.\n\nSales rose by ten percent. ")


def test_a_table_row_repeating_without_end(tiny_tokenizer):
    before = text(tiny_tokenizer, "<table>")
    for cells in [["Region", "2023", "2024"], ["North", "12.5", "13.1"], ["South", "9.8", "10.4"]]:
        before += html_row(tiny_tokenizer, cells)
    row = html_row(tiny_tokenizer, ["East", "7.7", "8.0"])
    assert common_suffix(before, row) == 2  # both end with </td></tr>
    keep = check_loop(before, row)
    assert (before + row * 3)[:keep] == before + row[:-2]


def test_empty_cells_without_end_are_stopped_after_min_span():
    before = [TR, TD, 60, 61, TD_CLOSE]
    keep = check_loop(before, [TD, TD_CLOSE])
    assert keep == len(before) - 1 + 2


@pytest.mark.parametrize("period", [1, 3, 7, 20, 26, 60, 61, 128, 255, 256])
def test_every_period_is_stopped_within_the_bound(period):
    rng = random.Random(period)
    block = rng.sample(range(1000, 9000), period)  # distinct tokens: no shorter period inside
    before = rng.sample(range(100, 900), 50)
    check_loop(before, block)


def test_a_period_beyond_max_period_is_not_a_loop():
    block = random.Random(0).sample(range(1000, 9000), 300)
    assert run_host(block * 30) == (None, None)


def test_a_model_copying_its_last_row_under_the_serving_rule_is_stopped(tiny_tokenizer):
    # A stand-in for a looping model: it copies the token one row back; where the serving n-gram rule bans
    # that, it writes the token two rows back or else the first allowed of a fixed ranking. Its output is
    # the row with a token changed about every 30, which no exact test would call a loop.
    row = html_row(tiny_tokenizer, ["East", "7.7", "8.0", "n/a"])
    output = text(tiny_tokenizer, "<table>") + row
    loop_start = len(output)
    guard, detector = NoRepeatNGramGuard(SERVING_NO_REPEAT_RULE), LoopDetector()
    for token in output:
        guard.append(token)
        detector.append(token)
    ranking = list(range(100, 600))
    changed = 0
    while not detector.looping and len(output) < 8192:
        banned = guard.banned()
        candidates = [output[-len(row)], output[-2 * len(row)] if len(output) >= 2 * len(row) else None] + ranking
        token = next(t for t in candidates if t is not None and t not in banned)
        changed += token != output[-len(row)]
        output.append(token)
        guard.append(token)
        detector.append(token)
    assert detector.looping and changed > 10
    assert len(output) - loop_start <= DEFAULT_LOOP_STOP.long_span + len(row)
    assert detector.keep_length <= loop_start + 2 * len(row)


def test_nothing_is_stopped_when_turned_off():
    assert run_host([TD, TD_CLOSE] * 5000, LOOP_STOP_OFF) == (None, None)
    assert run_batched([[TD, TD_CLOSE] * 5000], LOOP_STOP_OFF) == [(None, None)]


def test_rule_rejects_impossible_settings():
    with pytest.raises(ValueError, match="long_span"):
        LoopStopRule(max_period=256, long_span=300)
    with pytest.raises(ValueError, match="min_repeats"):
        LoopStopRule(min_repeats=1)
    with pytest.raises(ValueError, match="min_span"):
        LoopStopRule(min_span=5000)


# ------------------------------------------------------------------------------------ host = batched

SMALL_RULE = LoopStopRule(max_period=6, min_repeats=3, min_span=4, long_span=12, matches_per_difference=2)


def random_stream(rng, length: int, vocab: int) -> list:
    """Random tokens with stretches of repeated blocks, some with a token changed."""
    stream = []
    while len(stream) < length:
        if rng.random() < 0.5:
            stream += [rng.randrange(vocab) for _ in range(rng.randrange(1, 8))]
        else:
            block = [rng.randrange(vocab) for _ in range(rng.randrange(1, 8))]
            for _ in range(rng.randrange(1, 6)):
                copy = list(block)
                if rng.random() < 0.3:
                    copy[rng.randrange(len(copy))] = rng.randrange(vocab)
                stream += copy
    return stream[:length]


@pytest.mark.parametrize("rule", [SMALL_RULE, LoopStopRule(max_period=9, min_repeats=2, min_span=1, long_span=18,
                                                           matches_per_difference=1)])
def test_batched_detector_decides_like_the_host_one(rule):
    # Rows of a batch run different sequences, pause (inactive), and take a new sequence after a loop,
    # the way the engine admits a waiting request into a freed row.
    rng = random.Random(7)
    rows, vocab = 6, 4
    batched = BatchedLoopDetector(rule, max_batch=rows + 2)
    hosts = [LoopDetector(rule) for _ in range(rows)]
    streams = [random_stream(rng, 4000, vocab) for _ in range(rows)]
    positions = [0] * rows
    loops = 0
    for step in range(600):
        tokens, active = [], []
        for row in range(rows):
            tokens.append(streams[row][positions[row]])
            active.append(rng.random() < 0.9)
        first_row = 1  # rows 1..rows of the state: row 0 and the last one must stay untouched
        before_untouched = [t[[0, rows + 1]].clone() for t in batched.tensors()]
        batched.update(torch.tensor(tokens), torch.tensor(active), first_row=first_row)
        for row in range(rows):
            if active[row]:
                hosts[row].append(tokens[row])
                positions[row] += 1
            state_row = first_row + row
            assert bool(batched.looping[state_row]) == hosts[row].looping, (step, row)
            assert int(batched.generated[state_row]) == hosts[row].generated
            if hosts[row].looping:
                assert int(batched.keep_lengths[state_row]) == hosts[row].keep_length
                loops += 1
                batched.reset(state_row)
                hosts[row] = LoopDetector(rule)
                streams[row] = streams[row][positions[row]:]
                positions[row] = 0
        for saved, tensor in zip(before_untouched, batched.tensors()):
            assert torch.equal(saved, tensor[[0, rows + 1]])
    assert loops > 20


def test_batched_detector_updates_rows_named_by_an_index_like_a_range_of_rows():
    # The engine starts the rows it admits together, wherever they are, with one update by index.
    rng = random.Random(3)
    rows, vocab = 5, 3
    by_range, by_index = BatchedLoopDetector(SMALL_RULE, rows), BatchedLoopDetector(SMALL_RULE, rows)
    order = torch.tensor([3, 0, 4, 1, 2])
    loops = 0
    for step in range(400):
        tokens = torch.tensor([rng.randrange(vocab) if rng.random() < 0.3 else step % 2 for _ in range(rows)])
        active = torch.tensor([rng.random() < 0.9 for _ in range(rows)])
        looping = by_range.update(tokens, active)
        split = rng.randrange(1, rows)
        for part in (order[:split], order[split:]):  # two index updates: each row once, in another order
            assert torch.equal(by_index.update(tokens[part], active[part], rows=part), looping[part].clone())
        for expected, actual in zip(by_range.tensors(), by_index.tensors()):
            assert torch.equal(expected, actual), step
        finished = [row for row in range(rows) if bool(by_range.looping[row])]
        loops += len(finished)
        if finished:
            by_range.reset(torch.tensor(finished))
            by_index.reset(torch.tensor(finished))
    assert loops > 10


def test_batched_detector_on_real_pages_and_loops(tiny_tokenizer):
    pages = [make_page(tiny_tokenizer) for make_page in REAL_PAGES]
    phrase = text(tiny_tokenizer, "Sales rose by ten percent. ")
    pages.append(grounded_page(tiny_tokenizer)[:500] + phrase * 200)
    pages.append([TR, TD] + [TD, TD_CLOSE] * 400)
    pages.append(numbered_list(tiny_tokenizer)[:300] + random.Random(1).sample(range(1000, 9000), 200) * 12)
    batched = run_batched(pages)
    assert batched == [run_host(page) for page in pages]
    assert [found is not None for found, _ in batched] == [False] * len(REAL_PAGES) + [True] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_detector_replays_in_a_cuda_graph():
    # One captured update replayed per step, its inputs written into the same buffers; every 16 steps the
    # host reads the results and gives looping rows a new sequence, as the engine does at its sync points.
    # The state stays the CPU detector's, fed the same tokens eagerly.
    rule = LoopStopRule(max_period=64, min_repeats=4, min_span=16, long_span=128, matches_per_difference=4)
    rng = random.Random(3)
    rows = 8
    streams = [random_stream(rng, 3000, 3) for _ in range(rows)]
    reference = BatchedLoopDetector(rule, max_batch=rows)
    detector = BatchedLoopDetector(rule, max_batch=rows, device="cuda")
    tokens = torch.zeros(rows, dtype=torch.long, device="cuda")
    active = torch.ones(rows, dtype=torch.bool, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        detector.update(tokens, active)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        detector.update(tokens, active)
    detector.reset(slice(None))
    loops = 0
    for step in range(3000):
        step_tokens = torch.tensor([s[step] for s in streams])
        step_active = torch.tensor([rng.random() < 0.95 for _ in range(rows)])
        tokens.copy_(step_tokens)
        active.copy_(step_active)
        graph.replay()
        reference.update(step_tokens, step_active)
        if step % 16 == 15:
            for expected, actual in zip(reference.tensors(), detector.tensors()):
                assert torch.equal(expected, actual.cpu()), step
            for row in torch.nonzero(reference.looping).flatten().tolist():
                loops += 1
                reference.reset(row)
                detector.reset(row)
    assert loops > 10


def test_a_batched_row_holds_the_host_detector_counters():
    # The engine restores a resumed row by replaying its tokens through the host detector and copying its
    # counters into the row: recent, runs[1:] and credits[1:] are laid out alike.
    rng = random.Random(5)
    stream = random_stream(rng, 500, 3)
    host = LoopDetector(SMALL_RULE)
    batched = BatchedLoopDetector(SMALL_RULE, max_batch=1)
    for token in stream:
        host.append(token)
        batched.update(torch.tensor([token]))
        assert batched.recent[0].tolist() == host.recent
        assert batched.runs[0].tolist() == host.runs[1:] and batched.credits[0].tolist() == host.credits[1:]
        assert int(batched.generated[0]) == host.generated and bool(batched.looping[0]) == host.looping
        if host.looping:
            break
    assert host.looping and int(batched.keep_lengths[0]) == host.keep_length
