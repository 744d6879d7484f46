#!/usr/bin/env bash
# The GPU path end to end on ONE GPU, aimed at under 5 minutes: a ~1.1B-parameter random LLaVA built
# locally (the step benchmark's gpu1b model: Llama 2048 wide x 16 layers, vocabulary 32000; CLIP tower
# 336 px / patch 14 = 576 image tokens, 1024 wide x 12 layers; nothing is downloaded), then
#   SFT (ZeRO-2) -> MCM-DPO with the cached reference under ZeRO-2 and under ZeRO-3 (bf16, a few steps
#   each) -> inference with the ZeRO-3 model on a few test records -> scores,
# through the shipped scripts (sft.sh, mcmdpo.sh, mcmdpo_inference.py, get_score.py) on data/sample.
# Prints one line per stage, "PASS <stage> ..." or "FAIL <stage> <why>", and exits 1 if any failed.
#
#   bash scripts/gpu_smoke.sh                       # work files and logs in outputs/gpu_smoke
#   SMOKE_DIR=/scratch/smoke bash scripts/gpu_smoke.sh
#   GPU_SMOKE_DRY=1 bash scripts/gpu_smoke.sh       # no GPU needed: prints each stage's command, runs nothing
#
# Settings: SMOKE_DIR (work directory), STEPS (optimizer steps per training stage, default 4),
# TEST_RECORDS (inference records, default 8), SMOKE_BUDGET_S (the time the run should fit in, default
# 300), SMOKE_METRICS (get_score.py --metrics: coco, published or all, the default), PYTHON, CUDA_VISIBLE_DEVICES (the first visible GPU is used). Each stage's output is in
# $SMOKE_DIR/logs/<stage>.log.
set -uo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER_DIR=$PWD
case "${PYTHON:-}" in /*|"") ;; */*) PYTHON="$CALLER_DIR/$PYTHON" ;; esac
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO_ROOT/.venv/bin/python" ]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
WORK=${SMOKE_DIR:-$REPO_ROOT/outputs/gpu_smoke}
case "$WORK" in /*) ;; *) WORK="$CALLER_DIR/$WORK" ;; esac
STEPS=${STEPS:-4}
TEST_RECORDS=${TEST_RECORDS:-8}
BUDGET=${SMOKE_BUDGET_S:-300}
DRY=${GPU_SMOKE_DRY:-0}
DATA="$REPO_ROOT/data/sample"
export PYTHON HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NUM_GPUS=1 PRECISION=bf16 REPORT_TO=none RESUME=never
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The trainer flags of every training stage: a few steps, no checkpoints (the final model is saved).
TRAIN_FLAGS=(--max_steps "$STEPS" --save_strategy no --save_at_epoch_end False --logging_steps 1 --seed 0)
SFT_ENV=(MODEL_PATH="$WORK/base" DATA_PATH="$WORK/sft.json" IMAGE_FOLDER="$DATA" OUTPUT_DIR="$WORK/sft"
         ZERO=zero2 BATCH_SIZE=4 GRAD_ACCUM=1 LR=1e-5)
mcmdpo_env() {  # mcmdpo_env ZERO
  MCMDPO_ENV=(MODEL_PATH="$WORK/sft" DATA_PATH="$WORK/preference.json" IMAGE_FOLDER="$DATA"
              OUTPUT_DIR="$WORK/mcmdpo_$1" ZERO="$1" BATCH_SIZE=2 GRAD_ACCUM=1 LR=1e-6)
}
INFER=("$PYTHON" "$REPO_ROOT/mcmdpo_inference.py" --model_name "$WORK/mcmdpo_zero3" --test_datasets "$WORK/test.jsonl"
       --image_folder "$DATA" --eval_output "$WORK/eval/mcmdpo_zero3.jsonl" --batch_size "$TEST_RECORDS" --num_beams 1
       --max_new_tokens 16 --overwrite --no_progress)
SCORE=("$PYTHON" "$REPO_ROOT/get_score.py" --file "$WORK/eval/mcmdpo_zero3.jsonl" --out_dir "$WORK/scores"
       --metrics "${SMOKE_METRICS:-all}")
# The benchmark's builder (benchmarks/bench_step.py: write_checkpoint, preset gpu1b), created on the GPU in bf16.
BUILD=("$PYTHON" -c "import sys, torch; sys.path.insert(0, '$REPO_ROOT/benchmarks'); from pathlib import Path; \
from bench_step import PRESETS, write_checkpoint; \
facts = write_checkpoint(Path(sys.argv[1]), PRESETS['gpu1b'], 0, 'cuda', torch.bfloat16); \
print(f\"{facts['params']['total'] / 1e9:.2f}B parameters\")" "$WORK/base")

if [ "$DRY" = 1 ]; then
  echo "DRY build: $(printf '%q ' "${BUILD[@]}")"
  echo "DRY sft: $(env "${SFT_ENV[@]}" DRY_RUN=1 bash "$REPO_ROOT/scripts/sft.sh" "${TRAIN_FLAGS[@]}")"
  for zero in zero2 zero3; do
    mcmdpo_env "$zero"
    echo "DRY mcmdpo_$zero: $(env "${MCMDPO_ENV[@]}" DRY_RUN=1 bash "$REPO_ROOT/scripts/mcmdpo.sh" "${TRAIN_FLAGS[@]}")"
  done
  echo "DRY inference: $(printf '%q ' "${INFER[@]}")"
  echo "DRY scores: $(printf '%q ' "${SCORE[@]}")"
  exit 0
fi

mkdir -p "$WORK/logs" "$WORK/eval"
rm -rf "$WORK/base" "$WORK/sft" "$WORK/mcmdpo_zero2" "$WORK/mcmdpo_zero3" "$WORK/eval"/* "$WORK/scores"
START=$(date +%s)
FAILED=()
declare -A OK

# stage NAME CHECK COMMAND...: run COMMAND (output in logs/NAME.log), then CHECK (a shell function that
# prints what it found, or why the stage failed, and returns non-zero on failure).
stage() {
  local name=$1 check=$2; shift 2
  local log="$WORK/logs/$name.log" t0=$SECONDS found rc why
  "$@" > "$log" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    FAILED+=("$name")
    why=$(grep -E 'error|Error|Exception' "$log" | tail -n 1)
    [ -n "$why" ] || why=$(tail -n 1 "$log")
    echo "FAIL $name exit $rc: $(echo "$why" | cut -c1-300) (log: $log)"
    return 1
  fi
  if ! found=$("$check" 2>&1); then
    FAILED+=("$name")
    echo "FAIL $name $found (log: $log)"
    return 1
  fi
  OK[$name]=1
  echo "PASS $name ($(( SECONDS - t0 )) s) $found"
}
skip() {  # skip NAME NEEDED
  FAILED+=("$1")
  echo "FAIL $1 not run: $2 failed"
}

# check_run STAGE_DIR: the run logged STEPS finite losses and saved a model plain transformers can find.
check_run() {
  "$PYTHON" - "$1" "$STEPS" <<'EOF'
import json, math, sys
from pathlib import Path
out, steps = Path(sys.argv[1]), int(sys.argv[2])
state = out / "trainer_state.json"
if not state.is_file():
    sys.exit(f"no {state}")
losses = [h["loss"] for h in json.loads(state.read_text())["log_history"] if "loss" in h]
if len(losses) != steps or not all(math.isfinite(x) for x in losses):
    sys.exit(f"expected {steps} finite losses, logged {losses}")
if not list(out.glob("*.safetensors")):
    sys.exit(f"no model weights in {out}")
print("losses " + " ".join(f"{x:.4g}" for x in losses))
EOF
}
check_build() { [ -f "$WORK/base/config.json" ] && tail -n 1 "$WORK/logs/build.log" || { echo "no $WORK/base/config.json"; return 1; }; }
check_sft() { check_run "$WORK/sft"; }
check_cached() {  # check_cached ZERO: also the cached reference was written
  check_run "$WORK/mcmdpo_$1" || return 1
  [ -n "$(ls -A "$WORK/mcmdpo_$1/ref_logps" 2>/dev/null)" ] || { echo "no cached reference in $WORK/mcmdpo_$1/ref_logps"; return 1; }
}
check_zero2() { check_cached zero2; }
check_zero3() { check_cached zero3; }
check_inference() {
  "$PYTHON" - "$WORK/eval/mcmdpo_zero3.jsonl" "$TEST_RECORDS" <<'EOF'
import json, sys
lines = [json.loads(x) for x in open(sys.argv[1])]
answered = [x for x in lines if isinstance(x.get("response"), str)]
if len(lines) != int(sys.argv[2]) or len(answered) != len(lines):
    sys.exit(f"{len(lines)} records written, {len(answered)} answered, {sys.argv[2]} expected")
empty = sum(1 for x in answered if not x["response"].strip())
if empty:  # NaN logits decode as an empty answer (a float16 overflow, say): not a pass
    sys.exit(f"{empty} of {len(answered)} answers are empty")
print(f"{len(answered)} records answered, e.g. {answered[0]['response'][:60]!r}")
EOF
}
check_scores() { [ -s "$WORK/scores/scores.json" ] && echo "$WORK/scores/scores.md" || { echo "no $WORK/scores/scores.json"; return 1; }; }
run_sft() { env "${SFT_ENV[@]}" bash "$REPO_ROOT/scripts/sft.sh" "${TRAIN_FLAGS[@]}"; }
run_mcmdpo() { mcmdpo_env "$1"; env "${MCMDPO_ENV[@]}" bash "$REPO_ROOT/scripts/mcmdpo.sh" "${TRAIN_FLAGS[@]}"; }

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "FAIL cuda no CUDA device visible to torch ($PYTHON)"
  exit 1
fi
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES%%,*}  # one GPU
echo "INFO $("$PYTHON" -c "import torch; from llava.model.attention import flash_attn_installed as f
print(torch.cuda.get_device_name(0) + ', torch ' + torch.__version__ + ', flash_attn ' + ('installed: SFT and inference use flash_attention_2' if f() else 'not installed: sdpa everywhere'))")"

# The data: the first records of the bundled sample (images stay in data/sample).
"$PYTHON" - "$DATA" "$WORK" "$TEST_RECORDS" <<'EOF'
import json, sys
from pathlib import Path
data, work, n_test = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
(work / "sft.json").write_text(json.dumps(json.loads((data / "sft.json").read_text())[:64]))
(work / "preference.json").write_text(json.dumps(json.loads((data / "preference.json").read_text())[:16]))
(work / "test.jsonl").write_text("".join((data / "test.jsonl").read_text().splitlines(keepends=True)[:n_test]))
EOF

stage build check_build "${BUILD[@]}"
if [ -n "${OK[build]:-}" ]; then stage sft check_sft run_sft; else skip sft build; fi
if [ -n "${OK[sft]:-}" ]; then
  stage mcmdpo_zero2 check_zero2 run_mcmdpo zero2
  stage mcmdpo_zero3 check_zero3 run_mcmdpo zero3
else
  skip mcmdpo_zero2 sft; skip mcmdpo_zero3 sft
fi
if [ -n "${OK[mcmdpo_zero3]:-}" ]; then stage inference check_inference "${INFER[@]}"; else skip inference mcmdpo_zero3; fi
if [ -n "${OK[inference]:-}" ]; then stage scores check_scores "${SCORE[@]}"; else skip scores inference; fi

TOTAL=$(( $(date +%s) - START ))
if [ "$TOTAL" -le "$BUDGET" ]; then echo "PASS time ${TOTAL} s (budget ${BUDGET} s)"
else FAILED+=(time); echo "FAIL time ${TOTAL} s, over the ${BUDGET} s budget"; fi
if [ "${#FAILED[@]}" -gt 0 ]; then echo "gpu_smoke: ${#FAILED[@]} stage(s) failed: ${FAILED[*]}"; exit 1; fi
echo "gpu_smoke: all stages passed"
