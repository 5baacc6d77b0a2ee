"""Exploration (not committed): GELU in cuBLASLt's epilogue; window attention combos."""
import json, math, sys
import torch
import torch.nn.functional as F
sys.path.insert(0, "."); pass
from checkpoints.triton_relative_attention import relative_attention, table_terms
from benchmarks.ceilings import median_ms
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
results = {}
def record(name, fn, ref=None):
    try:
        out = fn(); ms = median_ms(fn, 10)
        err = None if ref is None else max(float((o.float() - r.float()).abs().max()) for o, r in zip(out, ref))
        results[name] = {"ms": ms, "diff": err}; print(f"{ms:8.3f} ms  {name}  diff {err}", flush=True); return out
    except Exception as e:
        results[name] = {"error": repr(e)[:300]}; print("FAILED", name, repr(e)[:400], flush=True)
with torch.inference_mode():
    for tokens in (65536, 153600):
        x = torch.randn(tokens, 768, device=dev).to(dt)
        w = (torch.randn(3072, 768, device=dev) * 1.5 / math.sqrt(768)).to(dt)
        b = (torch.randn(3072, device=dev) * 0.1).to(dt)
        comp = torch.compile(lambda x: F.gelu(F.linear(x, w, b)))
        record(f"{tokens}: linear alone", lambda: [F.linear(x, w, b)])
        ref = record(f"{tokens}: linear + gelu eager", lambda: [F.gelu(F.linear(x, w, b))])
        record(f"{tokens}: linear + gelu compiled", lambda: [comp(x)], ref)
        record(f"{tokens}: _addmm_activation gelu (cuBLASLt epilogue)", lambda: [torch._addmm_activation(b, x, w.t(), use_gelu=True)], ref)
        record(f"{tokens}: linear + gelu tanh eager", lambda: [F.gelu(F.linear(x, w, b), approximate="tanh")], ref)
        # accuracy against float32 exact
        exact = F.gelu(x.float() @ w.float().t() + b.float())
        for name, out in (("current (bf16 linear, erf gelu)", F.gelu(F.linear(x, w, b))),
                          ("compiled", comp(x)),
                          ("epilogue", torch._addmm_activation(b, x, w.t(), use_gelu=True)),
                          ("bf16 linear, tanh gelu", F.gelu(F.linear(x, w, b), approximate="tanh")),
                          ("exact rounded to bf16 once", exact.to(dt))):
            e = (out.float() - exact)
            row = {"mean_abs": float(e.abs().mean()), "max_abs": float(e.abs().max()), "rms": float(e.pow(2).mean().sqrt()),
                   "differs_from_exact_bf16": float((out != exact.to(dt)).float().mean())}
            results[f"{tokens}: accuracy {name}"] = row
            print(tokens, "accuracy", name, json.dumps(row), flush=True)
        del x, w, b, comp
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
    def windows(mode="inside", **kw):
        def run():
            out = []
            for side, (q, k, v) in grids.items():
                out.append(relative_attention(q, k, v, None, None, side, side, window=window, k_bias=kb, v_bias=vb,
                                              tables=wt, terms_first=mode == "first", **kw))
            return out
        return run
    record("window table_terms alone", lambda: [table_terms(q, *wt, s, s, window)[0] for s, (q, k, v) in grids.items()])
    ref = record("windows inside (served)", windows())
    for mode in ("inside", "first"):
        for keys in (None, (8, 16)):
            for tiles in (None, (64, 4, 1), (64, 4, 2)):
                for vs in (False, True):
                    record(f"windows {mode}, keys {keys}, tiles {tiles}, v_select {vs}", windows(mode, keys=keys, tiles=tiles, v_select=vs), ref)
json.dump(results, open(sys.argv[1], "w"), indent=1)
