#!/usr/bin/env bash
# The paper's comparison of SFT, DPO and MCM-DPO at small scale (which way it comes out is measured, not
# assumed): the demo pipeline over 3 seeds, then a table of mean and spread (BLEU-4, METEOR, ROUGE-L,
# CIDEr, key facts stated, context reflected), the per-term margins at the end of MCM-DPO per seed,
# and a bar chart. One seed takes what `make demo` takes (720 s measured on 2 CPU cores).
#
#   bash scripts/reproduce_small.sh            # seeds 0 1 2 into outputs/repro, one after another
#   PARALLEL=1 bash scripts/reproduce_small.sh # the seeds side by side (each on its own port; each
#                                              # seed's log in $OUT/seedN.log)
#   SEEDS="0 1 2 3 4" OUT=outputs/repro5 bash scripts/reproduce_small.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
OUT=${OUT:-outputs/repro}
PNG=${PNG:-images/reproduction.png}
PARALLEL=${PARALLEL:-0}

start=$(date +%s)
mkdir -p "$OUT"
runs=() pids=()
for seed in $SEEDS; do
  run=(env SEED="$seed" OUT="$OUT/seed$seed" DEMO_SIZE=full PYTHON="$PYTHON" MASTER_PORT=$(( 29611 + seed )) bash scripts/demo.sh)
  runs+=("$OUT/seed$seed")
  if [ "$PARALLEL" = 1 ]; then
    echo "==> seed $seed (log: $OUT/seed$seed.log)"
    "${run[@]}" > "$OUT/seed$seed.log" 2>&1 &
    pids+=($!)
  else
    echo "==> seed $seed"
    "${run[@]}"
  fi
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "seed run ${runs[$i]} failed; see ${runs[$i]}.log" >&2; exit 1; }
done
"$PYTHON" scripts/summarize_runs.py "${runs[@]}" --md "$OUT/table.md" --png "$PNG" --margins_md "$OUT/margins.md"
echo "wall time: $(( $(date +%s) - start )) s for seeds: $SEEDS (parallel: $PARALLEL)"
echo "table: $OUT/table.md   margins: $OUT/margins.md   chart: $PNG"
