"""SAM's global attention three ways, each in bf16 against the dense-bias order in float32: the Triton kernel
that adds the relative positions inside (`checkpoints/triton_relative_attention.py`), the folded path
(`deepencoder.folded_relative_attention`, what the engine serves) and the dense bias itself. On a GPU the kernel
runs as compiled; on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, bf16 rounding emulated as
tests/test_triton_kernels.py does; a 64 × 64 grid takes about a minute there). With `--window`, SAM's windowed
attention over the grid instead: the kernel reading the windows in the grid padded to whole windows (the padding's
keys and values the projection's biases, as SamBlock pads), the folded path over the windows cut out, against the
windows cut out in float32.

    TRITON_INTERPRET=1 python benchmarks/numerics_relative_attention.py --grid 64     # CPU
    TRITON_INTERPRET=1 python benchmarks/numerics_relative_attention.py --grid 40 --window 14
    python benchmarks/numerics_relative_attention.py --grid 64 --views 4               # GPU
"""

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_triton_kernels import (  # noqa: E402
    fused_qkv_on_windows, load_kernel_modules, make_interpreter_faithful, padded_to_windows,
    windowed_relative_attention_reference,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=64, help="grid side (64: a 1024 view's global blocks)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--window", type=int, default=0, help="windows of this side (14: SAM's windowed blocks)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if interpreted:
        make_interpreter_faithful()
    device = "cpu" if interpreted or not torch.cuda.is_available() else "cuda"
    (kernel,) = load_kernel_modules("triton_relative_attention")
    deepencoder = importlib.import_module("checkpoints.deepencoder")
    torch.manual_seed(0)
    if args.window:
        report = windowed(kernel, deepencoder, args, device)
        report["interpreted"] = interpreted
        print(json.dumps(report, indent=1))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return
    views, heads, side, head_dim = args.views, args.heads, args.grid, 64
    tokens = side * side
    # SAM-like scales: unit queries and keys, relative-position tables of order 0.5
    q, k, v = torch.randn(views, tokens, 3, heads, head_dim, device=device).permute(2, 0, 3, 1, 4).unbind(0)
    rel_h, rel_w = (torch.randn(side, side, head_dim, device=device) * 0.5 for _ in range(2))

    def dense(q, k, v, rel_h, rel_w):
        rows, cols = deepencoder.relative_terms(q, rel_h, rel_w, side, side)
        bias = (rows[..., :, None] + cols[..., None, :]).reshape(views, heads, tokens, tokens)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)

    reference = dense(q, k, v, rel_h, rel_w)
    bf16 = [t.bfloat16() for t in (q, k, v, rel_h, rel_w)]
    rows, cols = deepencoder.relative_terms(bf16[0], bf16[3], bf16[4], side, side)
    results = {
        "kernel": kernel.relative_attention(*bf16[:3], rows, cols, side, side).float(),
        "folded": deepencoder.folded_relative_attention(*bf16[:3], rows, cols, side, side).transpose(1, 2).float(),
        "dense bias, bf16": dense(*bf16).float(),
    }
    distance = {name: float((out - reference).norm() / reference.norm()) for name, out in results.items()}
    distance["kernel vs folded"] = float((results["kernel"] - results["folded"]).norm() / results["folded"].norm())
    report = {"device": device, "interpreted": interpreted, "grid": side, "heads": heads, "views": views,
              "relative_distance_from_float32": distance}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def windowed(kernel, deepencoder, args, device) -> dict:
    """The --window comparison (module docstring)."""
    views, heads, side, window, head_dim = args.views, args.heads, args.grid, args.window, 64
    tokens = side * side
    q, k, v = torch.randn(views, tokens, 3, heads, head_dim, device=device).permute(2, 0, 3, 1, 4).unbind(0)
    rel_h, rel_w = (torch.randn(2 * window - 1, head_dim, device=device) * 0.5 for _ in range(2))  # the tables
    k_bias, v_bias = (torch.randn(heads, head_dim, device=device) for _ in range(2))

    def terms(q, rel_h, rel_w, pad_to=1):  # each token's terms, those of its place in its window
        return deepencoder.relative_terms(q, deepencoder.relative_positions_in_windows(side, window, rel_h),
                                          deepencoder.relative_positions_in_windows(side, window, rel_w),
                                          side, side, pad_to=pad_to)

    reference = windowed_relative_attention_reference(q, k, v, *terms(q, rel_h, rel_w), side, side, window,
                                                      k_bias, v_bias)
    bf16 = [t.bfloat16() for t in (q, k, v, rel_h, rel_w, k_bias, v_bias)]
    rows, cols = terms(bf16[0], bf16[3], bf16[4], pad_to=8)

    def folded(q, k, v, rows, cols):
        return deepencoder.folded_relative_attention(q, k, v, rows, cols, window, window).transpose(1, 2)

    grid = -(-side // window) * window  # the kernel's grid: padded to whole windows, as SamBlock pads it

    def on_grid(terms):
        return padded_to_windows(terms, side, side, window, terms.new_zeros(heads, terms.shape[-1]))

    grid_q, grid_k, grid_v = fused_qkv_on_windows(*bf16[:3], side, side, window, bf16[5], bf16[6])
    results = {
        "kernel, windows in the grid": kernel.relative_attention(grid_q, grid_k, grid_v, on_grid(rows), on_grid(cols),
                                                                 grid, grid, window=window,
                                                                 written=(side, side)).float(),
        "folded, windows cut out": windowed_relative_attention_reference(
            *bf16[:3], *terms(bf16[0], bf16[3], bf16[4]), side, side, window, bf16[5], bf16[6],
            attend=folded).float(),
    }
    distance = {name: float((out - reference).norm() / reference.norm()) for name, out in results.items()}
    kernel_out, folded_out = results.values()
    distance["kernel vs folded"] = float((kernel_out - folded_out).norm() / folded_out.norm())
    return {"device": device, "grid": side, "window": window, "heads": heads, "views": views,
            "relative_distance_from_float32": distance}


if __name__ == "__main__":
    main()
