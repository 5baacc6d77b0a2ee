"""The engine on the CPU (float32, tiny checkpoint): the batched paged path gives the reference path's greedy
tokens while sequences join and leave, blocks are reused and the cache runs out; one bad request fails alone."""

import time

import pytest
import torch

from checkpoints.generation import STOP_EOS, STOP_REASONS
from conftest import document_image
from ocr_service.decode_batch import RUNNING, STOP_CODES
from ocr_service.engine import MAX_SEQUENCE, JobCancelled, OCREngine
from ocr_service.errors import InputError
from ocr_service.presets import resolution
from ocr_service.scheduler import Stage
from ocr_service.settings import Settings

PROMPT = "<image>\nFree OCR."
CPU = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cpu"})


def engine(checkpoint, logs=None, **settings) -> OCREngine:
    return OCREngine(checkpoint, CPU.replace(**settings), (logs.append if logs is not None else lambda _: None))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return engine(tiny_checkpoint, engine="reference")


def pages(count: int, start: int = 0) -> list:
    return [document_image(500 + 170 * i, 900 - 60 * (i % 3), seed=i) for i in range(start, start + count)]


def tokens_alone(reference_engine, images, preset, max_new_tokens) -> list:
    return [r.token_ids for r in reference_engine.run_pages(images, PROMPT, resolution(preset), max_new_tokens)]


