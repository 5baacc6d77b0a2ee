"""Device exploration: the grid kernel's rectangle terms by a one-hot product, and the terms by raster blocks."""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import variants
import torch
from checkpoints.triton_relative_attention import relative_attention, table_terms

dev = "cuda"
torch.manual_seed(0)
results = {}


def timed(fn, reps=10, rounds=3):
    fn(); torch.cuda.synchronize()
    out = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record(); torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / reps)
    return out


def inputs(views, side, heads=12, d=64):
    qkv = torch.randn(views, side * side, 3, heads, d, device=dev, dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    rel_h = (torch.randn(2 * side - 1, d, device=dev) * 0.1).to(torch.bfloat16)
    rel_w = (torch.randn(2 * side - 1, d, device=dev) * 0.1).to(torch.bfloat16)
    return q, k, v, rel_h, rel_w


for label, views, side in (("640 tiles", 96, 40), ("1280 views", 16, 80), ("OCR2 768 tiles", 96, 48), ("1024 views", 16, 64)):
    q, k, v, rel_h, rel_w = inputs(views, side)
    row = {}
    rows, cols = table_terms(q, rel_h, rel_w, side, side)
    rows2, cols2 = variants.raster_terms(q, rel_h, rel_w, side, side)
    row["terms same bits"] = bool(torch.equal(rows[..., :side], rows2[..., :side]) and torch.equal(cols[..., :side], cols2[..., :side]))
    row["terms max diff"] = max((rows[..., :side].float() - rows2[..., :side].float()).abs().max().item(),
                                (cols[..., :side].float() - cols2[..., :side].float()).abs().max().item())
    row["table_terms ms"] = timed(lambda: table_terms(q, rel_h, rel_w, side, side))
    for block, warps in ((64, 4), (128, 4), (128, 8), (32, 4)):
        try:
            row[f"raster_terms {block}/{warps} ms"] = timed(lambda: variants.raster_terms(q, rel_h, rel_w, side, side, block=block, warps=warps))
        except Exception as e:
            row[f"raster_terms {block}/{warps}"] = repr(e)[:200]
    ref = relative_attention(q, k, v, rows, cols, side, side)
    row["served kernel ms"] = timed(lambda: relative_attention(q, k, v, rows, cols, side, side))
    if side != 64:
        for ahead in (False, True):
            for tiles in ((64, 4, 3), (64, 4, 4), (128, 8, 3), (64, 4, 2)):
                name = f"dot{' ahead' if ahead else ''} {tiles}"
                try:
                    out = variants.grid_attention_dot(q, k, v, rows, cols, side, side, ahead=ahead, tiles=tiles)
                    row[name + " same bits"] = bool(torch.equal(out, ref))
                    row[name + " max diff"] = (out.float() - ref.float()).abs().max().item()
                    row[name + " ms"] = timed(lambda: variants.grid_attention_dot(q, k, v, rows, cols, side, side, ahead=ahead, tiles=tiles))
                except Exception as e:
                    row[name] = repr(e)[:300]
    results[label] = row
    print(label, json.dumps(row), flush=True)
    del q, k, v, rows, cols, rows2, cols2
out = os.environ.get("OUT", "/tmp")
json.dump(results, open(os.path.join(out, "exp_timing.json"), "w"), indent=1)
