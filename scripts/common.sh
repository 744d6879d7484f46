# Shared by the stage scripts (sft.sh, dpo.sh, mcmdpo.sh): it assembles the launcher and the flags
# that depend on the host. The training settings are the stage's YAML file (configs/<stage>.yaml, the
# released ones); the trainer reads it first, then the flags below, then the script's arguments, and
# the last value of a flag wins. Every setting here is an environment variable with a working default.
#
# Paths you set (CONFIG, MODEL_PATH, DATA_PATH, IMAGE_FOLDER, OUTPUT_DIR, HOSTFILE, VISION_TOWER,
# PYTHON, and paths in extra arguments) are taken relative to the directory you run the script from;
# the defaults point into the repository.
#
#   CONFIG        the settings file (default configs/<stage>.yaml)
#   EPOCHS LR BATCH_SIZE GRAD_ACCUM  when set: --num_train_epochs, --learning_rate,
#                 --per_device_train_batch_size, --gradient_accumulation_steps (default: the YAML's)
#   NUM_GPUS      processes on this node (default: the GPUs torch sees; on a host without CUDA: 1 CPU process)
#   CUDA_VISIBLE_DEVICES  when set, the GPUs to run on (the first NUM_GPUS of them); NUM_GPUS may not exceed them
#   HOSTFILE      DeepSpeed hostfile for multi-node runs (default: none, one node); with NODE_RANK and
#                 MASTER_ADDR each node starts its own launcher (no ssh: SLURM's srun, see README)
#   MASTER_PORT   rendezvous port (default 29500)
#   ZERO          zero2 | zero3 | zero3_offload, or a DeepSpeed config file (default zero3, as released)
#   PRECISION     bf16 | fp16 | fp32 (default: bf16 with CUDA, fp32 without): --bf16/--fp16, and --tf32 with CUDA
#   PARADIGM      a | b | c | d: when the vision tower trains (docs/method.md#paradigms); default: the
#                 YAML's (d, both stages, as released)
#   SAVE_STEPS    save a checkpoint every SAVE_STEPS optimizer steps, and at each epoch end (default: the YAML's, 500)
#   SAVE_TOTAL_LIMIT  checkpoints kept in OUTPUT_DIR (default: the YAML's, 2)
#   RESUME        auto: continue from the newest complete checkpoint in OUTPUT_DIR, if any (the YAML's);
#                 never: start afresh
#   NAN_POLICY    stop | skip: a step whose loss or gradient is not finite (default: the YAML's, stop)
#   REPORT_TO     wandb | tensorboard | none (default: the YAML's, wandb as released; offline when not logged in)
#   WANDB_PROJECT wandb project (default llava-mcmdpo, set by the trainer); runs are named after OUTPUT_DIR
#   NUM_WORKERS   data loader workers (default 4 with CUDA, 0 without)
#   OMP_NUM_THREADS  threads per process on a host without CUDA (default: cores / NUM_GPUS)
#   PYTHON        interpreter (default: the repository's .venv/bin/python if present, else python3)
#   DRY_RUN       1: print the launch command (shell-quoted) instead of running it

CALLER_DIR=$PWD
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The path variables the caller set, made absolute against the caller's directory. A model, data
# set or tower that does not exist here may be a hub name: it is left as given (the trainer runs in
# the caller's directory, so a relative path that is not a hub name still means the caller's).
CALLER_SET=" "
for _var in CONFIG MODEL_PATH DATA_PATH IMAGE_FOLDER OUTPUT_DIR HOSTFILE VISION_TOWER; do
  _val=${!_var:-}
  [ -n "$_val" ] || continue
  CALLER_SET+="$_var "
  case "$_val" in /*) continue ;; esac
  case "$_var" in
    CONFIG|IMAGE_FOLDER|OUTPUT_DIR|HOSTFILE) printf -v "$_var" '%s' "$CALLER_DIR/$_val" ;;
    *) if [ -e "$CALLER_DIR/$_val" ]; then printf -v "$_var" '%s' "$CALLER_DIR/$_val"; fi ;;
  esac
done
case "${PYTHON:-}" in /*|"") ;; */*) PYTHON="$CALLER_DIR/$PYTHON" ;; esac
unset _var _val

