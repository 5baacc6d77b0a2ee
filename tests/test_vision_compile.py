"""The vision towers compiled at load (ocr_service/vision_compile.py), on the tiny checkpoints' real towers.

On the CPU the compile runs with Dynamo's "eager" backend: the tracing, the graphs, the warm-up, the stance and
the fallback are the ones the GPU runs, with PyTorch's kernels in place of Inductor's (which the device's
benchmarks measure). One view size (512) is warmed here; the engine warms every size its modes use.
"""

import copy

import pytest
import torch

from ocr_service.vision_compile import (
    attention_backends_kept, compile_vision_towers, compiled_graphs, is_compiled, uncompile_vision_towers, view_sides,
)


def test_view_sides_put_the_default_presets_views_first(tiny_model, tiny_ocr2_model):
    assert view_sides(tiny_model) == [1024, 640, 512, 1280]
    assert view_sides(tiny_ocr2_model) == [1024, 768]


@pytest.fixture
def compiled_copy(tiny_model):
    model = copy.deepcopy(tiny_model)
    yield model
    uncompile_vision_towers(model)
    torch.compiler.set_stance("default")


def test_compiled_towers_give_the_eager_features_and_compile_nothing_after_load(tiny_model, compiled_copy):
    logged = []
    report = compile_vision_towers(compiled_copy, backend="eager", log=logged.append, sides=[512])
    assert report["sides"] == [512] and report["graphs"] >= 2  # one view apart from several
    assert logged[0].startswith("compiling the vision towers' ") and "DEEPSEEK_OCR_VISION=fast" in logged[0]
    assert logged[1].startswith("compiled the vision towers' ")
    assert all(is_compiled(block) for block in compiled_copy.model.compiled_vision_parts())
    torch.manual_seed(0)
    with torch.inference_mode():
        for views, side in ((1, 512), (3, 512), (5, 512), (2, 640)):
            pixels = torch.randn(views, 3, side, side)
            before = compiled_graphs()
            compiled = compiled_copy.model.encode_views(pixels)
            # A pass of any number of views reuses the graphs compiled at load; a size not warmed (640 here)
            # runs eagerly rather than stall a prediction for a compile.
            assert compiled_graphs() == before
            torch.testing.assert_close(compiled, tiny_model.model.encode_views(pixels), rtol=0, atol=0)


def sdpa_flags() -> tuple:
    cuda = torch.backends.cuda
    return (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
            cuda.cudnn_sdp_enabled(), torch._C._get_sdp_priority_order())


def test_sdpa_backend_flags_come_back_as_they_were():
    before = sdpa_flags()
    with pytest.raises(RuntimeError, match="inside"):
        with attention_backends_kept():
            torch.backends.cuda.enable_cudnn_sdp(not before[3])
            torch.backends.cuda.enable_flash_sdp(not before[0])
            torch._C._set_sdp_priority_order(list(reversed(before[4])))
            raise RuntimeError("inside")
    assert sdpa_flags() == before


def test_compiling_sam_with_cudnn_first_leaves_the_process_flags_alone(compiled_copy):
    # SAM's blocks pick cuDNN first with sdpa_kernel: what the rest of the process runs (the decoder's
    # prefill) must keep the process's own choice after the blocks are traced
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        before = sdpa_flags()
        compiled_copy.model.sam_model.use_cudnn_attention(True)
        compile_vision_towers(compiled_copy, backend="eager", log=lambda line: None, sides=[512])
        assert sdpa_flags() == before
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_a_failing_compile_leaves_the_towers_eager(tiny_model, compiled_copy):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    with pytest.raises(Exception, match="no compiler here"):
        compile_vision_towers(compiled_copy, backend=broken_backend, log=lambda line: None, sides=[512])
    assert all(not is_compiled(block) for block in compiled_copy.model.compiled_vision_parts())
    pixels = torch.randn(1, 3, 512, 512)
    with torch.inference_mode():
        torch.testing.assert_close(compiled_copy.model.encode_views(pixels), tiny_model.model.encode_views(pixels),
                                   rtol=0, atol=0)


def test_the_engine_serves_eagerly_when_the_compile_fails(monkeypatch):
    from ocr_service import engine as engine_module

    def failing(model, log, sides):
        raise RuntimeError("inductor is missing")

    monkeypatch.setattr(engine_module, "compile_vision_towers", failing)
    monkeypatch.setattr(engine_module, "view_sides", lambda model, modes: [1024])
    logged = []
    engine = object.__new__(engine_module.OCREngine)  # only what compile_vision reads
    engine.model, engine.log, engine.view_modes = None, logged.append, None
    assert engine.compile_vision() is None
    assert "compiling the vision towers failed (RuntimeError: inductor is missing)" in logged[0]
    assert "DEEPSEEK_OCR_VISION=fast" in logged[0]


