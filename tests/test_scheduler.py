"""The serving policy on its own (no model, no device): fairness, budgets, growth, preemption, cancellation."""

import pytest

from ocr_service.scheduler import BlockPool, SchedulingPolicy, Stage


def policy(blocks=1000, rows=4, waiting=8, prefill=100_000, growth=17, block_size=64):
    return SchedulingPolicy(BlockPool(blocks, block_size), max_rows=rows, max_waiting=waiting,
                            prefill_tokens=prefill, growth_tokens=growth)


def advance_to_encoded(p, workers=100):
    """Run preprocessing and encoding for whatever the policy picks (as the engine would)."""
    for page in p.to_preprocess(workers):
        p.preprocessed(page)
    for page in p.to_encode(100):
        p.encoded(page)


def test_a_one_page_prediction_behind_a_100_page_job_is_admitted_within_one_round():
    p = policy(rows=4, waiting=8)
    big = p.add("pdf", [(903, 1024)] * 100)
    advance_to_encoded(p)
    first = p.to_admit()
    assert [a.page.prediction for a in first] == [big] * 4  # alone, the job takes every row
    small = p.add("one page", [(903, 1024)])
    advance_to_encoded(p)
    p.finish(first[0].page)  # one row frees up
    admitted = p.to_admit()
    assert [a.page.prediction for a in admitted] == [small]


def test_every_stage_goes_round_robin_across_predictions():
    p = policy(rows=6, waiting=100)
    a, b, c = (p.add(name, [(100, 10)] * 5) for name in "abc")
    picked = p.to_preprocess(6)
    assert [page.prediction for page in picked] == [a, b, c, a, b, c]
    for page in picked:
        p.preprocessed(page)
    assert [page.prediction for page in p.to_encode(4)] == [a, b, c, a]


def test_a_newcomer_waits_at_most_one_pick_per_active_prediction():
    p = policy(rows=1, waiting=100)
    a = p.add("a", [(100, 10)] * 10)
    advance_to_encoded(p)
    p.finish(p.to_admit()[0].page)
    b = p.add("b", [(100, 10)])
    advance_to_encoded(p)
    assert p.to_admit()[0].page.prediction is b  # a was picked more recently than b arrived
    assert a.pages_in(Stage.ENCODED)


def test_preprocessing_runs_ahead_of_the_encoder_by_a_bounded_number_of_pages_but_never_holds_back_a_first_page():
    p = SchedulingPolicy(BlockPool(1000, 64), max_rows=4, max_waiting=100, prefill_tokens=100_000, growth_tokens=17,
                         max_ahead=6)
    job = p.add("job", [(903, 1024)] * 40)
    picked = p.to_preprocess(100)
    # The views of pages not yet encoding sit in pinned memory: the first page, and at most 6 others.
    assert [page.index for page in picked] == list(range(7))
    for page in picked:
        p.preprocessed(page)
    assert p.to_preprocess(100) == []
    newcomer = p.add("one page", [(903, 1024)])
    assert [page.prediction for page in p.to_preprocess(100)] == [newcomer]
    assert [page.index for page in p.to_encode(4)] == [0, 1, 2, 3]  # 3 + the newcomer's page now ahead: 4
    assert [page.index for page in p.to_preprocess(100)] == [7, 8] and len(job.pages_in(Stage.QUEUED)) == 31


def test_a_first_page_goes_to_the_encoder_even_when_its_queue_is_full():
    p = policy(rows=4, waiting=100)
    job = p.add("job", [(903, 1024)] * 40)
    for page in p.to_preprocess(100):
        p.preprocessed(page)
    assert len(p.to_encode(32)) == 32  # the encoder's queue is full: 32 in flight
    assert p.to_encode(0) == []  # the job's other pages wait for room
    newcomer = p.add("one page", [(903, 1024)])
    for page in p.to_preprocess(100):
        p.preprocessed(page)
    assert [page.prediction for page in p.to_encode(0)] == [newcomer]
    assert len(job.pages_in(Stage.PREPROCESSED)) == 8


def test_first_pages_count_against_the_round_robin_limit():
    p = policy(rows=4, waiting=100)
    a, b = p.add("a", [(100, 10)] * 5), p.add("b", [(100, 10)] * 5)
    for page in p.to_preprocess(100):
        p.preprocessed(page)
    picked = p.to_encode(4)
    assert [(page.prediction, page.index) for page in picked] == [(a, 0), (b, 0), (a, 1), (b, 1)]


def test_pages_waiting_between_stages_are_bounded():
    p = policy(rows=2, waiting=5)
    p.add("a", [(100, 10)] * 50)
    assert len(p.to_preprocess(100)) == 5
    assert p.to_preprocess(100) == []
    assert p.holdings()["waiting"] == 5


