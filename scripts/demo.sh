#!/usr/bin/env bash
# `make demo`: the main job end to end, on the bundled sample data, with the embedded tiny model.
#
#   build the tiny model -> check the data -> SFT -> DPO and MCM-DPO from the SFT checkpoint
#   (DeepSpeed, 2 CPU processes) -> inference on the test records -> scores, HTML report, curves
#
# DEMO_SIZE=full (default; under 15 minutes on 2 CPU cores) or smoke (a few steps, for CI).
# Everything lands under $OUT (default outputs/demo). Settings are the variables below.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-.venv/bin/python}
DEMO_SIZE=${DEMO_SIZE:-full}
OUT=${OUT:-outputs/demo}
DATA=${DATA:-data/sample}
SEED=${SEED:-0}  # seeds the tiny model's weights, training order and negatives
export NUM_GPUS=${NUM_GPUS:-2} ZERO=${ZERO:-zero2} REPORT_TO=${REPORT_TO:-tensorboard} PRECISION=fp32
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=offline

EXTRA=()  # extra trainer flags
case "$DEMO_SIZE" in
  full)  MODEL_SIZE=small SFT_EPOCHS=2 PREF_EPOCHS=1 TEST_LIMIT=200 MAX_NEW_TOKENS=48 LOG_STEPS=5 ;;
  smoke) MODEL_SIZE=tiny  SFT_EPOCHS=1 PREF_EPOCHS=1 TEST_LIMIT=6   MAX_NEW_TOKENS=8  LOG_STEPS=1 EXTRA=(--max_steps 3) ;;
  *) echo "DEMO_SIZE must be full or smoke (got $DEMO_SIZE)" >&2; exit 2 ;;
esac

start=$(date +%s)
step() { printf '\n==> [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
mkdir -p "$OUT"

step "1/7 building the embedded tiny model ($MODEL_SIZE) in $OUT/base"
"$PYTHON" -m llava.model.tiny --out "$OUT/base" --arch llava --size "$MODEL_SIZE" --seed "$SEED"

step "2/7 checking the sample data in $DATA"
"$PYTHON" -m llava.data.check "$DATA/sft.json" --image_folder "$DATA" --task sft | tail -n 2
"$PYTHON" -m llava.data.check "$DATA/preference.json" --image_folder "$DATA" --task preference | tail -n 2
"$PYTHON" -m llava.data.check "$DATA/test.jsonl" --image_folder "$DATA" --task test | tail -n 2
head -n "$TEST_LIMIT" "$DATA/test.jsonl" > "$OUT/test.jsonl"

# A random-weight model learns from scratch here, so the learning rates are far above the
# published ones (2e-5 SFT, 5e-7 preference), which are for 7B checkpoints. The preference rate
# (1e-5; 5e-5 and above degenerate) and one epoch for both DPO and MCM-DPO (a second MCM-DPO
# epoch over-optimised) were chosen on a validation split generated with another seed
# (make_sample_data.py --seed 1), never on the test records.
step "3/7 SFT ($SFT_EPOCHS epochs) -> $OUT/sft"
MODEL_PATH="$OUT/base" DATA_PATH="$DATA/sft.json" IMAGE_FOLDER="$DATA" OUTPUT_DIR="$OUT/sft" \
  EPOCHS=$SFT_EPOCHS LR=1e-3 BATCH_SIZE=8 GRAD_ACCUM=1 \
  bash scripts/sft.sh --gradient_checkpointing False --save_strategy no --logging_steps "$LOG_STEPS" --seed "$SEED" "${EXTRA[@]}"

for method in dpo mcmdpo; do
  step "$([ $method = dpo ] && echo 4/7 DPO || echo 5/7 MCM-DPO) from the SFT checkpoint -> $OUT/$method"
  MODEL_PATH="$OUT/sft" DATA_PATH="$DATA/preference.json" IMAGE_FOLDER="$DATA" OUTPUT_DIR="$OUT/$method" \
    EPOCHS=$PREF_EPOCHS LR=1e-5 BATCH_SIZE=4 GRAD_ACCUM=1 BETA=0.1 \
    bash "scripts/$method.sh" --gradient_checkpointing False --save_strategy no --logging_steps "$LOG_STEPS" \
    --lr_scheduler_type constant --seed "$SEED" "${EXTRA[@]}"
done

step "6/7 inference on $TEST_LIMIT test records"
mkdir -p "$OUT/eval"
for method in sft dpo mcmdpo; do
  "$PYTHON" mcmdpo_inference.py --model_name "$OUT/$method" --test_datasets "$OUT/test.jsonl" --image_folder "$DATA" \
    --eval_output "$OUT/eval/$method.jsonl" --batch_size 16 --num_beams 1 --max_new_tokens "$MAX_NEW_TOKENS"
done

step "7/7 scores, report and training curves"
"$PYTHON" get_score.py --file "$OUT/eval/sft.jsonl" "$OUT/eval/dpo.jsonl" "$OUT/eval/mcmdpo.jsonl" --out_dir "$OUT" > /dev/null
"$PYTHON" -m llava.eval.grounding "$OUT/eval/sft.jsonl" "$OUT/eval/dpo.jsonl" "$OUT/eval/mcmdpo.jsonl" \
  --json "$OUT/grounding.json" > "$OUT/grounding.md"
"$PYTHON" -m llava.eval.report --files "$OUT/eval/sft.jsonl" "$OUT/eval/dpo.jsonl" "$OUT/eval/mcmdpo.jsonl" \
  --names SFT DPO MCM-DPO --image_folder "$DATA" --out "$OUT/report.html"
"$PYTHON" -m llava.eval.curves --runs SFT="$OUT/sft" DPO="$OUT/dpo" MCM-DPO="$OUT/mcmdpo" --out "$OUT/curves.png"

step "done in $(( $(date +%s) - start )) s"
echo
cat "$OUT/scores.md"
echo
cat "$OUT/grounding.md"
echo
echo "report: $OUT/report.html"
echo "curves: $OUT/curves.png"
