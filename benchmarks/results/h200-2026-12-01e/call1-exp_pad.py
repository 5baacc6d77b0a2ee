"""Exploration: SAM attention kernel at one 16-page pass's shapes. Windows read in the grid with padding
(served) against the grid padded first (qkv over padded tokens, windows whole); the 640 tiles' global
attention by rectangles (served) against runs of whole rows."""
import json, math, sys
import torch
import torch.nn.functional as F
sys.path.insert(0, ".")
from checkpoints.triton_relative_attention import relative_attention, table_terms
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
        results[name] = {"ms": ms, "max_diff_vs_served": err}
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
xs, padded_xs, qkvs, padded_qkvs = {}, {}, {}, {}
with torch.inference_mode():
    for side, n in views.items():
        x = torch.randn(n, side, side, width, device=dev, dtype=dt)
        ps = -(-side // window) * window
        xs[side] = x
        padded_xs[side] = F.pad(x, (0, 0, 0, ps - side, 0, ps - side))

    def qkv_split(x):
        b, h, w, _ = x.shape
        return lin(x).reshape(b, h * w, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)

    for side in views:
        qkvs[side] = qkv_split(xs[side])
        padded_qkvs[side] = qkv_split(padded_xs[side])
    record("qkv product, grids as they are", lambda: [lin(xs[s]) for s in views])
    record("qkv product, grids padded to whole windows", lambda: [lin(padded_xs[s]) for s in views])
    record("pad the norm's output (eager copy; fused into the norm when compiled)",
           lambda: [F.pad(xs[s], (0, 0, 0, -(-s // window) * window - s, 0, -(-s // window) * window - s)) for s in views])

    def windows_served():
        return [relative_attention(*qkvs[s], None, None, s, s, window=window, k_bias=kb, v_bias=vb,
                                   tables=win_tables) for s in views]
    ref = record("windows in the grid, padding in the kernel, terms inside (served)", windows_served)

    def windows_padded(terms_first=False, row_runs=0, tiles=None, keys=None):
        def run():
            out = []
            for s in views:
                ps = -(-s // window) * window
                out.append(relative_attention(*padded_qkvs[s], None, None, ps, ps, window=window, tables=win_tables,
                                              terms_first=terms_first, written=(s, s), row_runs=row_runs,
                                              tiles=tiles, keys=keys))
            return out
        return run
    record("windows in the padded grid, terms inside", windows_padded(), ref)
    for tiles in ((64, 4, 2), (64, 4, 4), (128, 8, 3), (64, 8, 3), (32, 4, 3)):
        record(f"windows in the padded grid, terms inside, tiles {tiles}", windows_padded(tiles=tiles), ref)
    for keys in ((2, 32), (8, 8), (8, 16)):
        record(f"windows in the padded grid, terms inside, keys {keys}", windows_padded(keys=keys), ref)
    record("windows in the padded grid, terms first", windows_padded(terms_first=True), ref)
    for runs in (4, 9):
        record(f"windows in the padded grid, terms first, row runs {runs}", windows_padded(True, runs), ref)
    record("windows served, terms first", lambda: [relative_attention(*qkvs[s], None, None, s, s, window=window,
                                                   k_bias=kb, v_bias=vb, tables=win_tables, terms_first=True)
                                                   for s in views], ref)

    # global attention over the 640 tiles' 40 x 40 grids: terms first (served) by rectangles or by row runs
    q, k, v = qkvs[40]
    gt = (table(40), table(40))
    rows, cols = table_terms(q, *gt, 40, 40)
    record("640 global terms alone (table_terms)", lambda: [table_terms(q, *gt, 40, 40)[0]])
    ref = record("640 global, rectangles, terms read (served kernel)",
                 lambda: [relative_attention(q, k, v, rows, cols, 40, 40)])
    for runs in (1, 3, 6):
        for tiles in (None, (64, 8, 3), (128, 8, 3), (64, 4, 2)):
            record(f"640 global, row runs {runs}, tiles {tiles}",
                   lambda runs=runs, tiles=tiles: [relative_attention(q, k, v, rows, cols, 40, 40, row_runs=runs,
                                                                      tiles=tiles)], ref)
    q6, k6, v6 = qkvs[64]
    gt6 = (table(64), table(64))
    record("1024 global (served, rows, terms first)",
           lambda: [relative_attention(q6, k6, v6, None, None, 64, 64, tables=gt6, terms_first=True)])
json.dump(results, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/exp.json", "w"), indent=1)
