"""Exploration: SAM's windowed blocks round differently, compiled, with the windows' padding made up in the kernel
than with the grid padded before the qkv projection (the same bits eagerly). Which part: the norm compiled alone
(then padded, as before, or not), and ways of writing the norm, each against the padded norm's bits."""
import json, sys
import torch
import torch.nn.functional as F
sys.path.insert(0, ".")
from checkpoints.deepencoder import pad_to_windows

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
norm = torch.nn.LayerNorm(768, eps=1e-6).to(dev, dt)
with torch.no_grad():
    norm.weight.copy_(1 + 0.1 * torch.randn(768))
    norm.bias.copy_(0.1 * torch.randn(768))
w, b, eps = norm.weight, norm.bias, 1e-6


def padded(x):  # the served norm before: its output padded to whole windows, then (here) cut back
    return pad_to_windows(norm(x).to(dt), 14)


def plain(x):
    return norm(x).to(dt)


def decomposed(x):
    xf = x.float()
    var, mean = torch.var_mean(xf, -1, correction=0, keepdim=True)
    return ((xf - mean) * torch.rsqrt(var + eps) * w.float() + b.float()).to(dt)


def stats(x):
    xf = x.float()
    var, mean = torch.var_mean(xf, -1, correction=0, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def normalise(x, mean, rstd):
    return ((x.float() - mean) * rstd * w.float() + b.float()).to(dt)


def split_by_opaque_stats(x):  # stats in one graph, the normalisation in another
    mean, rstd = compiled["stats"](x)
    return compiled["normalise"](x, mean, rstd)


compiled = {name: torch.compile(fn) for name, fn in (("padded", padded), ("plain", plain), ("decomposed", decomposed),
                                                      ("stats", stats), ("normalise", normalise))}
results = {}
with torch.inference_mode():
    for side, views in ((32, 6), (40, 6), (64, 6), (40, 96)):
        x = (torch.randn(views, side, side, 768, device=dev) * 2 + 0.5).to(dt)
        torch._dynamo.mark_dynamic(x, 0)
        reference = compiled["padded"](x)[:, :side, :side]
        row = {"eager norm = compiled padded norm": torch.equal(plain(x), reference)}
        for name in ("plain", "decomposed"):
            got = compiled[name](x)
            row[name] = torch.equal(got, reference)
            row[name + " ulps differing"] = int((got != reference).sum())
        got = split_by_opaque_stats(x)
        row["stats then normalise, two graphs"] = torch.equal(got, reference)
        results[f"{views} x {side}"] = row
        print(side, views, row, flush=True)
json.dump(results, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/exp_ln.json", "w"), indent=1)