def test_the_second_tower_of_deepseek_ocr_2_compiles_without_graph_breaks(tiny_ocr2_model):
    """Its layers read fused q/k/v weights (FusedWeights): under a compiler they are taken as fused, not
    re-checked by data pointer, which Dynamo cannot trace (it would split every layer's graph)."""
    from torch._dynamo.utils import counters

    model = copy.deepcopy(tiny_ocr2_model)
    counters.clear()
    try:
        compile_vision_towers(model, backend="eager", log=lambda line: None, sides=[768])
        assert not counters["graph_break"]
        pixels = torch.randn(2, 3, 768, 768)
        with torch.inference_mode():
            torch.testing.assert_close(model.model.encode_views(pixels), tiny_ocr2_model.model.encode_views(pixels),
                                       rtol=0, atol=0)
    finally:
        uncompile_vision_towers(model)
        torch.compiler.set_stance("default")


def test_the_engine_compiles_after_it_sets_the_cpu_threads(tiny_checkpoint, monkeypatch):
    """Dynamo's guards include the number of CPU threads: compiled before the serving loop limits them, every
    pass after would run eagerly (measured on the H200: 23 ms a page instead of 12)."""
    from ocr_service import engine as engine_module
    from ocr_service.settings import Settings

    threads_when_compiled = []
    monkeypatch.setattr(engine_module.OCREngine, "compiles_vision", property(lambda self: True))
    monkeypatch.setattr(engine_module.OCREngine, "limits_cpu_threads", property(lambda self: True))
    monkeypatch.setattr(engine_module, "limit_cpu_threads", lambda workers, cores: torch.set_num_threads(1))
    monkeypatch.setattr(engine_module, "compile_vision_towers",
                        lambda model, log, sides: threads_when_compiled.append(torch.get_num_threads()) or {"graphs": 0})
    before = torch.get_num_threads()
    try:
        engine = engine_module.OCREngine(tiny_checkpoint, Settings.from_env().replace(device="cpu"), log=lambda _: None)
        assert engine.server.vision_compile == {"graphs": 0}
        assert threads_when_compiled == [torch.get_num_threads()] == [1]
    finally:
        torch.set_num_threads(before)


def test_an_engine_started_for_one_preset_compiles_its_view_sizes_alone_and_refuses_the_others(tiny_checkpoint,
                                                                                           monkeypatch):
    """A bulk run serves one resolution_size: its engine compiles (and would capture) the towers for that preset's
    view sizes only, Gundam's 1024 and 640 of the four, and a page of another preset is refused, naming the input,
    rather than run through uncompiled towers whose memory nobody reserved."""
    from ocr_service import engine as engine_module
    from ocr_service.errors import InputError
    from ocr_service.presets import Resolution
    from ocr_service.settings import Settings

    compiled_sides = []
    monkeypatch.setattr(engine_module.OCREngine, "compiles_vision", property(lambda self: True))
    monkeypatch.setattr(engine_module, "compile_vision_towers",
                        lambda model, log, sides: compiled_sides.append(sides) or {"graphs": 0})
    settings = Settings.from_env().replace(device="cpu")
    before = torch.get_num_threads()
    try:
        engine = engine_module.OCREngine(tiny_checkpoint, settings, log=lambda _: None,
                                         resolutions=["Gundam (Recommended)"])
        assert compiled_sides == [[1024, 640]]
        assert {side for side in engine.server._most_views_per_call()} == {1024, 640}
        assert engine.resolution("Gundam (Recommended)") == Resolution(1024, 640, True)
        with pytest.raises(InputError, match="resolution_size 'Tiny': this engine was started for Gundam"):
            engine.resolution("Tiny")
        with pytest.raises(InputError, match="started for Gundam"):
            engine.model_resolution(Resolution(512, 512, False))
        with pytest.raises(InputError, match="unknown resolution_size"):
            engine_module.OCREngine(tiny_checkpoint, settings, log=lambda _: None, resolutions=["Huge"])
        every = engine_module.OCREngine(tiny_checkpoint, settings, log=lambda _: None)
        assert compiled_sides[-1] == [1024, 640, 512, 1280]  # the predictor's engine: every preset
        assert every.model_resolution(Resolution(512, 512, False)) == Resolution(512, 512, False)
    finally:
        torch.set_num_threads(before)
