"""The vision towers replayed as CUDA graphs, captured at load for every view size the model's modes use.

Inside a job the GPU ran the vision passes and the prefills faster than two Python threads, sharing one
interpreter, could launch them: a pass of ~11 pages is ~1,100 kernel launches and ~650 operators (the
compiled blocks' guards among them), and in a profiled window of the 256-page job the GPU idled 32% of the
time, much of it while a pass was being launched (benchmarks/results/h200-2026-11-30e). Replayed, a call of
the towers is one copy into the graph's input, one replay and one copy out.

A graph is fixed to its number of views, and the number of views in a call varies (pages a pass, tiles a
page). Graphs are captured for every count up to EXACT_VIEWS (a pass's global views: one a page) and, above
it, for every multiple of VIEW_STEP up to the most views a call holds (`graph_sizes`); a call replays the
largest graph that fits its views, then the largest that fits the rest (`view_chunks`: 96 tiles, a pass of 16
A4 pages, one graph; 90 tiles: 88 + 2), so no view is computed twice and none is padded. Each replay costs
about a millisecond more than its views (every kernel's last, partial wave; the gaps between kernels): cut
into powers of two, as they were, 96 tiles took 88.3 ms against 86.3 in one graph, and a 15-page pass's
globals were four replays (h200-2026-12-02d). The graphs of all sizes share one memory pool: they run one
after another on one stream, and each replay's output is copied out before the next replay (whose
intermediates may lie where that output was). Each size has one input buffer that its graphs read from its
front, so the inputs take one call's worth.

Sizes not captured (none of the model's modes) run the towers as they are.

The graphs are captured on a stream of their own. A captured matrix product keeps the address of the cuBLAS
workspace of the stream it was captured on, and PyTorch captures on one shared stream unless told otherwise:
captured there, the towers' graphs shared their scratch memory with the decode step's graphs, and replayed at
once on two streams they corrupted each other's in-kernel synchronisation (in a 256-page job, vision passes of
11-40 s, one cuBLAS kernel 22.5 s of a 24 s window; benchmarks/results/h200-2026-11-30f).
"""

import time
from typing import Callable, Optional

import torch

from .vision_compile import attention_backends_kept


# Graph sizes (`graph_sizes`): every count of views up to EXACT_VIEWS, then every multiple of VIEW_STEP. A pass of
# 16 pages holds up to 16 global views and (Gundam, up to nine tiles a page) 144 tiles: 16 + 16 graphs for the
# tiles' side, 16 for each other side; captured in 4–6 s on the H200, against ~2 s for the powers of two.
EXACT_VIEWS = 16
VIEW_STEP = 8


def graph_sizes(most: int) -> list:
    """The counts of views graphs are captured for, for calls of at most `most` views: 1 .. EXACT_VIEWS, then
    the multiples of VIEW_STEP up to `most`."""
    return list(range(1, min(most, EXACT_VIEWS) + 1)) + list(range(EXACT_VIEWS + VIEW_STEP, most + 1, VIEW_STEP))


def view_chunks(views: int, sizes) -> list:
    """The graph sizes (`sizes`, 1 among them) that make up a call of `views` views: the largest that fits, again
    and again, so the fewest replays for `graph_sizes`' counts."""
    ordered = sorted(sizes, reverse=True)
    if not ordered or ordered[-1] != 1:
        raise ValueError(f"graph sizes {sorted(sizes)} must include 1, or some calls could not be made of them")
    chunks = []
    while views:
        chunks.append(next(size for size in ordered if size <= views))
        views -= chunks[-1]
    return chunks


class GraphedTowers:
    """`model.model.encode_views` as CUDA graphs: `towers(views)` takes normalised views [N, 3, S, S] in the
    towers' dtype on their device and returns what `encode_views` returns. `most_views`: side → the most
    views of that side one call holds (graphs of `graph_sizes(most)` views)."""

    def __init__(self, model, most_views: dict):
        inner = model.model
        self.encode_views = inner.encode_views
        self.device, self.dtype = inner.vision_device, inner.vision_dtype
        self.sizes = {side: graph_sizes(most) for side, most in most_views.items() if most >= 1}
        self.inputs: dict = {}  # side → the input buffer [its largest graph's views, 3, side, side]
        self.graphs: dict = {}  # (side, views) → (CUDAGraph, its output)
        self.pool = None

    def capture(self, log: Callable[[str], None] = lambda line: None) -> dict:
        """Captures every graph (a warm-up run of each first, where lazy initialisations happen outside the
        capture). The largest calls first, so that the pool is sized by them and the rest fit in it.
        Returns {"graphs", "seconds"}."""
        started = time.monotonic()
        order = sorted(((side, sizes[-1]) for side, sizes in self.sizes.items()),
                       key=lambda item: -item[1] * item[0] ** 2)
        capture_stream = torch.cuda.Stream(self.device)  # its own cuBLAS workspace (module docstring)
        # the blocks' own attention choices stay theirs (`vision_compile.attention_backends_kept`)
        with torch.inference_mode(), attention_backends_kept():
            for side, largest in order:
                buffer = torch.zeros(largest, 3, side, side, device=self.device, dtype=self.dtype)
                self.inputs[side] = buffer
                capture_stream.wait_stream(torch.cuda.current_stream(self.device))
                for views in reversed(self.sizes[side]):
                    with torch.cuda.stream(capture_stream):  # warm-up: the stream's workspace made before capture
                        self.encode_views(buffer[:views])
                    capture_stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool, stream=capture_stream):
                        output = self.encode_views(buffer[:views])
                    self.pool = graph.pool()
                    self.graphs[side, views] = (graph, output)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # what the warm-ups left cached: the graphs run in their own pool
        report = {"graphs": len(self.graphs), "seconds": time.monotonic() - started}
        log(f"captured {report['graphs']} CUDA graphs of the vision towers (views of "
            f"{', '.join(f'{side} px up to {n}' for side, n in order)}) in {report['seconds']:.1f} s")
        return report

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        side = views.shape[-1]
        if side not in self.inputs or views.dtype != self.dtype or views.shape[0] == 0:
            return self.encode_views(views)
        buffer = self.inputs[side]
        output: Optional[torch.Tensor] = None
        start = 0
        for count in view_chunks(views.shape[0], self.sizes[side]):
            graph, graph_output = self.graphs[side, count]
            buffer[:count].copy_(views[start:start + count])
            graph.replay()
            if output is None:
                output = graph_output.new_empty((views.shape[0], *graph_output.shape[1:]))
            output[start:start + count].copy_(graph_output)
            start += count
        return output
