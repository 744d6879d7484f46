#!/usr/bin/env bash
# DeepSpeed's all-reduce bucket on a small model: the demo's stage 1 (seed 0, 2 CPU processes) for
# STEPS steps under the released scripts/zero2.json (reduce_bucket_size "auto" = hidden_size^2 = 37K
# gradients for the demo's 192-wide model) and under scripts/zero2_demo.json (5e6: one bucket), one
# after the other in one run; prints each run's train_runtime and loss and the ratio.
#
#   bash benchmarks/bench_bucket.sh             # STEPS=100, about 2 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-.venv/bin/python} REPORT_TO=none
STEPS=${STEPS:-100}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
source scripts/demo_stages.sh
demo_size full
DATA=data/sample VISION_TOWER=llava/model/assets/sample_clip STAGE_EXTRA=(--max_steps "$STEPS") LOG_STEPS=$STEPS
demo_lm "$WORK/lm" 0 > /dev/null
declare -A runtime
for zero in scripts/zero2.json scripts/zero2_demo.json; do
  ZERO="$PWD/$zero" demo_stage1 "$WORK/lm" "$WORK/out_$(basename "$zero" .json)" 0 > "$WORK/log" 2>&1 \
    || { tail -n 20 "$WORK/log"; exit 1; }
  runtime[$zero]=$(grep -o "'train_runtime': '[0-9.]*'" "$WORK/log" | grep -o "[0-9.]*")
  echo "$zero: $STEPS steps in ${runtime[$zero]} s, loss at step $STEPS: $(grep -o "'loss': '[0-9.]*'" "$WORK/log" | tail -n 1 | grep -o "[0-9.]*")"
done
echo "ratio (released auto bucket / one bucket): $(python3 -c "print(round(${runtime[scripts/zero2.json]} / ${runtime[scripts/zero2_demo.json]}, 2))")"