def test_admission_needs_blocks_for_the_prompt_and_one_growth_interval():
    p = policy(blocks=30, rows=8, block_size=64, growth=17)
    p.add("a", [(903, 1024)] * 3)  # ceil((903 + 17) / 64) = 15 blocks each
    advance_to_encoded(p)
    admitted = p.to_admit()
    assert len(admitted) == 2 and p.blocks.free == 0
    assert all(len(a.page.blocks) == 15 for a in admitted)
    assert len({b for a in admitted for b in a.page.blocks}) == 30  # nobody shares a block
    assert 0 not in {b for a in admitted for b in a.page.blocks}  # block 0 is the scratch block


def test_one_prefill_takes_whole_prompts_up_to_its_token_budget():
    p = policy(rows=8, prefill=2000)
    p.add("a", [(903, 10)] * 4)
    advance_to_encoded(p)
    assert len(p.to_admit()) == 2  # 1806 tokens; a third would exceed 2000
    assert len(p.to_admit()) == 2
    big = policy(rows=8, prefill=2048)
    big.add("b", [(3000, 10)])
    advance_to_encoded(big)
    assert len(big.to_admit()) == 1  # a prompt over the budget still runs, alone


def test_growth_hands_out_blocks_and_preempts_the_newest_of_the_largest_holder_when_dry():
    p = policy(blocks=10, rows=4, block_size=64, growth=17)
    a = p.add("a", [(100, 1000)])
    b = p.add("b", [(100, 1000)] * 2)
    advance_to_encoded(p)
    admitted = p.to_admit()  # 2 blocks each: 6 of 10
    assert len(admitted) == 3
    rows = {adm.page: adm.row for adm in admitted}
    p.observed({row: 100 for row in rows.values()})
    grown, preempted = p.grow()
    assert grown == [] and preempted == []  # 100 + 17 fits in 2 blocks
    p.observed({row: 200 for row in rows.values()})  # each needs ceil(217 / 64) = 4 blocks: 12 > 10
    grown, preempted = p.grow()
    victim = b.pages[1]
    assert [page for page, _ in preempted] == [victim]
    assert victim.stage is Stage.ENCODED and victim.blocks == [] and victim.row is None
    assert sorted(len(page.blocks) for page in (a.pages[0], b.pages[0])) == [4, 4]
    assert p.blocks.free == 2
    held = [blk for page in (a.pages[0], b.pages[0]) for blk in page.blocks]
    assert len(set(held)) == len(held)


def test_a_preempted_page_resumes_with_its_tokens_when_room_comes_back():
    p = policy(blocks=4, rows=2, block_size=64, growth=17)
    a = p.add("a", [(100, 1000)] * 2)
    advance_to_encoded(p)
    first, second = p.to_admit()
    p.observed({first.row: 200, second.row: 200})
    _, preempted = p.grow()
    (page, row), = preempted
    assert page.cache_length == 0  # it holds nothing in the cache any more
    p.preempted(page, list(range(50)))
    assert page.context_tokens == 100 + 49
    p.finish(first.page if page is second.page else second.page)
    again = p.to_admit()
    assert [adm.page for adm in again] == [page]
    assert len(page.blocks) == p.blocks.blocks_for(149 + 17)
    assert a.pages[0].stage is not Stage.QUEUED


def test_growth_follows_the_cache_lengths_the_device_reported():
    p = policy(blocks=100, rows=4, block_size=64, growth=17)
    a = p.add("a", [(100, 1000)] * 3)
    advance_to_encoded(p)
    admitted = p.to_admit()  # ceil((100 + 17) / 64) = 2 blocks each
    assert all(page.cache_length == 0 for page in a.pages)  # nothing reported yet
    p.observed({admitted[0].row: 101, admitted[1].row: 101, admitted[2].row: 101, 3: 500})  # row 3 holds no page
    assert [page.cache_length for page in a.pages] == [101, 101, 101] and p.rows[3] is None
    assert p.grow() == ([], [])
    p.observed({admitted[1].row: 120})  # only this sequence outgrew its blocks: ceil(137 / 64) = 3
    assert p.grow() == ([admitted[1].row], [])
    assert [len(page.blocks) for page in a.pages] == [2, 3, 2]
    p.finish(a.pages[1])
    assert a.pages[1].cache_length == 0 and p.blocks.free == 100 - 4


