"""scripts/gpu_smoke.sh without a GPU: its dry run (GPU_SMOKE_DRY=1) prints each stage's command, runs none."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_scripts import REPO

STAGES = ["build", "sft", "mcmdpo_zero2", "mcmdpo_zero3", "inference", "scores"]


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    caller = tmp_path_factory.mktemp("caller")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", "HOSTFILE", "ZERO")}
    result = subprocess.run(["bash", str(REPO / "scripts/gpu_smoke.sh")], cwd=caller, capture_output=True, text=True,
                            timeout=300, env={**env, "GPU_SMOKE_DRY": "1", "PYTHON": sys.executable, "SMOKE_DIR": "smoke",
                                              "STEPS": "3"})
    assert result.returncode == 0, result.stdout + result.stderr
    commands = {}
    for line in result.stdout.splitlines():
        stage, _, command = line.partition(": ")
        commands[stage.removeprefix("DRY ")] = shlex.split(command)
    return caller, list(commands), commands


def flag(argv, name):
    """The value a training command gives ``name``: its last occurrence on the command line, else the
    value in the settings file (``configs/*.yaml``) the command starts with, as the trainer reads them."""
    if name in argv:
        return argv[len(argv) - 1 - argv[::-1].index(name) + 1]
    settings = next((a for a in argv if a.endswith((".yaml", ".yml"))), None)
    assert settings is not None, f"{name} is neither on the command line nor in a settings file"
    value = yaml.safe_load(Path(settings).read_text())[name.removeprefix("--")]
    return str(value)


def test_stages_in_order_and_nothing_built(dry):
    caller, order, _ = dry
    assert order == STAGES
    assert not (caller / "smoke").exists()  # the work directory (relative to the caller) is not even created


def test_the_model_is_the_benchmarks_1b_built_on_the_gpu(dry):
    caller, _, commands = dry
    code, out = commands["build"][2], commands["build"][3]
    assert "from bench_step import PRESETS, write_checkpoint" in code and "PRESETS['gpu1b']" in code
    assert "'cuda', torch.bfloat16" in code
    assert out == str(caller / "smoke" / "base")


def test_the_gpu1b_preset_is_about_a_billion_parameters():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_step import PRESETS, param_counts
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from llava.model.tiny import build

    model, _ = build("llava", 0, PRESETS["gpu1b"], device="meta")
    assert 0.9e9 < param_counts(model)["total"] < 1.3e9
    assert PRESETS["gpu1b"].image_tokens == 576


@pytest.mark.parametrize("stage, zero, loss, model", [
    ("sft", "zero2", "sft", "base"), ("mcmdpo_zero2", "zero2", "mcm_dpo", "sft"), ("mcmdpo_zero3", "zero3", "mcm_dpo", "sft"),
])
def test_training_stages(dry, stage, zero, loss, model):
    caller, _, commands = dry
    argv = commands[stage]
    assert os.path.basename(argv[0]) == "deepspeed" and flag(argv, "--num_gpus") == "1"
    assert flag(argv, "--deepspeed") == str(REPO / "scripts" / f"{zero}.json")
    assert flag(argv, "--bf16") == "True" and flag(argv, "--loss") == loss
    assert flag(argv, "--model_name_or_path") == str(caller / "smoke" / model)
    assert flag(argv, "--output_dir") == str(caller / "smoke" / stage)
    assert flag(argv, "--image_folder") == str(REPO / "data" / "sample")
    assert flag(argv, "--max_steps") == "3"
    assert flag(argv, "--save_strategy") == "no"  # the last one wins
    assert flag(argv, "--resume_from_checkpoint") in ("never", "no", "none", "false", "")  # a rerun starts afresh
    if loss != "sft":
        assert "--reference_mode" not in argv and "--offline_ref_logits" not in argv  # the cached reference, in output_dir


def test_inference_reads_the_zero3_model_and_scores_its_output(dry):
    caller, _, commands = dry
    infer, score = commands["inference"], commands["scores"]
    assert infer[1] == str(REPO / "mcmdpo_inference.py") and score[1] == str(REPO / "get_score.py")
    assert flag(infer, "--model_name") == str(caller / "smoke" / "mcmdpo_zero3")
    assert flag(score, "--file") == flag(infer, "--eval_output")


@pytest.mark.slow
def test_gpu_checks_without_a_gpu(tmp_path):
    """benchmarks/gpu_checks.sh on a machine without a usable GPU: the parts that need none run and give figures,
    each other part is named as needing one, and the run exits 0 with everything in one JSON."""
    import json

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "RESULTS": str(tmp_path / "r")}
    env.pop("PARTS", None)
    result = subprocess.run(["bash", str(REPO / "benchmarks/gpu_checks.sh")], capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("published", "attention", "memory", "infer"):
        assert f"== {name}: needs a GPU: not run" in result.stdout
    assert result.stdout.splitlines()[0].startswith("driver: ")
    checks = json.loads((tmp_path / "r" / "gpu_checks.json").read_text())
    parts = checks["parts"]
    assert set(parts) == {"table", "published", "attention", "memory", "precision", "update", "infer"}
    assert all(parts[n]["figures"] is None for n in ("published", "attention", "memory", "infer"))
    assert checks["machine"]["cuda_usable"] is False
    rows = parts["table"]["figures"]["rows"]
    assert len(rows) == 9 and all(r["total"] > 0 for r in rows)
    precision = parts["precision"]["figures"]
    assert precision["finite"] and 0 < precision["max_rel_logp_diff"] < 0.05
    update = parts["update"]["figures"]
    # bf16 weights keep most of a 5e-7 step below their rounding; fp32 master weights all move
    assert update["fp32_master_weights"]["stored_values_changed"] > 0.99
    assert update["bf16_weights"]["bf16_values_changed"] < 0.1
