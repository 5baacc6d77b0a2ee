"""Exploration: SAM's windows at one 16-page pass's shapes, the grid padded before the qkv projection (served)
against the grid as it is with the padding's keys and values made up in the window kernel: the kernel's time, the
projection's time over each grid, the pad's, and whether the outputs are the same bits."""
import json, os, sys
import torch
import torch.nn.functional as F
sys.path.insert(0, ".")
import checkpoints.triton_relative_attention as rel

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
padding = lin.bias.view(3, heads, d)[1:]
results = {}


def timed(name, fn):
    ms = median_ms(fn, 20) if cuda else 0.0
    results.setdefault(name, {})["ms"] = ms
    print(f"{ms:8.3f} ms  {name}", flush=True)


def split(qkv, n, tokens):
    return qkv.reshape(n, tokens, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)


with torch.inference_mode():
    xs = {s: torch.randn(n, s, s, width, device=dev, dtype=dt) for s, n in views.items()}
    side = {s: -(-s // window) * window for s in views}
    padded_x = {s: F.pad(x, (0, 0, 0, side[s] - s, 0, side[s] - s)) for s, x in xs.items()}
    padded_qkv = {s: lin(padded_x[s]) for s in views}
    plain_qkv = {s: lin(xs[s]) for s in views}
    # the projection over the grid as it is against the grid padded first: the grid's rows the same bits?
    same_rows = all(torch.equal(padded_qkv[s][:, :s, :s], plain_qkv[s]) for s in views)
    pad_rows = all(torch.equal(padded_qkv[s][:, s:, :].reshape(-1, 3 * width)[0].float(), lin.bias.float())
                   for s in views if side[s] > s)
    results["qkv rows same bits padded or not"] = same_rows
    results["padding rows equal the bias"] = pad_rows
    print("qkv rows same bits:", same_rows, " padding rows = bias:", pad_rows, flush=True)
    timed("pad to whole windows (eager)", lambda: [F.pad(x, (0, 0, 0, side[s] - s, 0, side[s] - s))
                                                   for s, x in xs.items()])
    timed("qkv over the padded grids", lambda: [lin(x) for x in padded_x.values()])
    timed("qkv over the grids as they are", lambda: [lin(x) for x in xs.values()])

    def served():
        return [rel.relative_attention(*split(padded_qkv[s], n, side[s] ** 2), None, None, side[s], side[s],
                                       window=window, tables=tables, written=(s, s)) for s, n in views.items()]

    def in_kernel():
        return [rel.relative_attention(*split(plain_qkv[s], n, s * s), None, None, s, s, window=window,
                                       tables=tables, padding=padding) for s, n in views.items()]
    reference = served()
    got = in_kernel()
    same = all(torch.equal(a, b) for a, b in zip(got, reference))
    results["windows same bits"] = same
    print("window outputs same bits:", same, flush=True)
    for _ in range(2):
        timed("windows, grid padded first (served)", served)
        timed("windows, padding made up in the kernel", in_kernel)
json.dump(results, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/exp_padk.json", "w"), indent=1)
