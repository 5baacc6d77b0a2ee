"""Exploration: SAM's windows at one 16-page pass's shapes, the served kernel against `win_kernel`'s variants."""
import json, os, sys
import torch
import torch.nn.functional as F
sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(__file__))
from checkpoints.triton_relative_attention import relative_attention
from win_kernel import window_attention

cuda = torch.cuda.is_available()
if cuda:
    from benchmarks.ceilings import median_ms
else:  # Triton's interpreter (numpy 2.4) mis-reads int arguments in a fresh process until some launches ran
    sys.path.insert(0, "tests")
    import test_triton_kernels
    test_triton_kernels.run_checks("cpu", ["relative_attention"])
dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
torch.manual_seed(0)
heads, d, window, width = 12, 64, 14, 768
views = {64: 16, 40: 96} if cuda else {20: 1, 16: 2}
results = {}


def record(name, fn, ref=None):
    try:
        out = fn()
        ms = median_ms(fn, 20) if cuda else 0.0
        err = None
        if ref is not None:
            err = max(float((o.float() - r.float()).abs().max()) for o, r in zip(out, ref))
        results[name] = {"ms": ms, "max_diff_vs_first": err}
        print(f"{ms:8.3f} ms  {name}  diff {err}", flush=True)
        return out
    except Exception as e:
        results[name] = {"error": repr(e)[:600]}
        print("FAILED", name, repr(e)[:600], flush=True)


def table(s):
    return (torch.randn(2 * s - 1, d, device=dev) * 0.3).to(dt)


lin = torch.nn.Linear(width, 3 * width, device=dev, dtype=dt)
win_tables = (table(window), table(window))
padded_qkvs = {}
with torch.inference_mode():
    def qkv_split(x):
        b, h, w, _ = x.shape
        return lin(x).reshape(b, h * w, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    for side, n in views.items():
        x = torch.randn(n, side, side, width, device=dev, dtype=dt)
        ps = -(-side // window) * window
        padded_qkvs[side] = qkv_split(F.pad(x, (0, 0, 0, ps - side, 0, ps - side)))

    def side_of(s):
        return -(-s // window) * window

    def served():
        return [relative_attention(*padded_qkvs[s], None, None, side_of(s), side_of(s), window=window,
                                   tables=win_tables, written=(s, s)) for s in views]

    def variant(**kw):
        def run():
            return [window_attention(*padded_qkvs[s], win_tables, side_of(s), side_of(s), window, (s, s), **kw)
                    for s in views]
        return run

    ref = record("served kernel", served)
    for kw in (dict(stages=1), dict(stages=1, prefetch=True), dict(stages=2, prefetch=True),
               dict(stages=1, block=32), dict(stages=1, block=32, warps=2), dict(stages=1, tail=32),
               dict(stages=1, prefetch=True, warps=8), dict(stages=1, block=128, warps=8, prefetch=True)):
        record(f"window kernel {kw}", variant(**kw), ref)
json.dump(results, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/exp_win.json", "w"), indent=1)
