#!/usr/bin/env bash
# The step benchmark on one GPU: bf16, a ~1.1B-parameter random LLaVA (Llama 2048 wide x 16 layers, vocabulary
# 32000; CLIP tower 336 px / patch 14 = 576 image tokens, 1024 wide x 12 layers), no network. Same code as the
# CPU run (benchmarks/bench_step.py); prints seconds per step, peak GPU memory, tokens per second (distinct,
# and naive-equivalent) and the fraction of the GPU's peak bf16 matrix throughput (FLOPs ~ 6 x params x
# tokens; --peak_tflops, default 989 = H100 SXM dense bf16). Expect about 3-4 minutes on one H100.
#
#   bash benchmarks/gpu_step.sh                                  # writes benchmarks/gpu_step.json
#   bash benchmarks/gpu_step.sh --peak_tflops 989 --steps 20     # extra flags pass through (last one wins)
#   BENCH_DRY_RUN=1 bash benchmarks/gpu_step.sh                  # no GPU needed: configs and parameter counts only
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

FLAGS=(--device cuda --dtype bf16 --preset gpu1b --steps 10 --warmup 3 --records 4 --memory_steps 2
       --peak_tflops 989 --json benchmarks/gpu_step.json)

if [ "${BENCH_DRY_RUN:-0}" = 1 ]; then
    exec "$PYTHON" benchmarks/bench_step.py "${FLAGS[@]}" --dry_run "$@"
fi
"$PYTHON" -c "import trl" 2>/dev/null \
    || { echo "gpu_step.sh: TRL is not installed: pip install -e '.[bench]' (trl==1.16.0)" >&2; exit 2; }
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_step.sh: no CUDA device visible to torch" >&2; exit 2; }
exec "$PYTHON" benchmarks/bench_step.py "${FLAGS[@]}" "$@"
