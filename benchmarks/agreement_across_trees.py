"""Greedy agreement of the batched engine with the plain path, measured the same way on any tree of this
repository (an earlier commit as well as this one), and every page's tokens kept so that paths can be set
against each other afterwards.

`run` measures one tree: its `OCREngine` against the same tree's `generate_tokens`, groups of four A4 pages
(seeds 4g .. 4g+3, Gundam, 64 tokens, EOS ignored, the serving n-gram rule): `bench_engine.py`'s agreement, whose
first group is the measure the issues name ("x/256"). It imports nothing from the tree it does not need, so
that commits from before bench_engine.py's groups run it too. `compare` reads several runs' files and prints,
for every two token streams (each tree's plain path and engine), the tokens they share from the first and
where each page parts: on random weights the paths part at the few tokens where the top logits tie in bf16,
and every two ways of rounding part at some of the same ones.

On the device (the checkpoint bench_engine.py writes; a tree of an earlier commit from `git archive`):
    git archive 935e07e checkpoints ocr_service benchmarks/common.py scripts | tar -x -C .bench/at-935e07e
    python3 benchmarks/agreement_across_trees.py run .bench/at-935e07e $OUT/baseline.json
    DEEPSEEK_OCR_VISION=original python3 benchmarks/agreement_across_trees.py run . $OUT/vision-original.json
    python3 benchmarks/agreement_across_trees.py run . $OUT/served.json
    python3 benchmarks/agreement_across_trees.py compare $OUT/baseline.json $OUT/vision-original.json $OUT/served.json
"""

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

PAGES_A_GROUP, TOKENS = 4, 64


def common_prefix(a: list, b: list) -> int:
    """How many tokens two streams share from the first."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def both_paths(engine, prompt: str, images: list, resolution, tokens: int, rule) -> list:
    """Each image's prompt inputs, the plain path's greedy tokens (`generate_tokens`, a page at a time) and the
    batched engine's (the images in one job), under the n-gram `rule`, EOS ignored: [(inputs, plain, engine)]."""
    batched = engine.run_pages(images, prompt, resolution, tokens)
    model, tokenizer = engine.model, engine.tokenizer
    pages = []
    for image, result in zip(images, batched):
        inputs = model.prepare_inputs(tokenizer, prompt, [image], resolution.base_size, resolution.image_size,
                                      resolution.crop_mode)
        plain, _ = model.generate_tokens(inputs, tokens, repetition=rule, loops=None, eos_token_id=-1)
        pages.append((inputs, plain, list(result.token_ids)))
    return pages


def run(tree: Path, out: Path, groups: int, checkpoint: Path) -> dict:
    sys.path.insert(0, str(tree))  # that tree's packages, whatever this file's own tree holds
    import torch

    from benchmarks.common import PROMPT, a4_page
    from checkpoints.generation import SERVING_NO_REPEAT_RULE
    from ocr_service.engine import OCREngine
    from ocr_service.settings import Settings

    settings = Settings.from_env()
    rows = 128  # what trees before rows_and_budget decoded
    if hasattr(settings, "rows_and_budget"):  # the rows this card gets by default, as bench_engine.py uses
        card = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
        rows, _ = settings.rows_and_budget(card)
    settings = settings.replace(stop_loops=False, max_rows=rows)
    started = time.perf_counter()
    engine = OCREngine(checkpoint, settings, ignore_eos=True)
    print(f"{tree.name}: loaded in {time.perf_counter() - started:.1f} s, {rows} rows", flush=True)
    if hasattr(engine, "resolution"):  # a preset as the loaded model maps it
        gundam = engine.resolution("Gundam (Recommended)")
    else:  # trees from before the second model: the first model's presets
        from ocr_service.presets import RESOLUTION_PRESETS
        gundam = RESOLUTION_PRESETS["Gundam (Recommended)"]
    report = {"tree": str(tree), "settings": {k: v for k, v in os.environ.items() if k.startswith("DEEPSEEK_OCR_")},
              "groups": []}
    for group in range(groups):
        seeds = list(range(PAGES_A_GROUP * group, PAGES_A_GROUP * (group + 1)))
        paths = both_paths(engine, PROMPT, [a4_page(seed=seed) for seed in seeds], gundam, TOKENS,
                           SERVING_NO_REPEAT_RULE)
        pages = [{"seed": seed, "same": common_prefix(plain, tokens), "plain": plain, "engine": tokens}
                 for seed, (_, plain, tokens) in zip(seeds, paths)]
        same = sum(page["same"] for page in pages)
        report["groups"].append({"same": same, "compared": PAGES_A_GROUP * TOKENS, "pages": pages})
        print(f"group {group}: {same}/{PAGES_A_GROUP * TOKENS}, per page {[page['same'] for page in pages]}",
              flush=True)
    out.write_text(json.dumps(report))
    return report


def compare(files: list) -> None:
    """Every two token streams of the runs in `files`: tokens shared over all their pages, and where pages part."""
    streams: dict = {}  # stream name → seed → tokens
    for file in files:
        name = Path(file).stem
        for group in json.loads(Path(file).read_text())["groups"]:
            for page in group["pages"]:
                streams.setdefault(f"{name}: plain", {})[page["seed"]] = page["plain"]
                streams.setdefault(f"{name}: engine", {})[page["seed"]] = page["engine"]
    print("| stream | stream | tokens in common | pages that part (seed: at token) |\n|---|---|---|---|")
    for a, b in itertools.combinations(streams, 2):
        seeds = sorted(set(streams[a]) & set(streams[b]))
        shared = {seed: common_prefix(streams[a][seed], streams[b][seed]) for seed in seeds}
        parted = ", ".join(f"{seed}: {at}" for seed, at in shared.items() if at < TOKENS) or "none"
        print(f"| {a} | {b} | {sum(shared.values())}/{TOKENS * len(seeds)} | {parted} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("run", help="one tree's engine against its plain path")
    measure.add_argument("tree", type=Path, help="a checkout of this repository (any commit)")
    measure.add_argument("out", type=Path, help="JSON of every page's tokens from both paths")
    measure.add_argument("--groups", type=int, default=4)
    measure.add_argument("--checkpoint", type=Path, default=Path("/tmp/bench-checkpoint"),
                         help="the full-size random checkpoint bench_engine.py writes")
    read = commands.add_parser("compare", help="set the token streams of several runs against each other")
    read.add_argument("files", nargs="+")
    args = parser.parse_args()
    if args.command == "run":
        run(args.tree.resolve(), args.out, args.groups, args.checkpoint)
    else:
        compare(args.files)


if __name__ == "__main__":
    main()
