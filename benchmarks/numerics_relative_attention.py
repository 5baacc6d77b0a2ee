"""SAM's global attention three ways, each in bf16 against the dense-bias order in float32: the Triton kernel
that adds the relative positions inside (`checkpoints/triton_relative_attention.py`), the folded path
(`deepencoder.folded_relative_attention`, what the engine serves) and the dense bias itself. On a GPU the kernel
runs as compiled; on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, bf16 rounding emulated as
tests/test_triton_kernels.py does; a 64 × 64 grid takes about a minute there).

    TRITON_INTERPRET=1 python benchmarks/numerics_relative_attention.py --grid 64     # CPU
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

from test_triton_kernels import load_kernel_modules, make_interpreter_faithful  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=64, help="grid side (64: a 1024 view's global blocks)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if interpreted:
        make_interpreter_faithful()
    device = "cpu" if interpreted or not torch.cuda.is_available() else "cuda"
    (kernel,) = load_kernel_modules("triton_relative_attention")
    deepencoder = importlib.import_module("checkpoints.deepencoder")
    torch.manual_seed(0)
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


if __name__ == "__main__":
    main()
