"""What the Triton kernel families share: the optional import of Triton, the interpreter flag and the
launchers' small helpers.

The kernels sit beside the functions that launch them, one file per family: `triton_ops.py` (the
small steps of `fused_ops.py`), `triton_moe.py` (the routed experts of `fused_moe.py`) and
`triton_attention.py` (the paged cache of `paged_attention.py`). Each public function takes the
arguments and returns the results of the PyTorch definition it replaces; those definitions are the
specification and the tests' reference. Every kernel computes in float32 and rounds once when it
stores, except where the definition names a rounding point (the residual sum and the normalised
value of RMSNorm; each expert's output and the routed sum of the mixture of experts), which is
reproduced.

All of it can be captured in a CUDA graph: nothing waits for the device, nothing reads a tensor's
values on the host, and every launch size (grid, splits, block sizes) follows from shapes alone.
Kernels take strides, so views such as q and k cut out of one fused projection need no copy.

Triton is optional: these modules import without it (`available()` is then False and the callers
keep to PyTorch). Its import sits in a try block, which also keeps the Hugging Face remote-code loader
from demanding the package. `TRITON_INTERPRET=1` set before Triton is imported runs the kernels on
CPU tensors (the tests do so).
"""

import functools
import os

import torch

try:  # optional dependency: without it the PyTorch definitions run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
try:  # grid dependency control (Hopper's programmatic dependent launch), in Triton since 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the environment
    gdc_launch_dependents = gdc_wait = None


def available() -> bool:
    """Whether Triton imported, i.e. whether the kernel families' functions can run."""
    return triton is not None


_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted() -> bool:
    """Whether Triton's interpreter runs the kernels (on CPU tensors), as the tests run them."""
    return _INTERPRETED

# Programmatic dependent launch: the kernels of a decode step that take it may be launched while the
# kernel before them still runs, and wait for its results inside (`_wait_for_previous`). At batch 1 a
# step is ~200 kernels of a few microseconds each, and between two of them the GPU otherwise drains the
# first and only then starts the second's programs. Off unless the serving engine turns it on
# (`use_programmatic_launch`), so that loading the model alone launches every kernel plainly.
_PROGRAMMATIC_LAUNCH = False


def use_programmatic_launch(enabled: bool) -> None:
    """Launch the kernels that take it with programmatic dependent launch (where the GPU has it), or not.
    Kernels already captured in CUDA graphs keep the launch they were captured with."""
    global _PROGRAMMATIC_LAUNCH
    _PROGRAMMATIC_LAUNCH = bool(enabled)


@functools.lru_cache(maxsize=None)
def _has_programmatic_launch(device: torch.device) -> bool:
    return (gdc_wait is not None and not _INTERPRETED and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def programmatic(device: torch.device) -> bool:
    """Whether kernels launched now on `device` use programmatic dependent launch."""
    return _PROGRAMMATIC_LAUNCH and _has_programmatic_launch(device)


def launch_options(device: torch.device) -> dict:
    """The launch arguments of a kernel that takes a PROGRAMMATIC constexpr (and calls `_wait_for_previous`):
    that constexpr, and Triton's own option where `programmatic(device)`."""
    return {"PROGRAMMATIC": True, "launch_pdl": True} if programmatic(device) else {"PROGRAMMATIC": False}


if triton is not None:

    @triton.jit
    def _wait_for_previous(PROGRAMMATIC: tl.constexpr):
        """The first statement of a kernel that may be launched programmatically: wait until the kernel
        before it in the stream has finished and its writes are visible, then let the next one launch.
        The next one's programs then start (and wait here) while this kernel's last programs run. Every
        such kernel waits before it reads or writes anything, so a chain of them keeps the stream's order.
        """
        if PROGRAMMATIC:
            gdc_wait()
            gdc_launch_dependents()


def _next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rows(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """[..., width] → [rows, width] with unit stride along the width (a view whenever one exists)."""
    rows = tensor.reshape(-1, width)
    return rows if rows.stride(-1) == 1 or width == 1 else rows.contiguous()


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter on the CPU: an H100's count, so the tests take the GPU's launch shapes
