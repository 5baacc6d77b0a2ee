"""The vision towers as CUDA graphs (ocr_service/vision_graphs.py): how a call's views are cut into the
captured sizes (CPU), and, on a GPU, the tiny checkpoints' real towers replayed against the towers called."""

import copy

import pytest
import torch

from ocr_service.vision_graphs import GraphedTowers, graph_sizes, view_chunks


def test_graphs_are_captured_for_every_count_up_to_sixteen_then_every_eighth():
    assert graph_sizes(144) == list(range(1, 17)) + [24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128,
                                                     136, 144]
    assert graph_sizes(100)[-1] == 96  # the last multiple of eight within the most views
    assert graph_sizes(5) == [1, 2, 3, 4, 5]
    assert graph_sizes(0) == []


@pytest.mark.parametrize("views, chunks", [
    (96, [96]),  # six tiles a page, 16 pages: one replay
    (90, [88, 2]),
    (144, [144]),  # the most tiles a pass of 16 pages holds
    (300, [144, 144, 12]),  # beyond the largest graph: it repeats
    (15, [15]),
    (1, [1]),
    (0, []),
])
def test_a_call_replays_the_largest_graph_that_fits_then_the_largest_that_fits_the_rest(views, chunks):
    assert view_chunks(views, graph_sizes(144)) == chunks
    assert sum(chunks) == views


def test_every_call_can_be_made_of_the_sizes_only_with_a_graph_of_one_view():
    assert view_chunks(7, [1, 2, 4]) == [4, 2, 1]
    with pytest.raises(ValueError, match="must include 1"):
        view_chunks(10, [2, 4, 8])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cudnn", [False, True], ids=["PyTorch's attention", "SAM's attention through cuDNN"])
@pytest.mark.parametrize("which", ["ocr", "ocr2"])
def test_replayed_towers_give_the_towers_features(which, cudnn, tiny_model, tiny_ocr2_model):
    model = copy.deepcopy(tiny_model if which == "ocr" else tiny_ocr2_model).to("cuda", torch.bfloat16)
    model.model.sam_model.use_cudnn_attention(cudnn)  # as the engine serves them: its plans built at capture
    side = model.processing.RESOLUTION_MODES["Gundam"][1]  # the tiles' side
    towers = GraphedTowers(model, {side: 5})
    logged = []
    report = towers.capture(log=logged.append)
    assert report["graphs"] == 5 and sorted(towers.graphs) == [(side, count) for count in range(1, 6)]
    assert logged and logged[0].startswith("captured 5 CUDA graphs")
    torch.manual_seed(0)
    views = torch.randn(7, 3, side, side, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for count in (1, 3, 5):  # a captured size: the same kernels as the towers called on that many views
            assert torch.equal(towers(views[:count]), model.model.encode_views(views[:count]))
        replayed = towers(views)  # 5 + 2 replays
        called = torch.cat([model.model.encode_views(views[s:e]) for s, e in ((0, 5), (5, 7))])
        assert torch.equal(replayed, called)
        other_side = model.processing.RESOLUTION_MODES["Gundam"][0]  # the global view's: not captured here
        few = torch.randn(1, 3, other_side, other_side, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(towers(few), model.model.encode_views(few))
