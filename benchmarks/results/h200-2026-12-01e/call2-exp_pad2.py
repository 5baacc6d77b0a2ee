"""Exploration: windows in the padded grid at one 16-page pass's shapes, key rectangles and tiles."""
import json, sys
import torch
import torch.nn.functional as F
sys.path.insert(0, ".")
from checkpoints.triton_relative_attention import relative_attention
from benchmarks.ceilings import median_ms

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
heads, d, window, width = 12, 64, 14, 768
views = {64: 16, 40: 96}
results = {}


def record(name, fn, ref=None):
    try:
        out = fn()
        ms = median_ms(fn, 20)
        err = None
        if ref is not None:
            err = max(float((o.float() - r.float()).abs().max()) for o, r in zip(out, ref))
        results[name] = {"ms": ms, "max_diff_vs_first": err}
        print(f"{ms:8.3f} ms  {name}  diff {err}", flush=True)
        return out
    except Exception as e:
        results[name] = {"error": repr(e)[:400]}
        print("FAILED", name, repr(e)[:400], flush=True)


def table(s):
    return (torch.randn(2 * s - 1, d, device=dev) * 0.3).to(dt)


lin = torch.nn.Linear(width, 3 * width, device=dev, dtype=dt)
win_tables = (table(window), table(window))
_, kb, vb = lin.bias.detach().view(3, heads, d)
qkvs, padded_qkvs = {}, {}
with torch.inference_mode():
    def qkv_split(x):
        b, h, w, _ = x.shape
        return lin(x).reshape(b, h * w, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    for side, n in views.items():
        x = torch.randn(n, side, side, width, device=dev, dtype=dt)
        ps = -(-side // window) * window
        qkvs[side] = qkv_split(x)
        padded_qkvs[side] = qkv_split(F.pad(x, (0, 0, 0, ps - side, 0, ps - side)))

    def padded(keys=None, tiles=None):
        def run():
            return [relative_attention(*padded_qkvs[s], None, None, -(-s // window) * window, -(-s // window) * window,
                                       window=window, tables=win_tables, written=(s, s), keys=keys, tiles=tiles)
                    for s in views]
        return run
    ref = record("windows in the padded grid (default keys)", padded())
    for keys, tiles in (((4, 16), None), ((8, 16), None), ((16, 16), None), ((16, 8), None), ((8, 16), (64, 4, 4)),
                        ((8, 16), (64, 4, 2)), ((8, 16), (128, 8, 3)), ((8, 16), (128, 8, 2)), ((16, 16), (64, 4, 2)),
                        ((8, 32), None)):
        record(f"windows in the padded grid, keys {keys}, tiles {tiles}", padded(keys, tiles), ref)
    for keys in ((4, 16), (8, 16)):
        record(f"windows in the grid, padding in the kernel (before), keys {keys}",
               lambda keys=keys: [relative_attention(*qkvs[s], None, None, s, s, window=window, k_bias=kb, v_bias=vb,
                                                    tables=win_tables, keys=keys) for s in views], ref)
json.dump(results, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/exp.json", "w"), indent=1)