# The stage scripts' defaults below are relative to the repository.
cd "$REPO_ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO_ROOT/.venv/bin/python" ]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
GPU_COUNT=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
case "$GPU_COUNT" in ''|*[!0-9]*) GPU_COUNT=0 ;; esac
if [ "$GPU_COUNT" -gt 0 ]; then HAS_CUDA=1; else HAS_CUDA=0; fi
if [ -z "${NUM_GPUS:-}" ]; then
  if [ "$HAS_CUDA" = 1 ]; then NUM_GPUS=$GPU_COUNT; else NUM_GPUS=1; fi
fi
case "$NUM_GPUS" in ''|*[!0-9]*|0) echo "NUM_GPUS must be a positive number (got $NUM_GPUS)" >&2; exit 2 ;; esac
MASTER_PORT=${MASTER_PORT:-29500}
ZERO=${ZERO:-zero3}
case "${PARADIGM:-d}" in a|b|c|d) ;; *) echo "PARADIGM must be a, b, c or d (got $PARADIGM)" >&2; exit 2 ;; esac
case "${RESUME:-auto}" in auto|never) ;; *) echo "RESUME must be auto or never (got $RESUME)" >&2; exit 2 ;; esac
if [ -z "${PRECISION:-}" ]; then
  if [ "$HAS_CUDA" = 1 ]; then PRECISION=bf16; else PRECISION=fp32; fi
fi
# CPU processes share the cores: more threads than cores makes OpenMP spin in the kernel.
if [ "$HAS_CUDA" != 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(( $(nproc) / NUM_GPUS )); [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
  export OMP_NUM_THREADS
fi
if [ -z "${NUM_WORKERS:-}" ]; then
  if [ "$HAS_CUDA" = 1 ]; then NUM_WORKERS=4; else NUM_WORKERS=0; fi
fi

case "$PRECISION" in
  bf16) PRECISION_FLAGS=(--bf16 True --fp16 False) ;;
  fp16) PRECISION_FLAGS=(--bf16 False --fp16 True) ;;
  fp32) PRECISION_FLAGS=(--bf16 False --fp16 False) ;;
  *) echo "PRECISION must be bf16, fp16 or fp32 (got $PRECISION)" >&2; exit 2 ;;
esac
# TF32 matmuls exist on NVIDIA GPUs only.
if [ "$HAS_CUDA" = 1 ]; then PRECISION_FLAGS+=(--tf32 True); fi

# vit_trains STAGE: does the vision tower train in this stage (sft | align) under $PARADIGM (default d)?
#   (a) frozen, frozen  (b) frozen, trained  (c) trained, frozen  (d) trained, trained
vit_trains() {
  case "${PARADIGM:-d}:$1" in
    a:*|b:sft|c:align) echo False ;;
    b:align|c:sft|d:*) echo True ;;
    *) echo "PARADIGM must be a, b, c or d (got $PARADIGM)" >&2; exit 2 ;;
  esac
}

# caller_set VAR: did the caller set VAR (rather than the stage script's default)?
caller_set() { [[ "$CALLER_SET" == *" $1 "* ]]; }

# require_default_model HINT: stop with one line when MODEL_PATH is the stage's default and absent.
require_default_model() {
  if ! caller_set MODEL_PATH && [ ! -d "$MODEL_PATH" ]; then
    echo "no model at $REPO_ROOT/$MODEL_PATH (the default MODEL_PATH): $1" >&2
    exit 2
  fi
}

# set_flags VAR=--flag ...: STAGE_FLAGS+=(--flag "$VAR") for each VAR that is set, so that it
# overrides the YAML's value; unset, the YAML's stands.
set_flags() {
  local pair
  for pair in "$@"; do
    local var=${pair%%=*}
    if [ -n "${!var:-}" ]; then STAGE_FLAGS+=("${pair#*=}" "${!var}"); fi
  done
}

