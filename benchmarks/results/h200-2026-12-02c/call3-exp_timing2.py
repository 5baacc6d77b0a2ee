"""Device exploration 2: the line terms for several view·heads a program; the whole-row walk by TMA."""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import variants
import torch
from checkpoints.triton_relative_attention import relative_attention, table_terms
from exp_timing import timed, inputs

results = {}
for label, views, side in (("640 tiles", 96, 40), ("1024 views", 16, 64), ("1280 views", 16, 80), ("OCR2 768 tiles", 96, 48)):
    q, k, v, rel_h, rel_w = inputs(views, side)
    row = {}
    rows, cols = table_terms(q, rel_h, rel_w, side, side)
    row["table_terms ms"] = timed(lambda: table_terms(q, rel_h, rel_w, side, side))
    for group, stages, warps in ((4, 2, 4), (4, 3, 4), (12, 2, 4), (12, 3, 4), (24, 3, 4), (12, 3, 2)):
        name = f"multi g{group} s{stages} w{warps}"
        try:
            r2, c2 = variants.table_terms_multi(q, rel_h, rel_w, side, side, group=group, stages=stages, warps=warps)
            row[name + " same bits"] = bool(torch.equal(rows[..., :side], r2[..., :side]) and torch.equal(cols[..., :side], c2[..., :side]))
            row[name + " ms"] = timed(lambda: variants.table_terms_multi(q, rel_h, rel_w, side, side, group=group, stages=stages, warps=warps))
        except Exception as e:
            row[name] = repr(e)[:300]
    if side == 64:
        ref = relative_attention(q, k, v, rows, cols, side, side)
        row["served row walk ms"] = timed(lambda: relative_attention(q, k, v, rows, cols, side, side))
        for stages in (2, 3, 4):
            for fn, nm in ((variants.row_walk, "tl.range"), (variants.row_walk_tma, "TMA")):
                name = f"{nm} s{stages}"
                try:
                    out = fn(q, k, v, rows, cols, side, side, stages=stages)
                    row[name + " same bits"] = bool(torch.equal(out, ref))
                    row[name + " max diff"] = (out.float() - ref.float()).abs().max().item()
                    row[name + " ms"] = timed(lambda: fn(q, k, v, rows, cols, side, side, stages=stages))
                except Exception as e:
                    row[name] = repr(e)[:300]
    results[label] = row
    print(label, json.dumps(row), flush=True)
    del q, k, v, rows, cols
json.dump(results, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp_timing2.json"), "w"), indent=1)
