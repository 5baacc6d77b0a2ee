import sys, time, json, torch
from pathlib import Path
sys.path.insert(0, ".")
from benchmarks.common import MODEL_CLASSES, MODEL_PRESETS, PROMPT, a4_page, default_checkpoint, random_checkpoint
from ocr_service.presets import Resolution
from ocr_service.vision import Preprocessor
from ocr_service.vision_compile import compile_vision_towers, uncompile_vision_towers
import torch.nn.functional as F
ck = default_checkpoint("ocr"); random_checkpoint(ck, "full", "ocr")
from transformers import PreTrainedTokenizerFast
model = MODEL_CLASSES["ocr"].from_pretrained(str(ck), dtype=torch.bfloat16).cuda().eval()
tok = PreTrainedTokenizerFast.from_pretrained(str(ck))
pre = Preprocessor(model, tok, 1, torch.bfloat16)
g = Resolution(*MODEL_PRESETS["ocr"]["Gundam"])
ps = [pre._prepare(a4_page(seed=i % 8), PROMPT, g) for i in range(16)]
groups = [torch.cat([p.images[0].global_view[None] for p in ps]).cuda(), torch.cat([p.images[0].tiles for p in ps]).cuda()]
inner = model.model
def run():
    with torch.inference_mode():
        for x in groups: inner.encode_views(x)
def timed():
    run(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(3): run()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / 3 / 16 * 1e3
def table():
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        run(); torch.cuda.synchronize()
    return p.key_averages().table(sort_by="cuda_time_total", row_limit=10)
original_sdpa = F.scaled_dot_product_attention
opaque = torch.compiler.disable(original_sdpa)
for name, cudnn, op in [("eager", False, None), ("compiled cudnn on", True, None), ("compiled cudnn off", False, None), ("compiled cudnn off, sdpa opaque", False, opaque)]:
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    F.scaled_dot_product_attention = op or original_sdpa
    torch._dynamo.reset(); uncompile_vision_towers(model); torch.compiler.set_stance("default")
    rep = {}
    if name != "eager":
        rep = compile_vision_towers(model, sides=[1024, 640])
    ms = timed()
    print(f"=== {name}: {ms:.1f} ms/page", json.dumps(rep), flush=True)
    print(table(), flush=True)
F.scaled_dot_product_attention = original_sdpa
