"""Exploration (not committed): window attention variants, one 16-page pass."""
import json, math, sys
import torch
sys.path.insert(0, "."); pass
from checkpoints.triton_relative_attention import relative_attention, table_terms
from benchmarks.ceilings import median_ms

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
heads, d, window = 12, 64, 14
views = {64: 16, 40: 96}
def table(s):
    return (torch.randn(2 * s - 1, d, device=dev) * 0.3).to(dt)
grids = {}
for side, n in views.items():
    qkv = torch.randn(n, side * side, 3, heads, d, device=dev, dtype=dt)
    grids[side] = qkv.permute(2, 0, 3, 1, 4).unbind(0)
wt = (table(window), table(window))
kb, vb = (torch.randn(heads, d, device=dev, dtype=dt) for _ in range(2))
terms = {side: table_terms(q, *wt, side, side, window) for side, (q, k, v) in grids.items()}
results = {}
def record(name, fn, ref=None):
    try:
        out = fn(); ms = median_ms(fn, 10)
        err = None if ref is None else max(float((o.float() - r.float()).abs().max()) for o, r in zip(out, ref))
        results[name] = {"ms": ms, "diff": err}; print(f"{ms:8.3f} ms  {name}  diff {err}", flush=True); return out
    except Exception as e:
        results[name] = {"error": repr(e)[:300]}; print("FAILED", name, repr(e)[:400], flush=True)

def windows(mode="inside", **kw):
    def run():
        out = []
        for side, (q, k, v) in grids.items():
            if mode == "read":
                out.append(relative_attention(q, k, v, *terms[side], side, side, window=window, k_bias=kb, v_bias=vb, **kw))
            else:
                out.append(relative_attention(q, k, v, None, None, side, side, window=window, k_bias=kb, v_bias=vb,
                                              tables=wt, terms_first=mode == "first", **kw))
        return out
    return run
with torch.inference_mode():
    ref = record("windows inside (served)", windows())
    record("windows, terms read (table_terms excluded)", windows("read"), ref)
    record("windows, NO TERMS (read path, terms dead)", windows("read", no_terms=True))
    record("windows, NO TERMS, v select", windows("read", no_terms=True, v_select=True))
    record("windows inside, v select", windows(v_select=True), ref)
    record("windows read, v select", windows("read", v_select=True), ref)
    for tiles in ((64, 4, 1), (32, 2, 2), (32, 2, 3), (32, 4, 2), (32, 2, 1)):
        record(f"windows inside, tiles {tiles}", windows(tiles=tiles), ref)
        record(f"windows read, tiles {tiles}", windows("read", tiles=tiles), ref)
    for keys, tiles in (((16, 16), (64, 4, 1)), ((16, 16), (64, 8, 1)), ((16, 16), (128, 8, 1)), ((8, 16), (64, 4, 1)),
                        ((16, 16), (32, 4, 1)), ((16, 16), (32, 2, 1))):
        for bp in (False, True):
            record(f"windows inside, keys {keys}, tiles {tiles}, product {bp}", windows(keys=keys, tiles=tiles, by_product=bp), ref)
            record(f"windows read, keys {keys}, tiles {tiles}, product {bp}", windows("read", keys=keys, tiles=tiles, by_product=bp), ref)
    # cut-out contiguous windows, our kernel without terms, against cuDNN plain
    nwin = sum(n * math.ceil(s / window) ** 2 for s, n in views.items())
    qw, kw_, vw = (torch.randn(nwin, heads, window * window, d, device=dev, dtype=dt) for _ in range(3))
    rw = torch.zeros(nwin, heads, window * window, 16, device=dev, dtype=dt)
    for tiles in (None, (64, 4, 2), (64, 4, 1), (32, 2, 2)):
        record(f"cut-out windows, our kernel NO TERMS, tiles {tiles}", lambda: [relative_attention(qw, kw_, vw, rw, rw, window, window, tiles=tiles, no_terms=True)])
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, be in (("cuDNN", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel([be]):
            record(f"cut-out windows plain {name}", lambda: [torch.nn.functional.scaled_dot_product_attention(qw, kw_, vw)])
    # 640 global: the terms' cost
    q, k, v = grids[40]; gt = (table(40), table(40)); rows, cols = table_terms(q, *gt, 40, 40)
    ref = record("640 global read (served kernel)", lambda: [relative_attention(q, k, v, rows, cols, 40, 40)])
    record("640 global NO TERMS", lambda: [relative_attention(q, k, v, rows, cols, 40, 40, no_terms=True)])
    q, k, v = grids[64]; gt = (table(64), table(64)); rows, cols = table_terms(q, *gt, 64, 64)
    record("1024 global read (served kernel)", lambda: [relative_attention(q, k, v, rows, cols, 64, 64)])
    record("1024 global NO TERMS", lambda: [relative_attention(q, k, v, rows, cols, 64, 64, no_terms=True)])
json.dump(results, open(sys.argv[1], "w"), indent=1)
