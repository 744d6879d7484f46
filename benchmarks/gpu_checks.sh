#!/usr/bin/env bash
# Every GPU check of this project in one run on one GPU, each under its own time limit, so that a
# short lease of a GPU machine gives all the figures at once (about 7 minutes on one H200):
#   1. scripts/gpu_smoke.sh          SFT (ZeRO-2) -> MCM-DPO (ZeRO-2, ZeRO-3) -> inference -> scores
#   2. benchmarks/gpu_step.sh        seconds, memory and MFU per optimizer step, against TRL
#   3. benchmarks/bench_infer.py     records per second of inference, float16, against the released loop
# Each part's log and results go to RESULTS (default outputs/gpu_checks): smoke.log, step.log,
# gpu_step.json, infer.log, gpu_infer.json, and gpu.txt (nvidia-smi and the library versions).
#
#   bash benchmarks/gpu_checks.sh                      # all three
#   RESULTS=/scratch/gpu bash benchmarks/gpu_checks.sh
#   SMOKE_S=300 STEP_S=240 INFER_S=120 bash benchmarks/gpu_checks.sh   # each part's time limit (seconds)
#   PEAK_TFLOPS=989 bash benchmarks/gpu_checks.sh      # the GPU's dense bf16 peak for MFU (gpu_step.sh's default: 989)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHON
RESULTS=${RESULTS:-outputs/gpu_checks}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
STATUS=0

{
  if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  else echo "no nvidia-smi on this machine"; fi
  "$PYTHON" -c "import torch, transformers, deepspeed, peft, accelerate
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__,
      '| deepspeed', deepspeed.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)" 2>&1 | tail -n 1
} > "$RESULTS/gpu.txt"
cat "$RESULTS/gpu.txt"

# part NAME LIMIT_S COMMAND...: run it under its limit, its output in NAME.log; one summary line.
part() {
  local name=$1 limit=$2 t0=$SECONDS rc; shift 2
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || STATUS=1
  echo "== $name: exit $rc in $(( SECONDS - t0 )) s (limit $limit s; log $RESULTS/$name.log)"
}

part smoke "${SMOKE_S:-280}" env SMOKE_DIR="$RESULTS/smoke" bash scripts/gpu_smoke.sh
grep -E '^(PASS|FAIL|INFO|time)' "$RESULTS/smoke.log"
part step "${STEP_S:-190}" bash benchmarks/gpu_step.sh --steps 5 --warmup 2 --memory_steps 2 \
  ${PEAK_TFLOPS:+--peak_tflops "$PEAK_TFLOPS"} --json "$RESULTS/gpu_step.json"
tail -n 25 "$RESULTS/step.log"
part infer "${INFER_S:-100}" "$PYTHON" benchmarks/bench_infer.py --device cuda --json "$RESULTS/gpu_infer.json"
tail -n 20 "$RESULTS/infer.log"
exit "$STATUS"
