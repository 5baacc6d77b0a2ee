"""The vision towers as CUDA graphs (ocr_service/vision_graphs.py): how a call's views are cut into the
captured sizes (CPU), and, on a GPU, the tiny checkpoints' real towers replayed against the towers called."""

import copy

import pytest
import torch

from ocr_service.vision_graphs import GraphedTowers, powers_of_two_up_to, view_chunks


@pytest.mark.parametrize("views, largest, chunks", [
    (96, 128, [64, 32]),  # six tiles a page, 16 pages
    (144, 128, [128, 16]),  # the most tiles a pass of 16 pages holds
    (300, 128, [128, 128, 32, 8, 4]),  # beyond the largest graph: it repeats
    (16, 16, [16]),
    (1, 16, [1]),
    (15, 16, [8, 4, 2, 1]),
    (0, 4, []),
])
def test_a_call_is_cut_into_the_binary_digits_of_its_views(views, largest, chunks):
    assert view_chunks(views, largest) == chunks
    assert sum(chunks) == views


def test_the_largest_graph_must_hold_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        view_chunks(10, 96)


def test_graph_sizes_are_the_powers_of_two_within_the_most_views():
    assert powers_of_two_up_to(144) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert powers_of_two_up_to(1) == [1]
    assert powers_of_two_up_to(0) == []


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
    assert report["graphs"] == 3 and sorted(towers.graphs) == [(side, 1), (side, 2), (side, 4)]
    assert logged and logged[0].startswith("captured 3 CUDA graphs")
    torch.manual_seed(0)
    views = torch.randn(7, 3, side, side, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for count in (1, 2, 4):  # a captured size: the same kernels as the towers called on that many views
            assert torch.equal(towers(views[:count]), model.model.encode_views(views[:count]))
        replayed = towers(views)  # 4 + 2 + 1 replays
        called = torch.cat([model.model.encode_views(views[s:e]) for s, e in ((0, 4), (4, 6), (6, 7))])
        assert torch.equal(replayed, called)
        other_side = model.processing.RESOLUTION_MODES["Gundam"][0]  # the global view's: not captured here
        few = torch.randn(1, 3, other_side, other_side, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(towers(few), model.model.encode_views(few))
