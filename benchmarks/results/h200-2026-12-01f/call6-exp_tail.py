"""Exploration: the window kernel's tail blocks (16 rows or 64) against the grid kernel's windows before it
(20c4a5d), at one 16-page pass's shapes: time and whether the outputs are the same bits."""
import json, os, sys
import torch
import torch.nn.functional as F
sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(__file__))
import checkpoints.triton_relative_attention as new
import old_rel

cuda = torch.cuda.is_available()
if cuda:
    from benchmarks.ceilings import median_ms
else:
    sys.path.insert(0, "tests")
    import test_triton_kernels
    test_triton_kernels.run_checks("cpu", ["relative_attention"])
dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
torch.manual_seed(0)
heads, d, window, width = 12, 64, 14, 768
views = {64: 16, 40: 96} if cuda else {20: 1, 16: 2}
lin = torch.nn.Linear(width, 3 * width, device=dev, dtype=dt)
tables = tuple((torch.randn(2 * window - 1, d, device=dev) * 0.3).to(dt) for _ in range(2))
results = {}
with torch.inference_mode():
    qkvs = {}
    for side, n in views.items():
        ps = -(-side // window) * window
        x = F.pad(torch.randn(n, side, side, width, device=dev, dtype=dt), (0, 0, 0, ps - side, 0, ps - side))
        qkvs[side] = (ps, lin(x).reshape(n, ps * ps, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0))

    def run(module):
        return lambda: [module.relative_attention(*qkv, None, None, ps, ps, window=window, tables=tables,
                                                  written=(s, s)) for s, (ps, qkv) in qkvs.items()]
    ref = run(old_rel)()
    for name, module, tail in (("grid kernel's windows (20c4a5d)", old_rel, None), ("window kernel, tail 16", new, 16),
                               ("window kernel, tail 64", new, 64), ("window kernel, tail 32", new, 32),
                               ("window kernel, tail 16 again", new, 16)):
        if tail:
            new.WINDOW_TAIL_QUERIES = tail
        out = run(module)()
        ms = median_ms(run(module), 20) if cuda else 0.0
        same = all(torch.equal(a, b) for a, b in zip(out, ref))
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(out, ref))
        results[name] = {"ms": ms, "same_bits_as_before": same, "max_diff": diff}
        print(f"{ms:8.3f} ms  {name}  same bits {same}  max diff {diff}", flush=True)
json.dump(results, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/exp_tail.json", "w"), indent=1)
