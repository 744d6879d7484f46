#!/usr/bin/env bash
# The paper's ablations at the demo's scale, each a row of one table (key facts stated, CIDEr):
#   terms      --use_cl_reward_num 2..7, and each of the seven terms alone (the other weights 0)
#   images     the corrupted image m_l: diffusion, black, crop, rotate, random
#   paradigms  (a)-(d): whether the vision tower trains in SFT and in the preference stage
#   plus plain DPO, for reference.
# One seed (0) for the grid; then seeds 1 and 2 for the default row (all seven terms) and for the
# grid's best row by key facts. Every row starts from the same SFT checkpoint (one per SFT setting
# of the paradigms: tower frozen for a/b, trained for c/d), built by the demo's own stages
# (scripts/demo_stages.sh, seed 0); the seed of a row sets its data order and negatives. The
# preference runs have the demo's settings.
#
#   bash scripts/ablate.sh                  # into outputs/ablate; table.md and ablation.png there
#   BASE_RUN=outputs/demo bash scripts/ablate.sh   # reuse a finished seed-0 demo run's stage-1 and
#                                           # SFT checkpoints (they are the ones the grid would build)
#   ROWS="terms2 only_image" bash scripts/ablate.sh   # a subset of rows
#   ABLATE_SIZE=smoke ROWS="dpo terms2" bash scripts/ablate.sh   # tiny model, 3 steps a stage (tests)
#
# tests/test_ablate.py runs it at smoke size.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-outputs/ablate}
DATA=${DATA:-data/sample}
VISION_TOWER=${VISION_TOWER:-llava/model/assets/sample_clip}
BASE_RUN=${BASE_RUN:-}
export REPORT_TO=${REPORT_TO:-none}
source scripts/demo_stages.sh
demo_size "${ABLATE_SIZE:-full}"
TERM_NAME=(context image response context_response image_response context_image all)

# row_spec NAME: "PARADIGM|SCRIPT|IMAGE_TYPE|TERMS|extra trainer flags"
row_spec() {
  case "$1" in
    dpo) echo "d|dpo|diffusion|7|" ;;
    terms[2-7]) echo "d|mcmdpo|diffusion|${1#terms}|" ;;
    only_*)
      local want=${1#only_}
      [[ " ${TERM_NAME[*]} " == *" $want "* ]] || { echo "unknown term in row $1" >&2; exit 2; }
      # one word without spaces: the flags travel unquoted; the terms left out weigh 0
      echo "d|mcmdpo|diffusion|7|--para_norm 1.0 --term_weights {\"$want\":1.0}" ;;
    image_*) echo "d|mcmdpo|${1#image_}|7|" ;;
    paradigm_[abcd]) echo "${1#paradigm_}|mcmdpo|diffusion|7|" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}
ALL_ROWS="dpo terms2 terms3 terms4 terms5 terms6 terms7 $(printf 'only_%s ' "${TERM_NAME[@]}")"
ALL_ROWS+=" image_diffusion image_black image_crop image_rotate image_random paradigm_a paradigm_b paradigm_c paradigm_d"
ROWS=${ROWS:-$ALL_ROWS}

# sft_for PARADIGM: the shared SFT checkpoint for that paradigm's SFT setting (built once).
sft_for() {
  local tower_trains; case "$1" in a|b) tower_trains=frozen ;; *) tower_trains=trained ;; esac
  # The demo's SFT trains the tower (paradigm d, as released): a seed-0 demo run's is this one.
  if [ -n "$BASE_RUN" ] && [ "$tower_trains" = trained ]; then echo "$BASE_RUN/sft"; return; fi
  local dir="$OUT/base/sft_tower_$tower_trains" stage1="${BASE_RUN:-$OUT/base}/pretrain"
  if [ ! -f "$dir/config.json" ]; then
    if [ ! -f "$stage1/config.json" ]; then
      demo_lm "$OUT/base/lm" 0 >&2
      demo_stage1 "$OUT/base/lm" "$stage1" 0 >&2
    fi
    PARADIGM="$1" demo_sft "$stage1" "$dir" 0 >&2
  fi
  echo "$dir"
}

# run_row NAME SEED: one preference run, its inference, scores and grounding, in $OUT/NAME/seedSEED.
# Rows that name the same run (terms7, image_diffusion and paradigm_d are all the default) run it once:
# the later ones link to the first one's folder.
declare -A RUN_OF_SPEC
run_row() {
  local name=$1 seed=$2 dir="$OUT/$1/seed$2"
  local row; row=$(row_spec "$name")
  local spec="$row|$seed"
  local same=${RUN_OF_SPEC[$spec]:-}
  if [ -z "$same" ]; then RUN_OF_SPEC[$spec]=$dir; fi
  [ -f "$dir/grounding.json" ] && return 0
  if [ -n "$same" ]; then
    echo "==> $name (seed $seed) is the run of $same: linked"
    mkdir -p "$OUT/$name"
    ln -sfn "$(cd "$same" && pwd)" "$dir"
    return 0
  fi
  local paradigm script image terms extra
  IFS='|' read -r paradigm script image terms extra <<< "$row"
  local sft; sft=$(sft_for "$paradigm")
  echo "==> $name (seed $seed, paradigm $paradigm) -> $dir"
  # shellcheck disable=SC2086  # extra holds several flags
  PARADIGM="$paradigm" IMAGE_TYPE="$image" CL_REWARD_NUM="$terms" demo_preference "$script" "$sft" "$dir/model" "$seed" $extra
  mkdir -p "$dir/eval"
  demo_infer "$dir/model" "$dir/eval/$script.jsonl" "$OUT/test.jsonl"
  "$PYTHON" get_score.py --file "$dir/eval/$script.jsonl" --out_dir "$dir" > /dev/null
  "$PYTHON" -m llava.eval.grounding "$dir/eval/$script.jsonl" --json "$dir/grounding.json" > /dev/null
}

start=$(date +%s)
mkdir -p "$OUT"
head -n "$TEST_LIMIT" "$DATA/test.jsonl" > "$OUT/test.jsonl"
for row in $ROWS; do run_row "$row" 0; done
best=$("$PYTHON" scripts/summarize_ablation.py "$OUT" --best)
for row in terms7 "$best"; do for seed in ${RERUN_SEEDS:-1 2}; do run_row "$row" "$seed"; done; done
"$PYTHON" scripts/summarize_ablation.py "$OUT" --md "$OUT/table.md" --png "$OUT/ablation.png"
echo "wall time: $(( $(date +%s) - start )) s; table: $OUT/table.md"
