"""The step benchmark (benchmarks/bench_step.py) runs end to end, and its GPU preset is sound on paper.

No timing is asserted: only that the quick run finishes, reports the five variants with positive
numbers, and that its equal-work checks hold (naive and packed MCM-DPO compute the same loss; TRL
sees the same tokens and pixels as the project's DPO and gets the same log-probabilities).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_step.py"
VARIANTS = {"naive_mcm", "mcm", "dpo", "trl_dpo", "trl_dpo_stock"}
RATIOS = {"mcm/naive_mcm", "dpo/trl_dpo", "mcm/trl_dpo", "peak mcm / peak trl_dpo"}


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    return env


def _positive(mapping: dict) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 for v in mapping.values())


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_run_reports_five_variants(tmp_path):
    pytest.importorskip("trl", reason="the benchmark compares against TRL: pip install -e '.[bench]'")
    out = tmp_path / "bench.json"
    # --peak_tflops exercises the MFU accounting the GPU run prints
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out), "--peak_tflops", "1"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())

    for key in ("seconds_per_step", "seconds_per_step_min", "peak_mem_mb", "tokens_per_second", "mfu"):
        assert set(res[key]) == VARIANTS, key
    assert _positive(res["seconds_per_step"]) and _positive(res["seconds_per_step_min"])
    assert _positive(res["peak_mem_mb"])
    assert _positive(res["mfu"])
    assert all(_positive(t) for t in res["tokens_per_second"].values())
    assert set(res["ratios"]) == RATIOS
    assert set(res["ratios_paired_by_round"]) == RATIOS - {"peak mcm / peak trl_dpo"}
    for r in res["ratios"].values():
        assert r["value"] > 0 and isinstance(r["pass"], bool)
    assert res["machine"]["nproc"] >= 1 and res["machine"]["cpu_model"]
    assert "bench_step.py" in res["command"]

    # equal work: the naive (8 sequences) and packed MCM-DPO forwards agree
    mcm = res["checks"]["mcm_vs_naive"]
    assert mcm["passed"], mcm
    assert mcm["logps_max_rel"] <= 1e-4 and mcm["loss_cached_rel"] <= 1e-4 and mcm["loss_shifted_rel"] <= 1e-4
    assert mcm["first_step_loss_rel"] <= 1e-4
    trl = res["checks"]["trl_vs_dpo"]
    assert trl["passed"] and trl["same_token_ids"], trl

    # the shapes of the published data, and the model the brief asks for
    tokens = res["tokens"]
    assert tokens["naive_mcm"]["images"] == 8 and tokens["mcm"]["images"] == 2 and tokens["dpo"]["images"] == 1
    assert tokens["mcm"]["naive_equivalent_tokens"] == tokens["naive_mcm"]["tokens"]
    assert tokens["mcm"]["tokens"] < tokens["naive_mcm"]["tokens"] / 2
    model = res["model"]
    assert model["config_vocab_size"] == 32000 and model["image_tokens"] == 576
    # the unpatched TRL head scores every position on the CPU: more memory than the patched one
    assert res["peak_mem_mb"]["trl_dpo_stock"] > res["peak_mem_mb"]["trl_dpo"]


def test_gpu_preset_dry_run(tmp_path):
    """The GPU command's flags parse and its ~1B model is built on the meta device (nothing allocated)."""
    out = tmp_path / "dry.json"
    env = _env() | {"BENCH_DRY_RUN": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_step.sh"), "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] and res["preset"] == "gpu1b" and res["device"] == "cuda" and res["dtype"] == "bf16"
    params = res["params"]
    assert 0.8e9 <= params["total"] <= 1.5e9, params
    assert params["total"] == sum(v for k, v in params.items() if k != "total")
    cfg = res["config"]
    assert cfg["vocab_size"] == 32000 and cfg["text_hidden"] == 2048 and 16 <= cfg["text_layers"] <= 22
    assert cfg["image_size"] == 336 and cfg["patch_size"] == 14 and res["image_tokens"] == 576
    assert set(res["variants"]) == VARIANTS
    # the timing process holds five trainable copies: it must fit an H100's ~78 GiB with room for activations
    assert res["estimated_resident_gb_timing_process"] < 60


def test_flops_and_ratios_accounting():
    """The FLOP count behind the MFU column and the ratio targets, on made-up numbers."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_step as b
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    params = {"language": 100, "projector": 10, "vision": 50, "embeddings": 1000}
    ours = {"tokens": 1000, "images": 2, "reference_forward": False}
    trl = {"tokens": 1000, "images": 2, "reference_forward": True}
    assert b.step_flops(params, ours, 576) == 6 * 110 * 1000 + 2 * 50 * 577 * 2
    # TRL adds a forward of the reference on the same tokens and images
    assert b.step_flops(params, trl, 576) == 8 * 110 * 1000 + 4 * 50 * 577 * 2
    seconds = {"naive_mcm": 10.0, "mcm": 3.0, "dpo": 1.0, "trl_dpo": 4.0, "trl_dpo_stock": 8.0}
    peaks = {"naive_mcm": 900.0, "mcm": 300.0, "dpo": 200.0, "trl_dpo": 250.0, "trl_dpo_stock": 800.0}
    r = b.compute_ratios(seconds, peaks)
    assert r["mcm/naive_mcm"] == {"value": 0.3, "target": 0.35, "pass": True}
    assert r["dpo/trl_dpo"]["value"] == 0.25 and r["dpo/trl_dpo"]["pass"]
    assert r["mcm/trl_dpo"]["value"] == 0.75 and r["mcm/trl_dpo"]["pass"]
    assert r["peak mcm / peak trl_dpo"]["value"] == 1.2 and not r["peak mcm / peak trl_dpo"]["pass"]