def test_compaction_moves_a_page_with_its_state_and_growth_follows_it():
    p = policy(blocks=100, rows=4, block_size=64, growth=17)
    a = p.add("a", [(100, 1000)] * 3)
    advance_to_encoded(p)
    admitted = p.to_admit()
    assert [adm.row for adm in admitted] == [0, 1, 2]
    last = admitted[2].page
    p.observed({0: 110, 1: 110, 2: 130})
    blocks, admitted_at = list(last.blocks), last.admitted
    p.finish(admitted[1].page)
    assert p.live_rows() == 3
    assert p.compact() == [(2, 1)]
    assert p.rows[1] is last and p.rows[2] is None and last.row == 1 and p.live_rows() == 2
    assert (last.blocks, last.cache_length, last.admitted, last.stage) == (blocks, 130, admitted_at, Stage.RUNNING)
    assert p.grow() == ([1], [])  # ceil((130 + 17) / 64) = 3 blocks, in its new row
    assert p.compact() == []  # no hole below the last live row
    assert a.pages[0].row == 0


def test_no_compaction_while_a_page_waits_for_a_row():
    p = policy(blocks=100, rows=3, block_size=64, growth=17)
    p.add("a", [(100, 1000)] * 4)
    advance_to_encoded(p)
    admitted = p.to_admit()
    p.finish(admitted[0].page)  # a hole, and a page ENCODED that will fill it
    assert p.compact() == []
    assert [page is None for page in p.rows] == [True, False, False]
    with pytest.raises(RuntimeError):
        p.move(0, 1)  # nothing in row 0 to move


def test_a_predictions_first_page_goes_first_at_the_encoder():
    p = policy()
    a = p.add("a", [(100, 10)] * 3)
    assert [p.goes_first(page) for page in a.pages] == [True, False, False]
    assert [p.vision_priority(page) for page in a.pages] == [0, 1, 1]  # lower first


def test_a_background_predictions_first_page_waits_its_turn():
    # A bulk run's documents: no first page jumps the encoder's queue or its limit, so passes stay full.
    p = policy(waiting=100)
    job = p.add("job", [(100, 10)] * 4)
    document = p.add("document", [(100, 10)] * 3, background=True)
    assert [p.goes_first(page) for page in document.pages] == [False] * 3
    assert {p.vision_priority(page) for page in job.pages[1:] + document.pages} == {1}
    for page in p.to_preprocess(100):
        p.preprocessed(page)
    encoding = p.to_encode(limit=2)
    assert encoding == [job.pages[0], document.pages[0]]  # the job's first page beyond the limit, then round robin
    assert [page.stage for page in document.pages] == [Stage.ENCODING, Stage.PREPROCESSED, Stage.PREPROCESSED]


def test_the_measured_prompt_replaces_the_estimate_and_payloads_stay_with_their_pages():
    p = policy()
    a = p.add("a", [(100, 10), (100, 10)], payloads=["first", "second"])
    assert [page.payload for page in a.pages] == ["first", "second"]
    first, second = p.to_preprocess(2)
    p.preprocessed(first, prompt_tokens=120)
    p.preprocessed(second)
    assert (first.stage, first.context_tokens) == (Stage.PREPROCESSED, 120)
    assert (second.stage, second.context_tokens) == (Stage.PREPROCESSED, 100)


def test_a_completed_prediction_is_closed_and_holds_nothing():
    p = policy(blocks=100, rows=2)
    a = p.add("a", [(100, 10)])
    advance_to_encoded(p)
    (admission,) = p.to_admit()
    p.finish(admission.page)
    assert a.finished and not a.closed
    assert p.close(a) == [] and a.closed
    assert p.holdings()["blocks"] == 0 and p.forget_finished() == [a]


def test_closing_a_prediction_frees_its_rows_blocks_and_waiting_pages():
    p = policy(blocks=100, rows=2, waiting=10)
    a = p.add("a", [(100, 10)] * 6)
    b = p.add("b", [(100, 10)])
    advance_to_encoded(p)
    admitted = p.to_admit()
    assert {adm.page.prediction for adm in admitted} == {a, b}
    freed = p.close(a)
    assert freed == [adm.row for adm in admitted if adm.page.prediction is a]
    assert all(page.stage is Stage.DONE for page in a.pages)
    assert p.to_preprocess(10) == [] and p.to_encode(10) == []
    p.finish(b.pages[0])
    assert p.forget_finished() == [a, b]
    assert p.holdings() == {"rows": 0, "blocks": 0, "waiting": 0, "predictions": 0}


def test_block_pool_refuses_to_overdraw():
    pool = BlockPool(3, 64)
    taken = pool.take(3)
    assert sorted(taken) == [1, 2, 3]
    with pytest.raises(RuntimeError):
        pool.take(1)
    pool.give_back(taken)
    assert pool.free == 3
