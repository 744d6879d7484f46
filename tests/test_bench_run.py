"""The whole-run benchmark (benchmarks/bench_run.py): its command line means the settings it claims,
and its quick run trains every variant to the end. No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_run.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_run  # noqa: E402


@pytest.mark.parametrize("variant", ["mcm", "dpo"])
def test_project_argv_is_the_run_described(variant, tmp_path):
    """The flags given to llava.train.train parse to TRL's settings and the project's default reference."""
    from llava.train.arguments import parse_args

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    argv = bench_run.project_argv(variant, model_dir, tmp_path / "data" / "preference.json", tmp_path / "out",
                                  accumulation=4, epochs=1, seed=0)
    model_args, data_args, args = parse_args(argv)
    assert args.loss == ("mcm_dpo" if variant == "mcm" else "dpo")
    assert args.reference_mode == "cached" and args.preference_forward == "packed"  # the defaults
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (1, 4, 1)
    assert args.max_grad_norm == 1.0 and args.gradient_checkpointing is False and args.weight_decay == 0.0
    assert not args.bf16 and args.use_cpu and args.beta == 0.1 and args.learning_rate == 1e-5
    # the project's default kernel (sdpa_tree for the packed rows) and TRL's default optimizer, on both sides
    assert model_args.attn_implementation == "auto" and data_args.image_aspect_ratio == "pad"
    assert args.optim == "adamw_torch_fused"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_run(tmp_path):
    pytest.importorskip("trl", reason="the benchmark compares against TRL: pip install -e '.[bench]'")
    out = tmp_path / "run.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out), "--workdir", str(tmp_path / "w")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["seconds_per_run"]) == {"mcm", "dpo", "trl_dpo"}
    for v, (run,) in res["runs"].items():
        assert run["micro_steps"] == 4 and run["optimizer_steps"] == 2  # 4 records, batch 1 x accumulation 2
        assert run["total_s"] == pytest.approx(run["load_s"] + run["reference_s"] + run["train_s"])
        assert res["seconds_per_run"][v] == run["total_s"] > 0
        assert math.isfinite(run["final_loss"])
        assert (tmp_path / "w" / "runs" / f"{v}_0" / "model.safetensors").is_file()  # the final model was saved
    # the project's runs computed and cached their reference before training; TRL's runs its reference in each step
    for v in ("mcm", "dpo"):
        assert res["runs"][v][0]["reference_s"] > 0
        assert list((tmp_path / "w" / "runs" / f"{v}_0" / "ref_logps").glob("ref_logps_*.pt"))
    assert res["runs"]["trl_dpo"][0]["reference_s"] == 0
    s = res["seconds_per_run"]
    assert res["ratios"]["mcm/trl_dpo"]["value"] == pytest.approx(s["mcm"] / s["trl_dpo"])
    assert res["ratios"]["dpo/trl_dpo"]["value"] == pytest.approx(s["dpo"] / s["trl_dpo"])
    assert isinstance(res["ratios"]["mcm/trl_dpo"]["pass"], bool)
    assert "mcm/trl_dpo" in proc.stdout
