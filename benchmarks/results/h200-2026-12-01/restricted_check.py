import sys, time
sys.path.insert(0, ".")
from benchmarks.common import a4_page, default_checkpoint, random_checkpoint
from ocr_service.engine import OCREngine
from ocr_service.presets import build_prompt, resolution
from ocr_service.settings import Settings
checkpoint = random_checkpoint(default_checkpoint("ocr"))
started = time.perf_counter()
engine = OCREngine(checkpoint, Settings.from_env(), ignore_eos=True, resolutions=["Gundam (Recommended)"])
print("restricted load_s", round(time.perf_counter() - started, 1), flush=True)
pages = [a4_page(seed=i) for i in range(16)]
preset = engine.resolution("Gundam (Recommended)")
engine.run_pages(pages[:2], build_prompt("Convert to Markdown"), preset, 4)
started = time.perf_counter()
results = engine.run_pages(pages, build_prompt("Convert to Markdown"), preset, 256)
print("16 pages x 256 tokens s", round(time.perf_counter() - started, 2), sum(len(r.token_ids) for r in results), flush=True)
try:
    engine.resolution("Tiny")
except Exception as error:
    print("refused:", error)