# stage_flags STAGE CONFIG: the settings file (CONFIG unless the caller set another), then the paths
# (MODEL_PATH DATA_PATH IMAGE_FOLDER OUTPUT_DIR VISION_TOWER) and the variables the caller set.
stage_flags() {
  # Defaults are repository paths; the trainer runs in the caller's directory.
  CONFIG=${CONFIG:-$2}
  local var
  for var in CONFIG MODEL_PATH DATA_PATH IMAGE_FOLDER OUTPUT_DIR VISION_TOWER; do
    if ! caller_set "$var" && [ -n "${!var:-}" ] && [[ "${!var}" != /* ]]; then printf -v "$var" '%s' "$REPO_ROOT/${!var}"; fi
  done
  [ -f "$CONFIG" ] || { echo "no settings file $CONFIG (CONFIG)" >&2; exit 2; }
  STAGE_FLAGS=("$CONFIG" --model_name_or_path "$MODEL_PATH" --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER"
               --output_dir "$OUTPUT_DIR")
  if [ -n "${PARADIGM:-}" ]; then STAGE_FLAGS+=(--unfreeze_mm_vision_tower "$(vit_trains "$1")"); fi
  set_flags VISION_TOWER=--vision_tower EPOCHS=--num_train_epochs LR=--learning_rate \
    BATCH_SIZE=--per_device_train_batch_size GRAD_ACCUM=--gradient_accumulation_steps \
    SAVE_STEPS=--save_steps SAVE_TOTAL_LIMIT=--save_total_limit RESUME=--resume_from_checkpoint REPORT_TO=--report_to \
    NAN_POLICY=--nan_policy
}

# launch CONFIG ARGS...: the trainer under DeepSpeed's launcher, one process per GPU (or CPU process),
# run from the caller's directory.
launch() {
  local config
  case "$ZERO" in
    /*.json) config=$ZERO ;;
    *.json) config="$CALLER_DIR/$ZERO" ;;
    *) config="$REPO_ROOT/scripts/${ZERO}.json" ;;
  esac
  [ -f "$config" ] || { echo "no DeepSpeed config $config (ZERO=$ZERO)" >&2; exit 2; }
  local launcher=("$(dirname "$PYTHON")/deepspeed") env=()
  [ -x "${launcher[0]}" ] || launcher=(deepspeed)
  if [ -n "${HOSTFILE:-}" ]; then
    launcher+=(--hostfile "$HOSTFILE")
    if [ -n "${NODE_RANK:-}" ]; then  # each node starts its own launcher (srun): no ssh
      launcher+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?MASTER_ADDR is needed with NODE_RANK}")
    fi
  elif [ "$HAS_CUDA" = 1 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    # DeepSpeed's --num_gpus would take GPUs 0..N-1 whatever the mask says; without it the
    # launcher runs on the GPUs CUDA_VISIBLE_DEVICES lists.
    local visible
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    if [ "$NUM_GPUS" -gt "${#visible[@]}" ]; then
      echo "NUM_GPUS=$NUM_GPUS but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists ${#visible[@]} GPU(s)" >&2; exit 2
    fi
    env=("CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${visible[*]:0:$NUM_GPUS}")")
  elif [ "$HAS_CUDA" = 1 ] && [ "$NUM_GPUS" -gt "$GPU_COUNT" ]; then
    echo "NUM_GPUS=$NUM_GPUS but this host has $GPU_COUNT GPU(s)" >&2; exit 2
  else
    launcher+=(--num_gpus "$NUM_GPUS")
  fi
  # A settings file must come first (the trainer reads it before the flags): it leads STAGE_FLAGS;
  # a caller that builds its own flags (pretrain.sh) passes none.
  local settings=()
  case "${1:-}" in *.yaml|*.yml) settings=("$1"); shift ;; esac
  local cmd=("${launcher[@]}" --master_port "$MASTER_PORT" "$REPO_ROOT/llava/train/train.py" "${settings[@]}"
             --deepspeed "$config" "${PRECISION_FLAGS[@]}" --dataloader_num_workers "$NUM_WORKERS" "$@")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${env[@]}" "${cmd[@]}"; echo
    return 0
  fi
  cd "$CALLER_DIR"
  set -x
  env "${env[@]}" "${cmd[@]}"
  { set +x; } 2>/dev/null
}
