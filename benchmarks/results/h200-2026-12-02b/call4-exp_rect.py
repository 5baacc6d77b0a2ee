"""SAM's grid attention over rectangles of keys (640 tiles' 40x40, Large's 80x80, OCR 2's 48x48 grids), the
kernel at HEAD against the one that loads each rectangle's term entries a step ahead: same bits? how fast?"""
import json, sys, os
from pathlib import Path
import torch
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), ".bench/exp"))
import old_relative_attention as old
from checkpoints import triton_relative_attention as new
from benchmarks.ceilings import median_ms

out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp")
heads, d = 12, 64
results = {}
for label, views, side in (("640 tiles, 96 views", 96, 40), ("1280 view, 16 views", 16, 80),
                           ("768 tiles (OCR 2), 96 views", 96, 48), ("1024 views, 16 (whole rows)", 16, 64)):
    g = torch.Generator(device="cuda").manual_seed(0)
    n = side * side
    qkv = torch.randn(views, n, 3, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    rel_h = torch.randn(2 * side - 1, d, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    rel_w = torch.randn(2 * side - 1, d, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    rows, cols = new.table_terms(q, rel_h, rel_w, side, side)
    run_old = lambda: old.relative_attention(q, k, v, rows, cols, side, side)
    run_new = lambda: new.relative_attention(q, k, v, rows, cols, side, side)
    same = torch.equal(run_old(), run_new())
    times = {"old": [], "new": []}
    for _ in range(3):
        times["old"].append(median_ms(run_old, 10))
        times["new"].append(median_ms(run_new, 10))
    flops = 4 * views * heads * n * n * d
    row = {"same_bits": same, "ms": times, "tflops_old": flops / min(times["old"]) / 1e9,
           "tflops_new": flops / min(times["new"]) / 1e9}
    results[label] = row
    print(label, json.dumps(row), flush=True)
(out_dir / "rectangles.json").write_text(json.dumps(results, indent=1))
