"""Exploration: where SAM's windowed block rounds differently with its windows' padding made up in the kernel
than with the grid padded before the qkv projection: the projection's rows (eager, M of each grid), the block
eager, the block compiled as the towers compile it; per view size (Tiny's 32, Small's 40, Base's 64, Large's 80)."""
import json, sys
import torch
import torch.nn.functional as F
sys.path.insert(0, ".")
from checkpoints.deepencoder import SamBlock, pad_to_windows
from ocr_service.vision_compile import _compile_block

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
block = SamBlock(768, 12, 4.0, 14, 64)
with torch.no_grad():
    for name, p in block.named_parameters():
        if "rel_pos" in name:
            p.copy_(torch.randn_like(p) * 0.02)
block = block.to(dev, dt).eval()
block.attn.relative_kernel = True
block.attn.terms_in_kernel = True
block.mlp.gelu_way = "epilogue"
results = {}
with torch.inference_mode():
    for side, views in ((32, 6), (40, 6), (40, 36), (64, 6), (80, 6), (64, 16), (40, 96)):
        x = torch.randn(views, side, side, 768, device=dev, dtype=dt)
        row = {}
        normed = block.norm1(x).to(dt)
        plain = block.attn.qkv(normed)
        padded = block.attn.qkv(pad_to_windows(normed, 14))[:, :side, :side]
        row["qkv rows same bits"] = torch.equal(plain, padded)
        outs = {}
        for mode in (False, True):
            block.attn.padding_in_kernel = mode
            outs[("eager", mode)] = block(x)
        row["block eager same bits"] = torch.equal(outs[("eager", False)], outs[("eager", True)])
        for mode in (False, True):
            fresh = SamBlock(768, 12, 4.0, 14, 64).to(dev, dt).eval()
            fresh.load_state_dict(block.state_dict())
            fresh.attn.relative_kernel, fresh.attn.terms_in_kernel = True, True
            fresh.mlp.gelu_way = "epilogue"
            fresh.attn.padding_in_kernel = mode
            torch._dynamo.reset()
            _compile_block(fresh, "inductor")
            outs[("compiled", mode)] = fresh(x)
            # the norm alone compiled each way (padded then cut back, or not)
        row["block compiled same bits"] = torch.equal(outs[("compiled", False)], outs[("compiled", True)])
        row["compiled vs eager, grid padded"] = torch.equal(outs[("compiled", False)], outs[("eager", False)])
        row["compiled vs eager, padding in kernel"] = torch.equal(outs[("compiled", True)], outs[("eager", True)])
        row["max diff compiled"] = float((outs[("compiled", False)].float() - outs[("compiled", True)].float()).abs().max())
        results[f"{views} views of {side}"] = row
        print(side, views, row, flush=True)
json.dump(results, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/exp_bits.json", "w"), indent=1)
