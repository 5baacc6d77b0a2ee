"""Device exploration 3: the grid kernel at HEAD~ (old_tra.py) against the working tree's, same inputs."""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.getcwd())
import torch
import old_tra
from checkpoints.triton_relative_attention import relative_attention, table_terms

dev = "cuda"
torch.manual_seed(0)


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


results = {}
for label, views, side in (("640 tiles", 96, 40), ("1024 views", 16, 64), ("1280 views", 16, 80), ("OCR2 768 tiles", 96, 48), ("OCR2 1024 views", 16, 64)):
    qkv = torch.randn(views, side * side, 3, 12, 64, device=dev, dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    rel_h = (torch.randn(2 * side - 1, 64, device=dev) * 0.1).to(torch.bfloat16)
    rel_w = (torch.randn(2 * side - 1, 64, device=dev) * 0.1).to(torch.bfloat16)
    rows, cols = table_terms(q, rel_h, rel_w, side, side)
    row = {}
    old = old_tra.relative_attention(q, k, v, rows, cols, side, side)
    new = relative_attention(q, k, v, rows, cols, side, side)
    row["same bits"] = bool(torch.equal(old, new))
    row["max diff"] = (old.float() - new.float()).abs().max().item()
    for _ in range(2):
        row.setdefault("old ms", []).extend(timed(lambda: old_tra.relative_attention(q, k, v, rows, cols, side, side)))
        row.setdefault("new ms", []).extend(timed(lambda: relative_attention(q, k, v, rows, cols, side, side)))
    results[label] = row
    print(label, json.dumps(row), flush=True)
json.dump(results, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp_timing3.json"), "w"), indent=1)
