#!/usr/bin/env bash
# All GPU measurements in one go, figures under $OUT. Run from the repository root on a CUDA machine
# with torch, transformers and timm installed (no install needed: PYTHONPATH=src):
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh
# STAGES picks which of these run (in the order of this file); each has its own time limit (seconds):
#   extra     model only, ViT-L/14, bf16, batch 256: the HF baselines, the itae paths compiled, and the
#             further ways to run the ITAE path (cuDNN attention first, FP8 matrix products),
#             plus where each one's time goes (kernel kinds, longest kernels)               EXTRA_S
#   check     correctness of both ITAE paths against a float64 replay, and what fp8 changes  CHECK_S
#   autotune  slow compiles: max-autotune GEMM templates, and the whole forward as one graph AUTOTUNE_S
#   photos    end to end from 12,000 1024x768 JPEGs, full and reduced-scale decoding       PHOTOS_S
#   engine    model only, the variants of the first published runs                         ENGINE_S
#   pipeline  end to end from 16,000 generated 256-px JPEGs                                PIPE_S
# Default: "extra check" (estimated 4-6 minutes, not yet timed); the rest as separate calls.
set -u
OUT=${OUT:-gpu-results}
STAGES=${STAGES:-extra check}
mkdir -p "$OUT"
export PYTHONPATH=src:benchmarks
# MODEL_ARGS / CHECK_ARGS override the model-only settings, e.g. for a quick smoke test on a CPU:
#   MODEL_ARGS="--device cpu --size s --batch 2 --resolution 112 --dtype bf16" CHECK_ARGS="--device cpu --size s --batch 2"
read -r -a L <<< "${MODEL_ARGS:---device cuda --size l --batch 256 --dtype bf16}"
read -r -a C <<< "${CHECK_ARGS:---device cuda --size l}"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
has() { [[ " $STAGES " == *" $1 "* ]]; }
show() { echo "$1 rc=$2"; grep -v -i -e warn -e USDT "$OUT/$1.txt" | tail -"$3"; }
if has engine; then
  timeout "${ENGINE_S:-180}" python3 benchmarks/bench_engine.py "${L[@]}" --compile --repeats 10 --warmup 3 \
    --variants hf-sdpa-autocast,hf-sdpa,fast,fast-itae --json "$OUT/engine.json" > "$OUT/engine.txt" 2>&1
  show engine $? 16
fi
if has extra; then
  timeout "${EXTRA_S:-300}" python3 benchmarks/bench_engine.py "${L[@]}" --compile --repeats 8 --warmup 3 \
    --variants hf-sdpa-autocast,hf-sdpa --extra cudnn,fp8 \
    --profile fast-itae-compiled,fast-itae-cudnn,fast-itae-cudnn-compiled,fast-itae-fp8-compiled \
    --json "$OUT/extra.json" > "$OUT/extra.txt" 2>&1
  show extra $? 60
fi
if has check; then
  timeout "${CHECK_S:-120}" python3 benchmarks/gpu_check.py "${C[@]}" > "$OUT/check.txt" 2>&1
  show check $? 9
fi
if has autotune; then
  timeout "${AUTOTUNE_S:-420}" python3 benchmarks/bench_engine.py "${L[@]}" --compile --repeats 8 --warmup 3 \
    --variants hf-sdpa --extra autotune,whole --profile fast-itae-autotune-compiled,fast-itae-whole-compiled \
    --json "$OUT/autotune.json" > "$OUT/autotune.txt" 2>&1
  show autotune $? 16
fi
if has pipeline; then
  timeout "${PIPE_S:-150}" python3 benchmarks/bench_pipeline.py --generate 16000 --side 256 --size l --device cuda \
    --precision bf16 --batch 256 --workers 15 --compile --modes itae,baseline --json "$OUT/pipeline.json" \
    > "$OUT/pipeline.txt" 2>&1
  show pipeline $? 8
fi
if has photos; then
  for decode in full fast; do
    flag=(); [[ $decode == fast ]] && flag=(--fast-decode)
    timeout "${PHOTOS_S:-150}" python3 benchmarks/bench_pipeline.py --generate 12000 --side 1024x768 --size l \
      --device cuda --precision bf16 --batch 256 --workers 15 --compile --modes itae "${flag[@]}" \
      --json "$OUT/photos-$decode.json" > "$OUT/photos-$decode.txt" 2>&1
    show "photos-$decode" $? 4
  done
fi
