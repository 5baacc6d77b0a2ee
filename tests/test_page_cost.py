"""benchmarks/page_cost.py at tiny size: what it counts on the meta device is what the models run on real
tensors, and the page's token counts are the processing modules' layouts."""

import json

import pytest

from benchmarks import page_cost
from benchmarks.common import a4_page
from checkpoints import processing_deepseekocr


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page-cost")
    busy = {"encode": 3.0, "prefill": 1.0, "decode": 4.0}
    job = folder / "job.json"
    job.write_text(json.dumps({"ours": {"job": {"busy_s": busy, "pages_s": 10.0}}}))
    out = folder / "page-cost.json"
    page_cost.main(["--size", "tiny", "--ocr1-job", str(job), "--ocr2-job", str(job), "--json", str(out)])
    return json.loads(out.read_text())


def test_token_counts_follow_each_models_layout(report):
    first, second = report["costs"]["ocr"], report["costs"]["ocr2"]
    assert second["tiles"] == 6 and second["tile_size"] == 768  # an A4 page: a 2 × 3 grid
    assert second["image_tokens"] == 256 + 144 * second["tiles"] + 1
    assert first["image_tokens"] == processing_deepseekocr.image_token_count(1024, 640, True, tuple(first["grid"]))
    for cost in (first, second):
        assert cost["text_tokens"] > 0
        assert cost["prompt_tokens"] == cost["image_tokens"] + cost["text_tokens"]
        assert cost["decode_positions"] == cost["prompt_tokens"] + 512


def test_counts_are_positive_and_parts_add_up(report):
    for cost in report["costs"].values():
        flops = cost["vision_flops"]
        for kind in ("global", "tiles"):
            parts = [flops[f"{part}, {kind}"] for part in page_cost.VISION_PARTS]
            assert all(value > 0 for value in parts)
            assert sum(parts) == flops[f"total, {kind}"]  # nothing encoded outside SAM, stage 2 and the projector
            assert 0 < flops[f"sam attention, {kind}"] < flops[f"sam, {kind}"]
        assert cost["prefill_flops"] > 0
        assert cost["decode_step_bytes_per_row"] > cost["decode_kv_bytes_per_row_step"] > 0
    # OCR 2's tiles are larger (768 against 640) and its stage-2 encoder reads twice the tokens
    assert report["costs"]["ocr2"]["vision_flops"]["sam, tiles"] > report["costs"]["ocr"]["vision_flops"]["sam, tiles"]


def test_prediction_weighs_the_stages_by_busy_seconds(report):
    prediction = report["prediction"]
    busy, scaled = prediction["ocr1_busy_s"], prediction["ocr2_predicted_busy_s"]
    for stage, ratio in prediction["work_ratio"].items():
        assert scaled[stage] == pytest.approx(busy[stage] * ratio)
    assert prediction["pages_s_ratio_serial"] == pytest.approx(sum(busy.values()) / sum(scaled.values()))
    assert prediction["pages_s_ratio_measured"] == 1.0  # the same job given for both
    cost = report["costs"]["ocr"]
    same = page_cost.predict(cost, cost, {"busy_s": busy, "pages_s": 1.0})
    assert same["pages_s_ratio_serial"] == pytest.approx(1.0) and same["pages_s_ratio_overlapped"] == pytest.approx(1.0)


@pytest.mark.parametrize("model_name", ["ocr", "ocr2"])
def test_meta_counts_equal_real_tensor_counts(model_name, request, tiny_tokenizer):
    """The FLOPs counted from shapes on the meta device are those of the tiny model run on real CPU tensors.
    SDPA there runs as its math form: flop_counter counts the CUDA attention kernels and the math form's
    products, not the CPU's fused kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    real = request.getfixturevalue("tiny_model" if model_name == "ocr" else "tiny_ocr2_model")
    meta = page_cost.build_on_meta(model_name, "tiny")
    base_size, image_size, crop_mode = page_cost.MODEL_PRESETS[model_name]["Gundam"]
    views = real.prepare_inputs(tiny_tokenizer, page_cost.PROMPT, [a4_page()], base_size, image_size,
                                crop_mode).images[0]
    with sdpa_kernel(SDPBackend.MATH):
        on_cpu = page_cost.vision_flops_by_part(real, model_name, views)
    assert page_cost.vision_flops_by_part(meta, model_name, views) == on_cpu
