#!/usr/bin/env bash
# The GPU checks of this project as one prepared run for a lent GPU (one H100, about 10 minutes; nothing
# fetched but PyPI, by `make setup`, beforehand). Every part runs under its own `timeout`; every figure goes
# to one JSON, $RESULTS/gpu_checks.json (each part's log beside it). Parts, default limits in seconds:
#   env        driver, CUDA build of torch, flash-attn / Java / WordNet present (one line when the installed
#              torch cannot use the driver)                                                      (no GPU needed)
#   table      the computed 7B memory table of docs/gpu.md (benchmarks/gpu_probes.py table)     (no GPU needed)
#   published  the published path: an original-format tiny LLaVA-1.6, MCM-DPO under ZeRO-3 in bf16 with the
#              live reference, 2 steps (scripts/mcmdpo.sh)                                   PUBLISHED_S=180
#   attention  one packed row of ~3.6k and ~5.5k tokens at 7B widths, forward + backward of sdpa_tree inside
#              sdpa_kernel([FLASH, EFFICIENT]) (a fall back to the math kernel fails) against dense sdpa:
#              max difference, time, peak memory                                             ATTENTION_S=90
#   memory     7B widths, 2 and 4 decoder layers + CLIP-L/336, checkpointing on, 7k and 11k tokens: peak
#              per layer, extrapolated to 32 layers                                             MEMORY_S=150
#   precision  bf16 against fp32 summed log-probs of a packed MCM-DPO batch     (CPU: tiny model) PRECISION_S=60
#   update     share of bf16 weights one AdamW step at lr 5e-7 changes, no DeepSpeed (CPU: tiny)   UPDATE_S=60
#   infer      benchmarks/bench_infer.py --device cuda --profile_beam: records/s against the released loop,
#              outputs equal, answers non-empty, logits finite, a profile of batch-1 beam search INFER_S=150
# Opt-in (PARTS="... smoke step"): scripts/gpu_smoke.sh (SFT -> MCM-DPO ZeRO-2/3 -> inference -> scores,
# 245 s measured on the H200 on 2026-11-29, SMOKE_S=300) and benchmarks/gpu_step.sh (STEP_S=240).
#
#   bash benchmarks/gpu_checks.sh                     # the default parts; RESULTS=outputs/gpu_checks
#   PARTS="attention memory" bash benchmarks/gpu_checks.sh
#
# Without a usable GPU it runs the parts that need none, prints "needs a GPU: not run" for each of the
# others, and exits 0 (tests/test_gpu_smoke.py runs it so). With one, it exits 1 when a part fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHON HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
RESULTS=${RESULTS:-outputs/gpu_checks}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
export RESULTS
PARTS=${PARTS:-table published attention memory precision update infer}
STATUS=0
rm -f "$RESULTS"/part_*.json "$RESULTS"/status_*.txt

"$PYTHON" benchmarks/gpu_probes.py env --json "$RESULTS/part_env.json" > "$RESULTS/env.log" 2>&1
"$PYTHON" - "$RESULTS/part_env.json" <<'EOF'
import json, sys
e = json.load(open(sys.argv[1]))
print(f"driver: {e['nvidia_smi'] or 'no nvidia-smi'} | torch {e['torch']}, CUDA build {e['cuda_build']} | "
      f"GPU: {e['gpu'] or 'none usable'} | flash-attn {'yes' if e['flash_attn'] else 'no: sdpa kernels only'} | "
      f"Java {'yes' if e['java'] else 'no: METEOR cannot run'} | WordNet {'yes' if e['wordnet'] else 'no: METEOR cannot run'}")
if e["torch_cannot_use_driver"]:
    print(e["torch_cannot_use_driver"])
EOF
GPU=$("$PYTHON" -c "import json, sys; print(int(json.load(open(sys.argv[1]))['cuda_usable']))" "$RESULTS/part_env.json" 2>/dev/null || echo 0)

