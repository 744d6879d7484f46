# Shared by the stage scripts (sft.sh, dpo.sh, mcmdpo.sh, pretrain.sh): it turns their environment
# variables into a call of the launcher, `llava-mcmdpo train CONFIG --nproc NUM_GPUS --zero ZERO ...`
# (llava/train/launch.py, which chooses DeepSpeed's launcher for the host, the precision flags and the
# workers, prints the plan and starts the run). The training settings are the stage's YAML file
# (configs/<stage>.yaml, the released ones); the trainer reads it first, then the flags below, then the
# script's arguments, and the last value of a flag wins. Every setting here is an environment variable
# with a working default.
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
#   SAMPLE_DATA   1: train a model of yours (MODEL_PATH) on the bundled sample data on purpose; without it
#                 a model of yours needs DATA_PATH, IMAGE_FOLDER and OUTPUT_DIR
#
# The published flags --model_name_or_path, --data_path, --image_folder, --output_dir, --vision_tower and
# --deepspeed, given as arguments, take the place of MODEL_PATH, DATA_PATH, IMAGE_FOLDER, OUTPUT_DIR,
# VISION_TOWER and ZERO. Before it launches, a script prints its plan (model, data, images, output, task,
# ZeRO config, precision, processes, resume) on stderr; a variable in the environment whose name looks
# like a misspelling of one above stops it. --help prints the variables and an example, starting nothing.

CALLER_DIR=$PWD
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT_NAME=$(basename "$0")

# script_default VAR: the default the stage script writes for VAR (its line VAR=${VAR:-default}).
script_default() { sed -n "s/^$1=\${$1:-\([^}]*\)}.*/\1/p" "$0" | head -n 1; }

# --help: the script's own notes and variables, these shared ones and an example; nothing starts.
script_help() {
  echo "bash scripts/$SCRIPT_NAME [--flag value ...]"
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}/  /p}' "$0"
  echo
  echo "Variables of $SCRIPT_NAME (environment; paths relative to your directory):"
  grep -E '^[A-Z_]+=\$\{[A-Z_]+:-[^$]' "$0" |
    sed -E 's/^([A-Z_]+)=\$\{[A-Z_]+:-([^}]*)\}[[:space:]]*(# )?(.*)$/  \1  (default: \2)  \4/; s/[[:space:]]+$//'
  awk '!/^#/ { code = 1 } code && /^# [A-Z_][A-Z_0-9]+ / { print "  " substr($0, 3); more = 1; next }
       code && more && /^#   / { print "  " substr($0, 3); next } { more = 0 }' "$0"
  echo
  echo "Variables of every stage script (scripts/common.sh):"
  sed -n '/^#   CONFIG /,/^#   SAMPLE_DATA/{s/^#//;p}' "$REPO_ROOT/scripts/common.sh"
  sed -n '/^#   SAMPLE_DATA/,/^#$/{/^#   SAMPLE_DATA/d;/^#$/d;s/^#//;p}' "$REPO_ROOT/scripts/common.sh"
  echo
  sed -n '/^# The published flags/,/^# like a misspelling/{s/^# //;p}' "$REPO_ROOT/scripts/common.sh"
  local model=outputs/my_sft data=data/my_posts/preference.json out=outputs/my_${SCRIPT_NAME%.sh}
  case "$SCRIPT_NAME" in
    sft.sh) model=models/llava-v1.6-vicuna-7b data=data/my_posts/sft.json ;;
    pretrain.sh) model=models/vicuna-7b-v1.5 data=data/my_captions/pretrain.json ;;
  esac
  echo
  echo "Example: your model on your data, two steps to try it (DRY_RUN=1 prints the plan and command only):"
  echo "  MODEL_PATH=$model DATA_PATH=$data IMAGE_FOLDER=${data%/*}/images \\"
  echo "    OUTPUT_DIR=$out bash scripts/$SCRIPT_NAME --max_steps 2"
  echo "The same with the published flags:"
  echo "  bash scripts/$SCRIPT_NAME --model_name_or_path $model --data_path $data \\"
  echo "    --image_folder ${data%/*}/images --output_dir $out --max_steps 2"
}
for _arg in "$@"; do
  case "$_arg" in -h|--help) script_help; exit 0 ;; esac
