# Shared by the stage scripts (sft.sh, dpo.sh, mcmdpo.sh, pretrain.sh): it hands their environment
# variables and arguments to llava/train/script_env.py, which checks them and turns them into a call of the
# launcher, `llava-mcmdpo train CONFIG --nproc NUM_GPUS --zero ZERO ...` (llava/train/launch.py, which
# chooses DeepSpeed's launcher for the host, the precision flags and the workers, prints the plan and
# starts the run). The training settings are the stage's YAML file
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

# The interpreter: the caller's (a relative path is the caller's), else the repository's .venv, else python3.
case "${PYTHON:-}" in /*|"") ;; */*) PYTHON="$CALLER_DIR/$PYTHON" ;; esac
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO_ROOT/.venv/bin/python" ]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# The launcher and these checks run in the repository's environment; the training in PYTHON's (its torch
# counts the GPUs, its deepspeed runner starts the ranks).
LAUNCHER_PYTHON=$REPO_ROOT/.venv/bin/python
[ -x "$LAUNCHER_PYTHON" ] || LAUNCHER_PYTHON=$PYTHON
script_env() { PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$LAUNCHER_PYTHON" -m llava.train.script_env "$@"; }

for _arg in "$@"; do
  case "$_arg" in -h|--help) script_env help "$0"; exit ;; esac
done
# The published path flags become their variables (and leave the arguments), a misspelled variable stops the
# script, the caller's paths become absolute, PARADIGM and RESUME are checked: shell assignments, or one line
# on stderr and status 2.
_prepared=$(script_env prepare "$0" "$CALLER_DIR" "$@") || exit
eval "$_prepared"
unset _arg _prepared
_DEFAULT_MODEL=() _STAGE=() _SET_FLAGS=()  # what the steps below hand to launch

# The stage scripts' defaults below are relative to the repository.
cd "$REPO_ROOT"

# The stage script's steps, run by the launcher in this order when it is called (launch):
# require_default_model HINT: stop with one line when MODEL_PATH is the stage's default and absent.
require_default_model() { _DEFAULT_MODEL=(--default_model_hint "$1"); }
# stage_flags STAGE CONFIG: the settings file (CONFIG unless the caller set another), the paths and the
# variables the caller set as the trainer's flags; PARADIGM's tower flag for STAGE (sft | align).
stage_flags() { _STAGE=(--stage "$1" --stage_config "$2"); }
# set_flags VAR=--flag ...: the trainer gets --flag "$VAR" for each VAR that is set, after the stage's flags, so
# that it overrides the YAML's value; unset, the YAML's stands.
set_flags() { local pair; for pair in "$@"; do _SET_FLAGS+=(--set_flag "$pair"); done; }

# launch ARGS...: the variables that are set and ARGS to llava/train/script_env.py, run from the caller's
# directory; it refuses a model of yours on the sample's data, adds the stage's flags and starts
# `llava-mcmdpo train ARGS --nproc NUM_GPUS --zero ZERO ...` (the plan, then the command with DRY_RUN=1).
launch() {
  local flags=(--script "$0" --caller_dir "$CALLER_DIR" --repo_root "$REPO_ROOT" --caller_set "$CALLER_SET" --caller_arguments "$CALLER_ARGUMENTS"
               ${_DEFAULT_MODEL[@]+"${_DEFAULT_MODEL[@]}"} ${_STAGE[@]+"${_STAGE[@]}"}
               ${_SET_FLAGS[@]+"${_SET_FLAGS[@]}"}) var
  for var in $SCRIPT_VARIABLES; do
    if [ -n "${!var:-}" ]; then flags+=(--variable "$var=${!var}"); fi
  done
  cd "$CALLER_DIR"
  PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$LAUNCHER_PYTHON" -m llava.train.script_env launch "${flags[@]}" -- "$@"
}
