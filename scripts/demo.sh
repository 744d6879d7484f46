#!/usr/bin/env bash
# `make demo`: the main job end to end, on the bundled sample data, as LLaVA is built and trained.
#
#   a tiny language model (random weights; Vicuna's place) + the shipped small CLIP tower, trained
#   on the sample images (scripts/build_vision_tower.py; CLIP ViT-L's place) -> check the data ->
#   stage 1 on captions (scripts/pretrain.sh) -> SFT -> DPO and MCM-DPO from the SFT checkpoint
#   (DeepSpeed, 2 CPU processes) -> inference on the test records -> scores, HTML report, curves
#
# DEMO_SIZE=full (default; 714 s measured on 2 CPU cores, see README) or smoke (a few
# steps, for CI).
# Everything lands under $OUT (default outputs/demo). Settings: the variables below, and every
# stage's in scripts/demo_stages.sh (shared with scripts/ablate.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-.venv/bin/python}
DEMO_SIZE=${DEMO_SIZE:-full}
OUT=${OUT:-outputs/demo}
DATA=${DATA:-data/sample}
SEED=${SEED:-0}  # seeds the language model's and projector's weights, training order and negatives
VISION_TOWER=${VISION_TOWER:-llava/model/assets/sample_clip}
export REPORT_TO=${REPORT_TO:-tensorboard}
source scripts/demo_stages.sh
demo_size "$DEMO_SIZE"

start=$(date +%s)
step() { printf '\n==> [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }
mkdir -p "$OUT"

step "1/8 building the tiny language model ($MODEL_SIZE, random weights) in $OUT/lm; vision tower: $VISION_TOWER"
demo_lm "$OUT/lm" "$SEED"

step "2/8 checking the sample data in $DATA"
"$PYTHON" -m llava.data.check "$DATA/pretrain.json" --image_folder "$DATA" --task sft | tail -n 2
"$PYTHON" -m llava.data.check "$DATA/sft.json" --image_folder "$DATA" --task sft | tail -n 2
"$PYTHON" -m llava.data.check "$DATA/preference.json" --image_folder "$DATA" --task preference | tail -n 2
"$PYTHON" -m llava.data.check "$DATA/test.jsonl" --image_folder "$DATA" --task test | tail -n 2
head -n "$TEST_LIMIT" "$DATA/test.jsonl" > "$OUT/test.jsonl"

# Settings of every stage, and why they differ from the published ones: scripts/demo_stages.sh.
step "3/8 stage 1: captions ($PRETRAIN_EPOCHS epochs), composing the language model and the tower -> $OUT/pretrain"
demo_stage1 "$OUT/lm" "$OUT/pretrain" "$SEED"

step "4/8 SFT ($SFT_EPOCHS epochs) from the stage-1 checkpoint -> $OUT/sft"
demo_sft "$OUT/pretrain" "$OUT/sft" "$SEED"

for method in dpo mcmdpo; do
  step "$([ $method = dpo ] && echo 5/8 DPO || echo 6/8 MCM-DPO) from the SFT checkpoint -> $OUT/$method"
  demo_preference "$method" "$OUT/sft" "$OUT/$method" "$SEED"
done

step "7/8 inference on $TEST_LIMIT test records"
mkdir -p "$OUT/eval"
for method in sft dpo mcmdpo; do demo_infer "$OUT/$method" "$OUT/eval/$method.jsonl" "$OUT/test.jsonl"; done

step "8/8 scores, report and training curves"
"$PYTHON" get_score.py --file "$OUT/eval/sft.jsonl" "$OUT/eval/dpo.jsonl" "$OUT/eval/mcmdpo.jsonl" --out_dir "$OUT" > /dev/null
"$PYTHON" -m llava.eval.grounding "$OUT/eval/sft.jsonl" "$OUT/eval/dpo.jsonl" "$OUT/eval/mcmdpo.jsonl" \
  --json "$OUT/grounding.json" > "$OUT/grounding.md"
"$PYTHON" -m llava.eval.report --files "$OUT/eval/sft.jsonl" "$OUT/eval/dpo.jsonl" "$OUT/eval/mcmdpo.jsonl" \
  --names SFT DPO MCM-DPO --image_folder "$DATA" --scores_dir "$OUT" --out "$OUT/report.html"
"$PYTHON" -m llava.eval.curves --runs stage-1="$OUT/pretrain" SFT="$OUT/sft" DPO="$OUT/dpo" MCM-DPO="$OUT/mcmdpo" --out "$OUT/curves.png"

step "done in $(( $(date +%s) - start )) s"
echo
cat "$OUT/scores.md"
echo
cat "$OUT/grounding.md"
echo
echo "report: $OUT/report.html"
echo "curves: $OUT/curves.png"
