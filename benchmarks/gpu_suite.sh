#!/usr/bin/env bash
# All GPU measurements in one go (correctness, model-only, end to end), figures under $OUT.
# Run from the repository root on a CUDA machine with torch, transformers and timm installed:
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=src:benchmarks
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout "${CHECK_S:-60}" python3 benchmarks/gpu_check.py --size l --device cuda > "$OUT/check.txt" 2>&1
echo "check rc=$?"; tail -6 "$OUT/check.txt"
timeout "${ENGINE_S:-180}" python3 benchmarks/bench_engine.py --device cuda --size l --batch 256 --dtype bf16 \
  --compile --repeats 10 --warmup 3 --json "$OUT/engine.json" > "$OUT/engine.txt" 2>&1
echo "engine rc=$?"; grep -v Warning "$OUT/engine.txt" | tail -14
timeout "${PIPE_S:-150}" python3 benchmarks/bench_pipeline.py --generate 16000 --side 256 --size l --device cuda \
  --precision bf16 --batch 256 --workers 15 --compile --modes itae,baseline --json "$OUT/pipeline.json" \
  > "$OUT/pipeline.txt" 2>&1
echo "pipeline rc=$?"; grep -v Warning "$OUT/pipeline.txt" | tail -8
