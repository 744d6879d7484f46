#!/usr/bin/env bash
# Small-scale reproduction of SFT < DPO < MCM-DPO: the demo pipeline over 3 seeds, then a table
# of mean and spread (BLEU-4, METEOR, ROUGE-L, CIDEr, key facts stated, context reflected) and a
# bar chart. About 10 minutes per seed on 2 CPU cores.
#
#   bash scripts/reproduce_small.sh            # seeds 0 1 2 into outputs/repro
#   SEEDS="0 1 2 3 4" OUT=outputs/repro5 bash scripts/reproduce_small.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
OUT=${OUT:-outputs/repro}
PNG=${PNG:-images/reproduction.png}

start=$(date +%s)
runs=()
for seed in $SEEDS; do
  echo "==> seed $seed"
  SEED=$seed OUT="$OUT/seed$seed" DEMO_SIZE=full PYTHON="$PYTHON" bash scripts/demo.sh
  runs+=("$OUT/seed$seed")
done
"$PYTHON" scripts/summarize_runs.py "${runs[@]}" --md "$OUT/table.md" --png "$PNG" --margins_md "$OUT/margins.md"
echo "wall time: $(( $(date +%s) - start )) s for seeds: $SEEDS"
echo "table: $OUT/table.md   chart: $PNG"
