# The demo's stages and their settings, in one place: sourced by demo.sh and ablate.sh, so that the
# ablation's rows start from exactly the checkpoints `make demo` builds. Each function runs one
# stage through the stage script a user runs (pretrain.sh, sft.sh, dpo.sh, mcmdpo.sh).
#
#   demo_size full|smoke   sets MODEL_SIZE TEST_LIMIT MAX_NEW_TOKENS LOG_STEPS, the epochs of stage 1,
#                          SFT and a preference stage (PRETRAIN_EPOCHS SFT_EPOCHS PREF_EPOCHS, unless
#                          the caller set them) and STAGE_EXTRA (flags every stage gets)
#   demo_lm OUT SEED                          the random-weight language model (Vicuna's place)
#   demo_stage1 LM OUT SEED                   stage 1 on the captions, composing LM and VISION_TOWER
#   demo_sft MODEL OUT SEED                   SFT (PARADIGM, if set, decides whether the tower trains)
#   demo_preference dpo|mcmdpo MODEL OUT SEED [flags]   one preference stage (IMAGE_TYPE, CL_REWARD_NUM, PARADIGM)
#   demo_infer MODEL OUT_JSONL TEST_JSONL     greedy inference on the test records
# They read PYTHON, DATA and VISION_TOWER.

# ZeRO-2 as released, but with one all-reduce bucket that holds the whole small model (the released
# file's "auto" bucket is hidden_size^2 gradients: 37K here, some 80 all-reduces a step; see the file).
export NUM_GPUS=${NUM_GPUS:-2} ZERO=${ZERO:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/zero2_demo.json} PRECISION=fp32
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=offline

demo_size() {
  local epochs
  case "$1" in
    full)  MODEL_SIZE=small TEST_LIMIT=200 MAX_NEW_TOKENS=48 LOG_STEPS=5 epochs=(4 5 1) STAGE_EXTRA=() PREF_RECORDS= ;;
    smoke) MODEL_SIZE=tiny TEST_LIMIT=6 MAX_NEW_TOKENS=8 LOG_STEPS=1 epochs=(1 1 1) STAGE_EXTRA=(--max_steps 3) PREF_RECORDS=12 ;;
    *) echo "the demo's size must be full or smoke (got $1)" >&2; exit 2 ;;
  esac
  # full: the random-weight language model learns to read the image tokens only with many passes.
  # Seed 0, SFT key facts (stage-1 + SFT epochs): 1+2 12%, 5+3 36.5%, 3+5 40%, 4+5 50% (README,
  # "What `make demo` shows"). SFT gets the larger share: after 5 stage-1 epochs the captions already
  # state the focus thing's facts for 89% of the test images; SFT has to learn them again under the
  # chat template and the post. 4+5 takes 720 s on 2 cores (README, "Measured now").
  PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-${epochs[0]}} SFT_EPOCHS=${SFT_EPOCHS:-${epochs[1]}} PREF_EPOCHS=${PREF_EPOCHS:-${epochs[2]}}
}

demo_lm() {
  "$PYTHON" -m llava.model.tiny --out "$1" --arch llama --size "$MODEL_SIZE" --seed "$2"
}

# LLaVA's stage-1 settings (scripts/pretrain.sh) but two: a batch of 16, not 256 (2000 captions would
# make 8 steps), and the language model trains too (--tune_mm_mlp_adapter False), because unlike
# Vicuna it starts from random weights and has yet to learn the captions' words. A random-weight
# model learns from scratch here, so the rates are far above the published ones, which are for 7B
# checkpoints.
demo_stage1() {
  MODEL_PATH="$1" VISION_TOWER="$VISION_TOWER" DATA_PATH="$DATA/pretrain.json" OUTPUT_DIR="$2" \
    EPOCHS=$PRETRAIN_EPOCHS LR=1e-3 BATCH_SIZE=8 demo_run pretrain.sh "$3" --tune_mm_mlp_adapter False
}

# The tower trains in SFT as released (paradigm d), but at the released SFT rate (2e-5), not the
# language model's 1e-3, which undoes what it learned: with 1e-3 for all, 36.5% key facts after 3
# SFT epochs; with the tower frozen or at 1e-5, 42.5%.
demo_sft() {
  MODEL_PATH="$1" DATA_PATH="$DATA/sft.json" OUTPUT_DIR="$2" EPOCHS=$SFT_EPOCHS LR=1e-3 BATCH_SIZE=8 \
    demo_run sft.sh "$3" --mm_vision_tower_lr 2e-5
}

# The preference rate (1e-5; 5e-5 and above degenerate) and one epoch for both DPO and MCM-DPO (a
# second MCM-DPO epoch over-optimised) were chosen on a validation split generated with another
# seed (make_sample_data.py --seed 1), never on the test records. The tower trains here too
# (paradigm d), at the released preference rate (5e-7): at the language model's 1e-5, MCM-DPO's
# image terms moved the tower itself and its reading broke (seed 0: key facts 50% after SFT, 22%
# after MCM-DPO, 49.5% after DPO); with the tower at 5e-7 or frozen (paradigm c), 50.5%.
demo_preference() {
  local method=$1 model=$2 out=$3 seed=$4
  shift 4
  MODEL_PATH="$model" DATA_PATH="$(preference_data "$out")" OUTPUT_DIR="$out" EPOCHS=$PREF_EPOCHS LR=1e-5 BATCH_SIZE=4 BETA=0.1 \
    demo_run "$method.sh" "$seed" --mm_vision_tower_lr 5e-7 --lr_scheduler_type constant "$@"
}

# preference_data OUT: the preference records a stage trains on. At smoke size, the first PREF_RECORDS of
# them (3 steps of 4): the cached reference pass scores every record of the set, 500 of which would
# take minutes for 3 steps. The subset is written beside the stage's output directory.
preference_data() {
  if [ -z "${PREF_RECORDS:-}" ]; then echo "$DATA/preference.json"; return; fi
  local subset="${1%/}.preference-$PREF_RECORDS.json"
  case "$subset" in /*) ;; *) subset="$PWD/$subset" ;; esac  # absolute, as the stage script makes a path that exists
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "$subset"; return; fi  # a dry run writes nothing
  mkdir -p "$(dirname "$subset")"
  "$PYTHON" -c 'import json, sys; json.dump(json.load(open(sys.argv[1]))[:int(sys.argv[3])], open(sys.argv[2], "w"))' \
    "$DATA/preference.json" "$subset" "$PREF_RECORDS"
  echo "$subset"
}

# demo_run SCRIPT SEED FLAGS...: one stage script (the caller sets its paths and rates) with what every
# demo stage shares: the sample images, no gradient accumulation, no activation checkpointing (the
# model is small), no checkpoints on the way (the demo keeps only the final model), LOG_STEPS, SEED
# and STAGE_EXTRA.
demo_run() {
  local script=$1 seed=$2
  shift 2
  IMAGE_FOLDER="$DATA" GRAD_ACCUM=1 bash "scripts/$script" "$@" --gradient_checkpointing False --save_strategy no \
    --logging_steps "$LOG_STEPS" --seed "$seed" "${STAGE_EXTRA[@]}"
}

demo_infer() {
  "$PYTHON" mcmdpo_inference.py --model_name "$1" --test_datasets "$3" --image_folder "$DATA" \
    --eval_output "$2" --batch_size 16 --num_beams 1 --max_new_tokens "$MAX_NEW_TOKENS"
}
