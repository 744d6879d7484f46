"""The shipped scripts end to end: DeepSpeed on 2 CPU processes, checkpoints plain transformers loads."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TERMS = ("response", "image", "context", "context_response", "image_response", "context_image", "all")

LOADS_IN_PLAIN_TRANSFORMERS = """
import sys
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
processor = AutoProcessor.from_pretrained(sys.argv[1])
assert "llava" not in sys.modules, "the project was imported"
print(type(model).__name__, type(processor).__name__)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script, out, model, data, **env):
    full_env = {**os.environ, "MODEL_PATH": str(model), "DATA_PATH": str(data), "IMAGE_FOLDER": str(data.parent),
                "OUTPUT_DIR": str(out), "NUM_GPUS": "2", "REPORT_TO": "none", "MASTER_PORT": str(free_port()),
                "PYTHON": sys.executable, **env}
    result = subprocess.run(["bash", f"scripts/{script}", "--max_steps", "3", "--gradient_accumulation_steps", "1",
                             "--save_strategy", "no"], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("script,zero,report_to", [
    ("sft.sh", "zero3", "none"),
    ("dpo.sh", "zero3", "tensorboard"),
    ("mcmdpo.sh", "zero3", "none"),
    ("mcmdpo.sh", "zero2", "wandb"),
])
def test_script_runs_under_deepspeed(script, zero, report_to, tiny_llava_dir, preference_file, tmp_path):
    out = tmp_path / "out"
    run_script(script, out, tiny_llava_dir, preference_file, ZERO=zero, REPORT_TO=report_to,
               WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    assert all(math.isfinite(h["loss"]) for h in logs)
    if script != "sft.sh":
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(logs[0])
    if script == "mcmdpo.sh":
        assert {f"mcm/{t}/margin" for t in TERMS} <= set(logs[0])
        assert {f"mcm/{t}/accuracy" for t in TERMS} <= set(logs[0])
    if report_to == "tensorboard":
        assert list(out.rglob("events.out.tfevents.*"))
    if report_to == "wandb":
        assert list(tmp_path.rglob("offline-run-*"))
    loaded = subprocess.run([sys.executable, "-c", LOADS_IN_PLAIN_TRANSFORMERS, str(out)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "LlavaForConditionalGeneration LlavaProcessor" in loaded.stdout


def test_scripts_reject_a_bad_paradigm(tmp_path):
    result = subprocess.run(["bash", "scripts/mcmdpo.sh"], cwd=REPO, env={**os.environ, "PARADIGM": "e", "PYTHON": "true"},
                            capture_output=True, text=True)
    assert result.returncode == 2 and "PARADIGM must be a, b, c or d" in result.stderr


def test_scripts_refuse_an_abandoned_build_lock(tmp_path):
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = lock.stat().st_mtime - 3600
    os.utime(lock, (old, old))
    result = subprocess.run(["bash", "scripts/sft.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHON": sys.executable})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "build lock older than 10 minutes" in result.stderr and str(lock) in result.stderr
    assert lock.exists(), "the script must not delete a lock it did not create"
