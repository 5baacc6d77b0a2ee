#!/usr/bin/env bash
# Run benchmarks on the GPU machine in one go: install the carried wheels (none can be downloaded
# there), then each named step, its log and JSON under $OUT (or /tmp/bench-out).
#   .whl/ours  transformers 5.23.0 (what requirements.txt pins; the machine has another)
#   .whl/orig  transformers 4.46.3, tokenizers 0.20.3, huggingface_hub 0.26.5, addict, easydict, einops:
#              the original code's stack, used in a subprocess only
#   .bench/orig  the original remote-code .py files (fetched outside the repository, never committed)
#   .bench/orig2 the same for DeepSeek-OCR 2
#   .whl/ray*  for bulk-ray: ray 2.60.0 (cp312) and the needs the machine lacks (jsonschema,
#              jsonschema-specifications, referencing, rpds-py); the ray wheel is larger than one call
#              carries, so it may travel split (split -b 40M RAY.whl .whl/ray-a/RAY.whl.part-, the rest in
#              .whl/ray-b/, one folder a call: ignored files stay on a warm machine); parts are joined here
# Steps: kernels (bench_kernels' default ops, weighted_sum among them), weighted-sum (that op alone),
# grouping (the experts' grouping by expert, one program against parallel),
# vision, engine (ENGINE_ARGS: more of bench_engine.py's options, e.g. "--skip priority-trial exactness" to fit one
# 600 s call with the original), timeline (the jobs, trials of the serving loop's choices named in TRIALS (default:
# vision-towers-called no-launch-turn; bench_engine.py --help lists them), and a window of the 256-page
# job under the profiler: GPU time by stream and stage, benchmarks/timeline.py), engine-rows256 (engine with 256 rows and a 110 GiB budget: its jobs and a 256-row step), engine-steps, service, numerics, stages, tests, bulk (one GPU), bulk-ray (2 GPUs);
# agreement-trees (the greedy agreement of earlier trees, TREES, beside this one's: agreement_across_trees.py);
# engine-ocr2 and numerics-ocr2 run engine and numerics on DeepSeek-OCR 2; jobs runs the 128-page job of
# each model; vision-ocr2 runs vision on DeepSeek-OCR 2 (kernel tables of its vision pass and prefill under
# $OUT/ocr2), then page-cost; page-cost counts one page's work for both models (CPU only, seconds).
#   bash benchmarks/device.sh kernels engine-steps
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl/ours ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/oursite .whl/ours/*.whl && export PYTHONPATH=/tmp/oursite
fi
if [ -d .whl/orig ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/origsite .whl/orig/*.whl
fi
ORIGINAL=(--original .bench/orig --original-site /tmp/origsite)
ORIGINAL2=(--original .bench/orig2 --original-site /tmp/origsite)
install_ray() {
  mkdir -p /tmp/raywheels
  for first in $(ls .whl/ray*/*.whl.part-aa 2>/dev/null); do
    name=$(basename "$first" .part-aa)
    cat $(for part in .whl/ray*/"$name".part-*; do echo "${part##*.part-} $part"; done | sort | cut -d' ' -f2) \
      > "/tmp/raywheels/$name"
  done
  cp .whl/ray*/*.whl /tmp/raywheels/ 2>/dev/null
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/raysite /tmp/raywheels/*.whl &&
    export PYTHONPATH=/tmp/raysite${PYTHONPATH:+:$PYTHONPATH}
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# the host's cores: whether its CPUs are hyperthreads of fewer cores (what the bulk run's renderers compete for)
lscpu 2>/dev/null | grep -E "^(Model name|Socket\(s\)|Core\(s\) per socket|Thread\(s\) per core|CPU\(s\)):" | tee -a "$OUT/gpu.txt"
for step in "$@"; do
  echo "=== $step ($(date +%T))"
  case "$step" in
    kernels) python3 benchmarks/bench_kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" ;;
    grouping) python3 benchmarks/bench_kernels.py --ops grouping --json "$OUT/grouping.json" 2>&1 | tee "$OUT/grouping.log" ;;
    weighted-sum) python3 benchmarks/bench_kernels.py --ops weighted_sum --json "$OUT/weighted-sum.json" 2>&1 | tee "$OUT/weighted-sum.log" ;;
    vision) python3 benchmarks/bench_vision.py --profile "$OUT" --json "$OUT/vision.json" 2>&1 | tee "$OUT/vision.log" ;;
    engine) python3 benchmarks/bench_engine.py "${ORIGINAL[@]}" ${ENGINE_ARGS:-} --profile "$OUT" --json "$OUT/engine.json" 2>&1 | tee "$OUT/engine.log" ;;
    engine-rows256) DEEPSEEK_OCR_GPU_MEMORY_GIB=110 python3 benchmarks/bench_engine.py "${ORIGINAL[@]}" --batches 32 64 128 256 --profile "$OUT" --json "$OUT/engine-rows256.json" 2>&1 | tee "$OUT/engine-rows256.log" ;;
    timeline) python3 benchmarks/bench_engine.py --skip steps priority-trial --trial ${TRIALS:-vision-towers-called no-launch-turn} --timeline "$OUT" --json "$OUT/timeline.json" 2>&1 | tee "$OUT/timeline.log" ;;
    engine-steps) python3 benchmarks/bench_engine.py --skip job --profile "$OUT" --json "$OUT/engine-steps.json" 2>&1 | tee "$OUT/engine-steps.log" ;;
    service) python3 benchmarks/bench_service.py --json "$OUT/service.json" 2>&1 | tee "$OUT/service.log" ;;
    # 16 pages a preset with the original takes 390 s at 8 greedy tokens (h200-2026-12-02 call 3): within one call
    numerics) python3 benchmarks/bench_numerics.py "${ORIGINAL[@]}" --tokens 8 --json "$OUT/numerics.json" 2>&1 | tee "$OUT/numerics.log" ;;
    engine-ocr2) python3 benchmarks/bench_engine.py --model ocr2 "${ORIGINAL2[@]}" --profile "$OUT/ocr2" --json "$OUT/engine-ocr2.json" 2>&1 | tee "$OUT/engine-ocr2.log" ;;
    jobs) for model in ocr ocr2; do  # both models' 128-page job in one run (their pages/s side by side)
            python3 benchmarks/bench_engine.py --model $model --skip steps agreement priority-trial --job-pages 128 --json "$OUT/job-$model.json" 2>&1 | tee "$OUT/job-$model.log"
          done ;;
    vision-ocr2) python3 benchmarks/bench_vision.py --model ocr2 --profile "$OUT/ocr2" --json "$OUT/vision-ocr2.json" 2>&1 | tee "$OUT/vision-ocr2.log"
      python3 benchmarks/page_cost.py --json "$OUT/page-cost.json" 2>&1 | tee "$OUT/page-cost.log" ;;
    page-cost) python3 benchmarks/page_cost.py --json "$OUT/page-cost.json" 2>&1 | tee "$OUT/page-cost.log" ;;
    numerics-ocr2) python3 benchmarks/bench_numerics.py --model ocr2 "${ORIGINAL2[@]}" --tokens 8 --json "$OUT/numerics-ocr2.json" 2>&1 | tee "$OUT/numerics-ocr2.log" ;;
    stages) python3 benchmarks/numerics_stages.py "${ORIGINAL[@]}" --json "$OUT/stages.json" 2>&1 | tee "$OUT/stages.log" ;;
    bulk) python3 benchmarks/bench_bulk.py ${BULK_ARGS:-} --json "$OUT/bulk.json" 2>&1 | tee "$OUT/bulk.log" ;;
    bulk-ray) install_ray; python3 benchmarks/bench_bulk.py --ray --gpus 2 --json "$OUT/bulk-ray.json" 2>&1 | tee "$OUT/bulk-ray.log" ;;
    # the greedy agreement of each carried earlier tree (TREES: folders from `git archive`, e.g. .bench/at-935e07e)
    # and of this one, measured alike, their token streams set against each other
    agreement-trees) python3 -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from benchmarks.common import random_checkpoint; random_checkpoint(Path('/tmp/bench-checkpoint'))"
      for tree in ${TREES:-} .; do
        name=$(basename "$(cd "$tree" && pwd)"); [ "$tree" = . ] && name=served
        python3 benchmarks/agreement_across_trees.py run "$tree" "$OUT/agreement-$name.json" 2>&1 | tee "$OUT/agreement-$name.log"
      done
      python3 benchmarks/agreement_across_trees.py compare "$OUT"/agreement-*.json 2>&1 | tee "$OUT/agreement-trees.md" ;;
    tests) python3 -m pytest -q -x tests/test_triton_kernels.py tests/test_prefill_graphs.py tests/test_generation.py tests/test_loop_stop.py tests/test_vision_graphs.py tests/test_deepencoder.py tests/test_modeling_deepseekv2.py 2>&1 | tee "$OUT/tests.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