# part NAME LIMIT_S NEEDS_GPU COMMAND...: run it under its limit (output in NAME.log), one summary line.
part() {
  local name=$1 limit=$2 needs_gpu=$3 t0=$SECONDS rc; shift 3
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  if [ "$needs_gpu" = 1 ] && [ "$GPU" != 1 ]; then
    echo "needs a GPU: not run" > "$RESULTS/status_$name.txt"
    echo "== $name: needs a GPU: not run"
    return 0
  fi
  # through bash -c so that a part may be one of the functions below
  timeout --signal=TERM --kill-after=10 "$limit" bash -c "$(declare -f published probe); \"\$@\"" part "$@" \
    > "$RESULTS/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then echo "ok in $(( SECONDS - t0 )) s (limit $limit s)" > "$RESULTS/status_$name.txt"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "FAILED: over its $limit s limit" > "$RESULTS/status_$name.txt"; STATUS=1
  else echo "FAILED: exit $rc in $(( SECONDS - t0 )) s" > "$RESULTS/status_$name.txt"; STATUS=1; fi
  echo "== $name: $(cat "$RESULTS/status_$name.txt") (log $RESULTS/$name.log)"
}

# The published path: LLaVA-1.6's original layout (what the authors start from), converted from a tiny random
# model built here, trained 2 steps by the shipped script under ZeRO-3, bf16, with the live reference.
published() {
  local w="$RESULTS/published"
  rm -rf "$w" && mkdir -p "$w" || return 1
  "$PYTHON" -m llava.model.tiny --arch llava_next --out "$w/hf" || return 1
  "$PYTHON" -m llava.model.convert to-original --src "$w/hf" --out "$w/original" || return 1
  "$PYTHON" -c "import json, sys; json.dump(json.load(open(sys.argv[1]))[:8], open(sys.argv[2], 'w'))" \
    data/sample/preference.json "$w/preference.json" || return 1
  env NUM_GPUS=1 PRECISION=bf16 REPORT_TO=none RESUME=never ZERO=zero3 MODEL_PATH="$w/original" \
    DATA_PATH="$w/preference.json" IMAGE_FOLDER="$PWD/data/sample" OUTPUT_DIR="$w/run" BATCH_SIZE=1 GRAD_ACCUM=1 \
    bash scripts/mcmdpo.sh --max_steps 2 --reference_mode live --save_strategy no --save_at_epoch_end False \
    --logging_steps 1 --seed 0 || return 1
  "$PYTHON" - "$w/run/trainer_state.json" "$RESULTS/part_published.json" <<'EOF'
import json, math, sys
losses = [h["loss"] for h in json.load(open(sys.argv[1]))["log_history"] if "loss" in h]
ok = len(losses) == 2 and all(math.isfinite(x) for x in losses)
json.dump({"losses": losses, "pass": ok, "setup": "original-format tiny LLaVA-1.6, ZeRO-3, bf16, live reference"},
          open(sys.argv[2], "w"))
print("losses", losses)
sys.exit(0 if ok else 1)
EOF
}

probe() { "$PYTHON" benchmarks/gpu_probes.py "$1" --json "$RESULTS/part_$1.json" --workdir "$RESULTS/probe_model"; }

part table 60 0 "$PYTHON" benchmarks/gpu_probes.py table --json "$RESULTS/part_table.json"
part published "${PUBLISHED_S:-180}" 1 published
part attention "${ATTENTION_S:-90}" 1 probe attention
part memory "${MEMORY_S:-150}" 1 probe memory
part precision "${PRECISION_S:-60}" 0 probe precision
part update "${UPDATE_S:-60}" 0 probe update
part infer "${INFER_S:-150}" 1 "$PYTHON" benchmarks/bench_infer.py --device cuda --profile_beam --json "$RESULTS/part_infer.json"
part smoke "${SMOKE_S:-300}" 1 env SMOKE_DIR="$RESULTS/smoke" bash scripts/gpu_smoke.sh
part step "${STEP_S:-240}" 1 bash benchmarks/gpu_step.sh --steps 5 --warmup 2 --memory_steps 2 --json "$RESULTS/part_step.json"

# One JSON: every part's status and figures.
"$PYTHON" - "$RESULTS" <<'EOF'
import datetime, json, sys
from pathlib import Path
r = Path(sys.argv[1])
out = {"written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "machine": json.loads((r / "part_env.json").read_text()), "parts": {}}
for status in sorted(r.glob("status_*.txt")):
    name = status.stem.removeprefix("status_")
    figures = r / f"part_{name}.json"
    out["parts"][name] = {"status": status.read_text().strip(),
                          "figures": json.loads(figures.read_text()) if figures.is_file() else None}
(r / "gpu_checks.json").write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {r / 'gpu_checks.json'}")
EOF
exit "$STATUS"
