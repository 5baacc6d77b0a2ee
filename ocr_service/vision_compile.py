"""The vision towers compiled with torch.compile at load, block by block.

Eager, the towers spend most of their GPU time in element-wise kernels (the copies that lay out windows and
heads, the extended queries and keys of the folded relative positions, the casts bf16 autocast puts around
every LayerNorm and GELU; README "Performance"): Inductor fuses them into the few kernels around each matrix
product. What is compiled is each of the towers' repeated blocks (`compiled_vision_parts`: SAM's blocks,
CLIP-L's or the query encoder's layers) and SAM's neck, not the whole pass: blocks of one kind share one compiled
graph, so compiling costs a few graphs instead of the towers unrolled (the whole towers took 122 s to compile on
the H200), and nearly all the work is inside the blocks.

The number of views in a call is dynamic (it varies with the pages in a pass); each view size has graphs of its
own (`_compile_block`). Everything is compiled at load: every view size the model's resolution modes use is run
once with one view and once with two (Dynamo compiles a dimension of 1 apart), so that no prediction waits for
a compile. After that, a shape or state no compiled graph fits
runs eagerly instead of compiling (`eager_on_recompile`): a prediction is never stalled for a minute, at worst
it runs at the eager speed.

Inductor keeps what it compiled in its on-disk cache (`TORCHINDUCTOR_CACHE_DIR`, by default under /tmp): a
second start on the same machine or container traces the blocks again but takes the compiled kernels from it.
"""

import contextlib
import time
from typing import Callable, Iterable, Optional

import torch

from .vision import pass_views

# Compiled graphs a block's code may hold: two or three kinds of block (SAM's windowed and global ones, the
# second tower's layers) × one view and several, × the view sizes whose relative-position tables are resampled
# or not. Dynamo's default (8) would send the rest to eager without a word.
RECOMPILE_LIMIT = 64


def view_sides(model, modes: Optional[Iterable[tuple]] = None) -> list:
    """The square view sizes the model's resolution modes (or `modes`, those an engine serves: `pass_views`) give
    its towers, its default (Gundam) views first."""
    sides = {side for side, _ in pass_views(model, 1, modes)}
    default = model.processing.RESOLUTION_MODES.get("Gundam")
    first = [default[0], default[1]] if default else []
    return [side for side in first if side in sides] + sorted(sides - set(first))


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def compile_vision_towers(model, backend: str = "inductor", log: Callable[[str], None] = print,
                          sides: Optional[list] = None, options: Optional[dict] = None) -> dict:
    """Compiles the towers' parts (`compiled_vision_parts`) of `model` (a DeepSeek-OCR model of either kind) in
    place and runs each view size (`sides`, default `view_sides(model)`) through them once with one and with two
    views, so that every compile happens now. `options`: Inductor's (torch.compile's `options`). Returns
    {"seconds", "graphs", "sides"}; afterwards the process's compile stance is `eager_on_recompile`. If compiling
    fails, the parts are left eager and the error raised."""
    import torch._dynamo

    inner = model.model
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    device, dtype = inner.vision_device, inner.vision_dtype
    sides = sides or view_sides(model)
    # once eagerly: what the model sets up on its first run (fused weights) is not traced
    with torch.inference_mode(), attention_backends_kept():
        inner.encode_views(torch.zeros(1, 3, min(sides), min(sides), device=device, dtype=dtype))
    blocks = inner.compiled_vision_parts()
    for block in blocks:
        _compile_block(block, backend, options)
    log(f"compiling the vision towers' {len(blocks)} parts (blocks, SAM's neck) for views of "
        f"{', '.join(map(str, sides))} pixels (on the H200 ~100 s the first time on a machine, ~20 s from "
        "Inductor's cache; DEEPSEEK_OCR_VISION=fast skips it)")
    graphs_before, started = compiled_graphs(), time.monotonic()
    try:
        # A process may load a second model (tests do): its warm-up must compile, whatever the stance left.
        with torch.compiler.set_stance("default"), torch.inference_mode(), attention_backends_kept():
            for side in sides:
                for views in (1, 2):
                    inner.encode_views(torch.zeros(views, 3, side, side, device=device, dtype=dtype))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except BaseException:
        uncompile_vision_towers(model)
        raise
    torch.compiler.set_stance("eager_on_recompile")
    report = {"seconds": time.monotonic() - started, "graphs": compiled_graphs() - graphs_before, "sides": sides}
    log(f"compiled the vision towers' {len(blocks)} parts ({report['graphs']} graphs, views of "
        f"{', '.join(map(str, sides))} pixels) in {report['seconds']:.1f} s")
    return report


@contextlib.contextmanager
def attention_backends_kept():
    """SDPA's process-wide backend flags (and their order) as they were before, whatever happens inside.
    SAM's blocks pick their attention backends with `sdpa_kernel` (`SamEncoder.use_cudnn_attention`); on
    torch 2.11 tracing them left those choices set for the whole process (on the H200, CLIP's layers traced
    after SAM's took cuDNN's kernels although the process had turned them off), and the decoder's prefill,
    whose shapes change with every pass, must not meet cuDNN's per-shape plans."""
    backends = torch.backends.cuda
    flags = (backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled(), backends.math_sdp_enabled(),
             backends.cudnn_sdp_enabled())
    order = getattr(torch._C, "_get_sdp_priority_order", lambda: None)()
    try:
        yield
    finally:
        for enable, flag in zip((backends.enable_flash_sdp, backends.enable_mem_efficient_sdp,
                                 backends.enable_math_sdp, backends.enable_cudnn_sdp), flags):
            enable(flag)
        if order is not None and hasattr(torch._C, "_set_sdp_priority_order"):
            torch._C._set_sdp_priority_order(order)


def uncompile_vision_towers(model) -> None:
    """The towers' compiled parts back to eager."""
    for block in model.model.compiled_vision_parts():
        block.__dict__.pop("forward", None)


def is_compiled(block) -> bool:
    return "forward" in block.__dict__


def _compile_block(block, backend, options=None) -> None:
    """`block.forward` compiled, with only the number of views (or windows) dynamic: each call marks dimension
    0 of the inputs that carry it as dynamic and every other dimension as static, so that the other sizes of a
    view size are compiled as constants (Inductor of torch 2.11 fails on the index arithmetic of a symbolic grid
    side: "TensorReferenceAnalysis has no attribute python_mod"), and a new view size compiles its own graph.
    Blocks of one kind share their graphs: Dynamo keeps them by the code of `forward`."""
    compiled = torch.compile(block.forward, backend=backend, options=options)

    def forward(*args, **kwargs):
        _mark_shapes(args)
        return compiled(*args, **kwargs)

    block.forward = forward


def _mark_shapes(args: tuple) -> None:
    import torch._dynamo

    first = args[0]
    batch = first.shape[0]
    for value in args:
        if not isinstance(value, torch.Tensor):
            continue
        for dim in range(value.ndim):
            carries_batch = dim == 0 and value.ndim == first.ndim and value.shape[0] == batch
            if carries_batch and batch > 1:  # a dimension of one is compiled apart in any case
                torch._dynamo.maybe_mark_dynamic(value, 0)
            else:
                torch._dynamo.mark_static(value, dim)