done

# The published path flags given as arguments set the variables (and leave the arguments), so that the
# plan, the paths' resolution and the default-model check see them.
_rest=()
while [ $# -gt 0 ]; do
  case "${1%%=*}" in
    --model_name_or_path) _var=MODEL_PATH ;; --data_path) _var=DATA_PATH ;; --image_folder) _var=IMAGE_FOLDER ;;
    --output_dir) _var=OUTPUT_DIR ;; --vision_tower) _var=VISION_TOWER ;; --deepspeed) _var=ZERO ;;
    *) _rest+=("$1"); shift; continue ;;
  esac
  if [[ "$1" == *=* ]]; then printf -v "$_var" '%s' "${1#*=}"; shift
  elif [ $# -ge 2 ]; then printf -v "$_var" '%s' "$2"; shift 2
  else echo "$1 needs a value" >&2; exit 2; fi
done
set -- ${_rest[@]+"${_rest[@]}"}
SCRIPT_ARGS=("$@")  # the arguments the trainer gets on top of the stage's flags, for the plan
unset _rest _var _arg

# Names of the variables the scripts read; one in the environment that is close to one of them (edit
# distance 1 for names of 4-5 letters, 2 for longer ones; any case) or an unknown MODEL_*/DATA_* name is a
# misspelling that would silently leave the default in place (the bundled sample data): stop.
SCRIPT_VARIABLES="CONFIG MODEL_PATH DATA_PATH IMAGE_FOLDER OUTPUT_DIR HOSTFILE VISION_TOWER EPOCHS LR BATCH_SIZE
  GRAD_ACCUM GLOBAL_BATCH NUM_GPUS CUDA_VISIBLE_DEVICES NODE_RANK MASTER_ADDR MASTER_PORT ZERO PRECISION PARADIGM
  SAVE_STEPS SAVE_TOTAL_LIMIT RESUME NAN_POLICY REPORT_TO WANDB_PROJECT NUM_WORKERS OMP_NUM_THREADS PYTHON DRY_RUN
  SAMPLE_DATA BETA IMAGE_TYPE CL_REWARD_NUM TERMS STALE_LOCK_MINUTES"
# the shell's and launchers' own names, close to ours by chance
OTHER_VARIABLES="TERM HOME PATH SHELL USER LANG PWD OLDPWD HOSTNAME LOGNAME MAIL RANK LOCAL_RANK WORLD_SIZE"
check_variable_names() {
  local found
  found=$(compgen -e | awk -v known="$SCRIPT_VARIABLES" -v other="$OTHER_VARIABLES" '
    function lev(a, b,   i, j, x, d) {
      for (i = 0; i <= length(a); i++) d[i, 0] = i
      for (j = 0; j <= length(b); j++) d[0, j] = j
      for (i = 1; i <= length(a); i++) for (j = 1; j <= length(b); j++) {
        x = d[i-1, j-1] + (substr(a, i, 1) != substr(b, j, 1))
        if (d[i-1, j] + 1 < x) x = d[i-1, j] + 1
        if (d[i, j-1] + 1 < x) x = d[i, j-1] + 1
        d[i, j] = x
      }
      return d[length(a), length(b)]
    }
    BEGIN { n = split(known, K); split(other, O); for (i in K) ours[K[i]] = 1; for (i in O) ours[O[i]] = 1 }
    !($0 in ours) {
      best = ""; bestd = 99
      for (i = 1; i <= n; i++) {
        k = K[i]; lim = length(k) >= 6 ? 2 : length(k) >= 4 ? 1 : 0
        d = toupper($0) == k ? 0 : lim ? lev($0, k) : 99
        if (d <= lim && d < bestd) { best = k; bestd = d }
      }
      if (best == "" && $0 ~ /^MODEL_/) best = "MODEL_PATH"
      if (best == "" && $0 ~ /^DATA_/) best = "DATA_PATH"
      if (best != "") { print $0 " " best; exit }
    }')
  [ -n "$found" ] || return 0
  echo "${found% *} is not a variable of scripts/$SCRIPT_NAME: did you mean ${found#* }? (unset ${found% *} if it is meant for something else; --help lists the variables)" >&2
  exit 2
}
check_variable_names

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
# The launcher (llava-mcmdpo train --nproc ..., llava/train/launch.py) runs in the repository's environment;
# the training in PYTHON's (its torch counts the GPUs, its deepspeed runner starts the ranks).
LAUNCHER_PYTHON=$REPO_ROOT/.venv/bin/python
[ -x "$LAUNCHER_PYTHON" ] || LAUNCHER_PYTHON=$PYTHON
case "${PARADIGM:-d}" in a|b|c|d) ;; *) echo "PARADIGM must be a, b, c or d (got $PARADIGM)" >&2; exit 2 ;; esac
case "${RESUME:-auto}" in auto|never) ;; *) echo "RESUME must be auto or never (got $RESUME)" >&2; exit 2 ;; esac

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

