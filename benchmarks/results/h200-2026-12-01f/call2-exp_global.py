"""Exploration: SAM's global blocks at one 16-page pass's shapes (terms first, as served): key tiles and
program shapes of the served kernel."""
import json, sys
import torch
sys.path.insert(0, ".")
from checkpoints.triton_relative_attention import relative_attention
from benchmarks.ceilings import median_ms

dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
heads, d, width = 12, 64, 768
views = {64: 16, 40: 96}
results = {}
lin = torch.nn.Linear(width, 3 * width, device=dev, dtype=dt)


def record(name, fn, ref=None):
    try:
        out = fn()
        ms = median_ms(fn, 20)
        err = None if ref is None else float((out.float() - ref.float()).abs().max())
        results[name] = {"ms": ms, "max_diff_vs_first": err}
        print(f"{ms:8.3f} ms  {name}  diff {err}", flush=True)
        return out
    except Exception as e:
        results[name] = {"error": repr(e)[:600]}
        print("FAILED", name, repr(e)[:600], flush=True)


with torch.inference_mode():
    for side, n in views.items():
        x = torch.randn(n, side, side, width, device=dev, dtype=dt)
        q, k, v = lin(x).reshape(n, side * side, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        tables = tuple((torch.randn(2 * side - 1, d, device=dev) * 0.3).to(dt) for _ in range(2))

        def run(keys=None, tiles=None):
            return lambda: relative_attention(q, k, v, None, None, side, side, tables=tables, terms_first=True,
                                              keys=keys, tiles=tiles)
        ref = record(f"{side}: served", run())
        variants = ([((2, 64), None), ((2, 64), (64, 4, 2)), ((2, 64), (128, 8, 3)), (None, (64, 4, 2)),
                     (None, (64, 4, 4)), (None, (128, 8, 2)), (None, (128, 4, 2))] if side == 64 else
                    [((16, 8), None), ((8, 16), None), ((8, 16), (64, 4, 2)), ((8, 8), (64, 4, 2)),
                     ((8, 8), (64, 4, 4)), ((8, 8), (128, 8, 3)), ((8, 8), (32, 2, 3)), ((16, 8), (128, 8, 2))])
        for keys, tiles in variants:
            record(f"{side}: keys {keys} tiles {tiles}", run(keys, tiles), ref)
json.dump(results, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/exp_global.json", "w"), indent=1)