def wait_idle(serving, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = serving.holdings()
        if held == {"rows": 0, "blocks": 0, "waiting": 0, "predictions": 0}:
            return held
        time.sleep(0.05)
    return serving.holdings()


@pytest.mark.parametrize("rule", ["serving", "original"])
def test_batched_paged_path_matches_the_reference_as_sequences_join_and_leave(tiny_checkpoint, reference, rule):
    batched = engine(tiny_checkpoint, max_rows=2, repetition_rule=rule, sync_every=5)
    reference_rule = engine(tiny_checkpoint, engine="reference", repetition_rule=rule)
    jobs = [(pages(3), "Gundam (Recommended)", 9), (pages(2, 3), "Small", 23), (pages(1, 5), "Tiny", 4)]
    submitted = [batched.submit(images, PROMPT, resolution(preset), n) for images, preset, n in jobs]
    for job, (images, preset, n) in zip(submitted, jobs):  # 6 pages through 2 rows: rows and blocks reused
        got = job.wait(120)
        assert [r.token_ids for r in got] == tokens_alone(reference_rule, images, preset, n)
        assert all(r.stop_reason in STOP_REASONS for r in got)
    assert wait_idle(batched.server) == {"rows": 0, "blocks": 0, "waiting": 0, "predictions": 0}


def test_sequences_that_loop_stop_at_the_same_token_as_the_reference(tiny_checkpoint, reference):
    batched = engine(tiny_checkpoint, max_rows=3, sync_every=7)
    images = pages(3, 10)
    got = batched.run_pages(images, PROMPT, resolution("Tiny"), 400, timeout=300)
    plain = reference.run_pages(images, PROMPT, resolution("Tiny"), 400)
    assert [(r.token_ids, r.stop_reason) for r in got] == [(r.token_ids, r.stop_reason) for r in plain]


def test_a_full_cache_makes_sequences_wait_and_resume_without_corruption(tiny_checkpoint):
    logs = []
    # 5 blocks of 64 positions: two Tiny prompts (~80 tokens, 2 blocks each) are admitted together, then
    # cannot both grow past 128 positions: one is preempted, waits, and resumes from its tokens (its cache
    # recomputed) once the other has finished; the third waits for room from the start.
    block = 2 * 3 * 2 * 64 * 32 * 4  # bytes of one block of the tiny model (float32)
    small = engine(tiny_checkpoint, logs, max_rows=3, cpu_cache_gib=5 * block / 2**30, sync_every=4,
                   stop_loops=False)
    assert small.server.policy.blocks.capacity == 5
    plain = engine(tiny_checkpoint, engine="reference", stop_loops=False)
    images = pages(3, 20)
    got = small.run_pages(images, PROMPT, resolution("Tiny"), 100, timeout=300)
    assert [r.token_ids for r in got] == tokens_alone(plain, images, "Tiny", 100)
    assert any("preempted" in line for line in logs)
    assert wait_idle(small.server)["blocks"] == 0


def test_prompt_sizes_are_known_before_preprocessing(tiny_checkpoint, reference):
    for preset in ("Gundam (Recommended)", "Tiny", "Small", "Base", "Large"):
        for size in ((400, 300), (1240, 1754), (2000, 600), (641, 641), (3000, 500)):
            image = document_image(*size)
            inputs = reference.model.prepare_inputs(reference.tokenizer, PROMPT, [image], *_preset(preset))
            assert reference.prompt_tokens(PROMPT, image.size, resolution(preset)) == inputs.input_ids.numel()


def _preset(name):
    r = resolution(name)
    return r.base_size, r.image_size, r.crop_mode


def test_a_request_that_cannot_fit_is_refused_naming_the_input(tiny_checkpoint):
    small = engine(tiny_checkpoint, cpu_cache_gib=40 * 2 * 3 * 2 * 64 * 32 * 4 / 2**30)
    capacity = small.server.capacity
    assert capacity < MAX_SEQUENCE
    with pytest.raises(InputError, match=r"max_new_tokens=8192 does not fit.*max_new_tokens ≤ \d+"):
        small.submit(pages(1), PROMPT, resolution("Tiny"), 8192)
    fits = capacity - small.prompt_tokens(PROMPT, (500, 900), resolution("Tiny"))
    assert len(small.run_pages(pages(1), PROMPT, resolution("Tiny"), 3)[0].token_ids) == 3
    with pytest.raises(InputError):
        small.submit(pages(1), PROMPT, resolution("Tiny"), fits + 1)


def test_cancelling_frees_rows_blocks_and_waiting_pages(tiny_checkpoint):
    batched = engine(tiny_checkpoint, max_rows=2, stop_loops=False)
    job = batched.submit(pages(4), PROMPT, resolution("Tiny"), 5000)
    time.sleep(1.5)
    assert batched.server.holdings()["rows"] > 0
    job.cancel()
    with pytest.raises(JobCancelled):
        job.wait(30)
    assert wait_idle(batched.server) == {"rows": 0, "blocks": 0, "waiting": 0, "predictions": 0}
    assert len(batched.run_pages(pages(1), PROMPT, resolution("Tiny"), 3)[0].token_ids) == 3


def test_a_failing_page_fails_its_prediction_alone(tiny_checkpoint, monkeypatch):
    batched = engine(tiny_checkpoint, max_rows=4)
    model = batched.model.model
    real_encode = model.encode_views
    failed = []

    def encode_views(pixels):  # the poisoned page is the only one with 512-pixel views
        if pixels.shape[-1] == 512:
            failed.append(pixels.shape[0])
            raise RuntimeError("injected failure in this page's vision pass")
        return real_encode(pixels)

    monkeypatch.setattr(model, "encode_views", encode_views)
    good = batched.submit(pages(2), PROMPT, resolution("Small"), 6)
    bad = batched.submit(pages(1), PROMPT, resolution("Tiny"), 6)
    with pytest.raises(RuntimeError, match="injected failure"):
        bad.wait(60)
    assert [len(r.token_ids) for r in good.wait(60)] == [6, 6]
    assert failed  # the fault fired
    assert wait_idle(batched.server)["predictions"] == 0


def test_per_page_timing_is_each_pages_own(tiny_checkpoint):
    batched = engine(tiny_checkpoint, max_rows=1, stop_loops=False)
    results = batched.run_pages(pages(3), PROMPT, resolution("Tiny"), 20, timeout=120)
    firsts = [r.first_token_s for r in results]
    totals = [r.seconds for r in results]
    assert all(0 < f < t for f, t in zip(firsts, totals))
    assert firsts == sorted(firsts) and totals == sorted(totals) and len(set(totals)) == 3  # one row: in turn
    assert firsts[1] >= totals[0] - 0.5


def test_the_reference_engine_reports_stop_reasons(reference):
    result = reference.run_pages(pages(1), PROMPT, resolution("Tiny"), 3)[0]
    assert result.stop_reason in STOP_REASONS
    assert result.finished == (result.stop_reason == STOP_EOS)
    assert 0 < result.first_token_s <= result.seconds


def test_special_token_texts_come_from_the_tokenizer(reference):
    texts = reference.special_token_texts
    assert "<|ref|>" in texts and "<image>" in texts and len(texts) == 830


def test_checkpoint_tensor_shapes_match_the_file(tiny_checkpoint):
    from safetensors import safe_open

    from ocr_service.engine import checkpoint_tensor_shapes

    with safe_open(str(tiny_checkpoint / "model-00001-of-000001.safetensors"), "pt") as handle:
        in_file = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    assert checkpoint_tensor_shapes(tiny_checkpoint) == in_file


def test_an_engine_built_under_inference_mode_serves(tiny_checkpoint):
    """Inference mode is per thread: the serving thread must not trip over tensors made under it."""
    import torch

    with torch.inference_mode():
        built_inside = engine(tiny_checkpoint, max_rows=2)
    assert len(built_inside.run_pages(pages(1), PROMPT, resolution("Tiny"), 4, timeout=60)[0].token_ids) == 4


def test_a_failing_device_fails_the_predictions_instead_of_leaving_them_waiting(tiny_checkpoint, monkeypatch):
    batched = engine(tiny_checkpoint, max_rows=2)
    decode = batched.server.batch

    def broken(*args, **kwargs):
        raise RuntimeError("injected: the device stopped answering")

    monkeypatch.setattr(decode, "run", broken)
    monkeypatch.setattr(decode, "clear", broken)  # even cleaning up fails
    job = batched.submit(pages(2), PROMPT, resolution("Tiny"), 5)
    with pytest.raises(RuntimeError, match="device stopped answering"):
        job.wait(30)
    assert batched.server.holdings()["predictions"] == 0


def test_every_stop_reason_has_its_own_device_code():
    assert sorted(STOP_CODES) == sorted(STOP_REASONS)
    assert len(set(STOP_CODES.values()) | {RUNNING}) == len(STOP_REASONS) + 1


def test_the_prefill_warm_up_leaves_nothing_behind(tiny_checkpoint, reference):
    # On a GPU the engine runs a prefill of dummy prompts at start, so that its kernels are compiled before the
    # first prediction: afterwards every row and block is free, the process's random state untouched, and the
    # first prediction's tokens those of the reference.
    batched = engine(tiny_checkpoint, max_rows=2, sync_every=5)
    serving = batched.server
    free, random_state = serving.policy.blocks.free, torch.get_rng_state()
    serving.warm_admission()
    assert serving.policy.blocks.free == free and torch.equal(torch.get_rng_state(), random_state)
    assert [serving.batch.generated_tokens(row) for row in range(2)] == [[], []]
    assert [state.cache_length for state in serving.batch.read(2)] == [0, 0]
    images = pages(2)
    got = batched.run_pages(images, PROMPT, resolution("Small"), 6, timeout=120)
    assert [r.token_ids for r in got] == tokens_alone(reference, images, "Small", 6)
    assert wait_idle(serving) == {"rows": 0, "blocks": 0, "waiting": 0, "predictions": 0}


def test_a_pages_views_are_let_go_once_encoded(tiny_checkpoint, reference, monkeypatch):
    # On a GPU the views sit in pinned host memory: a page keeping them until it finishes decoding would make
    # the allocator pin fresh memory for every page of a long job.
    batched = engine(tiny_checkpoint, max_rows=2, sync_every=5)
    policy = batched.server.policy
    views_when_encoded = []
    encoded = policy.encoded

    def record(page):
        views_when_encoded.append(len(page.payload.inputs.images))
        encoded(page)

    monkeypatch.setattr(policy, "encoded", record)
    images = pages(3)
    got = batched.submit(images, PROMPT, resolution("Small"), 6).wait(120)
    assert views_when_encoded == [0, 0, 0]
    assert [r.token_ids for r in got] == tokens_alone(reference, images, "Small", 6)


def test_a_failed_prompt_takes_its_predictions_other_pages_out_of_the_page_by_page_retry(tiny_checkpoint,
                                                                                        monkeypatch):
    """A batched prefill that fails is retried page by page; once a page's failure closes its prediction, that
    prediction's other pages in the prefill hold no row or blocks any more and must not reach the device."""
    batched = engine(tiny_checkpoint, max_rows=4)
    policy, batch = batched.server.policy, batched.server.batch
    real_to_admit, real_admit = policy.to_admit, batch.admit
    rows_held_at_admission = []

    def to_admit():  # both pages in one prefill
        return real_to_admit() if sum(len(p.pages_in(Stage.ENCODED)) for p in policy.predictions) >= 2 else []

    def admit(entries):
        pages_there = [policy.rows[entry.row] for entry in entries]
        rows_held_at_admission.append([page is not None for page in pages_there])
        if any(page is not None and page.index == 0 for page in pages_there):
            raise RuntimeError("injected failure in the first page's prompt")
        real_admit(entries)

    monkeypatch.setattr(policy, "to_admit", to_admit)
    monkeypatch.setattr(batch, "admit", admit)
    job = batched.submit(pages(2), PROMPT, resolution("Tiny"), 5)
    with pytest.raises(RuntimeError, match="injected failure"):
        job.wait(60)
    assert rows_held_at_admission == [[True, True], [True]]  # the batch, then the first page alone
    assert wait_idle(batched.server) == {"rows": 0, "blocks": 0, "waiting": 0, "predictions": 0}


@pytest.mark.parametrize("vision, sam_kernel, vision_cudnn, sam_gelu, padding, graphs, kernel_on, cudnn_on, gelu_way", [
    ("compiled", "all", True, "epilogue", "kernel", True, True, True, "epilogue"),  # the defaults on a GPU
    ("compiled", "all", True, "epilogue", "grid", True, True, True, "epilogue"),  # the grid padded to whole windows
    ("compiled", "1", True, "0", "kernel", True, True, True, "exact"),  # the kernel for grids walked by rows, F.gelu
    ("compiled", "all", True, "1", "kernel", True, True, True, "kernel"),  # every grid, the GELU kernel
    ("compiled", "1", True, "1", "kernel", False, True, False, "kernel"),  # towers called, not replayed: no cuDNN
    ("fast", "0", False, "0", "kernel", True, False, False, "exact"),  # all turned off
    ("original", "1", True, "epilogue", "kernel", False, False, False, "exact"),  # the original's order
])
def test_sams_kernels_follow_the_settings(tiny_model, vision, sam_kernel, vision_cudnn, sam_gelu, padding, graphs,
                                          kernel_on, cudnn_on, gelu_way):
    from checkpoints.deepencoder import cudnn_first, triton_available
    from ocr_service.engine import choose_vision_kernels

    settings = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cpu", "DEEPSEEK_OCR_VISION": vision,
                                  "DEEPSEEK_OCR_SAM_KERNEL": sam_kernel, "DEEPSEEK_OCR_SAM_GELU": sam_gelu,
                                  "DEEPSEEK_OCR_SAM_WINDOW_PADDING": padding,
                                  "DEEPSEEK_OCR_VISION_CUDNN": str(int(vision_cudnn))})
    off = Settings.from_env({"DEEPSEEK_OCR_DEVICE": "cpu", "DEEPSEEK_OCR_SAM_KERNEL": "0", "DEEPSEEK_OCR_SAM_GELU": "0",
                             "DEEPSEEK_OCR_VISION_CUDNN": "0"})
    try:
        choose_vision_kernels(tiny_model, settings, graphs)
        for block in tiny_model.model.sam_model.blocks:
            assert block.attn.relative_kernel is kernel_on
            assert block.attn.kernel_for_any_grid is (sam_kernel == "all")
            assert block.attn.terms_in_kernel is (sam_kernel == "all")  # the windows' terms from the tables
            # the windows' padding past the grid made up in the kernel, or the grid padded before the projection
            assert block.attn.padding_in_kernel is (sam_kernel == "all" and padding == "kernel")
            assert block.attn.attention_backends == (cudnn_first() if cudnn_on else None)
            # (the Triton kernel where Triton is, F.gelu where it is missing)
            assert block.mlp.gelu_way == ("exact" if gelu_way == "kernel" and not triton_available() else gelu_way)
    finally:
        choose_vision_kernels(tiny_model, off, False)