# own_model: did the caller name a model other than the stage script's default (MODEL_PATH or --model_name_or_path)?
own_model() {
  local default
  default=$(script_default MODEL_PATH)
  caller_set MODEL_PATH && [ "$MODEL_PATH" != "$default" ] && [ "$MODEL_PATH" != "$REPO_ROOT/$default" ]
}

# require_own_data: a model of yours is not trained on the bundled sample's data or into its output folder by
# default: DATA_PATH, IMAGE_FOLDER and OUTPUT_DIR must be given, or SAMPLE_DATA=1 says the sample is meant.
require_own_data() {
  own_model || return 0
  [ "${SAMPLE_DATA:-0}" = 1 ] && return 0
  local var missing=""
  for var in DATA_PATH IMAGE_FOLDER OUTPUT_DIR; do caller_set "$var" || missing+="${missing:+, }$var (default $(script_default $var))"; done
  [ -z "$missing" ] && return 0
  echo "MODEL_PATH is a model of yours ($MODEL_PATH), but these are unset and would be the bundled sample's:" \
       "$missing. Set them (or pass --data_path, --image_folder, --output_dir), or SAMPLE_DATA=1 to train on the sample on purpose" >&2
  exit 2
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

# launch ARGS...: the trainer under DeepSpeed's launcher, one process per GPU (or CPU process), run from the
# caller's directory: `llava-mcmdpo train ARGS --nproc NUM_GPUS --zero ZERO ...`, the variables above as the
# launcher's flags. The launcher (llava/train/launch.py) prints the plan, then the command (DRY_RUN=1) or runs it.
launch() {
  require_own_data
  local flags=(--script "$SCRIPT_NAME" --python "$PYTHON" --caller_arguments "${#SCRIPT_ARGS[@]}") pair var defaulted=""
  for pair in NUM_GPUS=--nproc ZERO=--zero PRECISION=--precision NUM_WORKERS=--num_workers HOSTFILE=--hostfile \
              NODE_RANK=--node_rank MASTER_ADDR=--master_addr MASTER_PORT=--master_port; do
    var=${pair%%=*}
    if [ -n "${!var:-}" ]; then flags+=("${pair#*=}" "${!var}"); fi
  done
  for var in MODEL_PATH DATA_PATH IMAGE_FOLDER OUTPUT_DIR; do caller_set "$var" || defaulted+="${defaulted:+,}$var"; done
  flags+=(--defaulted "$defaulted")
  if own_model; then flags+=(--own_model); fi
  if [ "${DRY_RUN:-0}" = 1 ]; then flags+=(--dry_run); fi
  cd "$CALLER_DIR"
  PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$LAUNCHER_PYTHON" -m llava.cli train "${flags[@]}" "$@"
}
