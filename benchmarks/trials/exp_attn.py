"""Exploration (not committed): SAM attention kernel variants at one 16-page pass's shapes."""
import json, math, sys, time
import torch
sys.path.insert(0, ".")
from checkpoints.triton_relative_attention import relative_attention, table_terms
from benchmarks.ceilings import median_ms

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
heads, d, window = 12, 64, 14
views = {64: 16, 40: 96}
trained = {64: 64, 40: 64}


def table(s):
    return (torch.randn(2 * s - 1, d, device=dev) * 0.3).to(dt)


grids = {}
for side, n in views.items():
    qkv = torch.randn(n, side * side, 3, heads, d, device=dev, dtype=dt)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    grids[side] = (q, k, v)
win_tables = (table(window), table(window))
kb, vb = (torch.randn(heads, d, device=dev, dtype=dt) for _ in range(2))
results = {}


def record(name, fn, ref=None):
    try:
        out = fn()
        ms = median_ms(fn, 10)
        err = None
        if ref is not None:
            err = max(float((o.float() - r.float()).abs().max()) for o, r in zip(out, ref))
        results[name] = {"ms": ms, "max_diff_vs_first": err}
        print(f"{ms:8.3f} ms  {name}  diff {err}", flush=True)
        return out
    except Exception as e:
        results[name] = {"error": repr(e)[:300]}
        print("FAILED", name, repr(e)[:300], flush=True)


with torch.inference_mode():
    # windows, as served: read in the grids, both view sizes
    def windows(terms, by_product, keys=None, tiles=None):
        def run():
            return [relative_attention(q, k, v, None, None, side, side, window=window, k_bias=kb, v_bias=vb,
                                       tables=win_tables, terms_first=terms == "first", keys=keys, tiles=tiles,
                                       by_product=by_product) for side, (q, k, v) in grids.items()]
        return run
    ref = record("windows, inside, broadcast (served)", windows("inside", False))
    for terms in ("inside", "first"):
        for keys in (None, (8, 16), (8, 8), (2, 32)):
            for tiles in (None, (64, 4, 2), (128, 8, 2), (128, 8, 3), (64, 8, 2)):
                for bp in ((False, True) if keys is None and tiles is None else (True,)):
                    record(f"windows, {terms}, {'product' if bp else 'broadcast'}, keys {keys}, tiles {tiles}",
                           windows(terms, bp, keys, tiles), ref)
    # global over the 640 tiles (terms first, read): rectangles
    q, k, v = grids[40]
    gt = (table(40), table(40))
    def glob(by_product, keys=None, tiles=None, side=40):
        q, k, v = grids[side]
        tabs = (table(side), table(side)) if side != 40 else gt
        def run():
            return [relative_attention(q, k, v, None, None, side, side, tables=tabs, terms_first=True,
                                       keys=keys, tiles=tiles, by_product=by_product)]
        return run
    ref = record("640 global, broadcast (served)", glob(False))
    record("640 global, product", glob(True), ref)
    for keys in ((8, 8), (8, 16), (4, 16), (16, 8)):
        for tiles in (None, (64, 4, 2), (128, 8, 2), (128, 8, 3)):
            record(f"640 global, product, keys {keys}, tiles {tiles}", glob(True, keys, tiles), ref)
    rows, cols = table_terms(q, *gt, 40, 40)
    record("640 global terms alone (table_terms)", lambda: [table_terms(q, *gt, 40, 40)[0]])
    record("640 global, product, terms read (kernel alone)", lambda: [relative_attention(q, k, v, rows, cols, 40, 40, by_product=True)])
    record("640 global, broadcast, terms read (kernel alone)", lambda: [relative_attention(q, k, v, rows, cols, 40, 40, by_product=False)])
    record("1024 global (served, rows)", glob(False, side=64))
    # plain cuDNN over cut-out windows for scale
    from torch.nn.attention import SDPBackend, sdpa_kernel
    nwin = sum(n * math.ceil(s / window) ** 2 for s, n in views.items())
    qw, kw, vw = (torch.randn(nwin, heads, window * window, d, device=dev, dtype=dt) for _ in range(3))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        record("plain cuDNN over cut-out windows (no terms)", lambda: [torch.nn.functional.scaled_dot_product_attention(qw, kw, vw)])
    q40 = grids[40][0]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        record("plain cuDNN 640 global (no terms)", lambda: [torch.nn.functional.scaled_dot_product_attention(*grids[40])])
json.dump(results, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/exp.json", "w"), indent=1)
