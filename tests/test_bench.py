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

from tests.conftest import import_from

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
    b = _bench_module()
    params = {"language": 100, "head": 40, "projector": 10, "vision": 50, "embeddings": 1000}
    ours = {"tokens": 1000, "images": 2, "scored_positions": 30, "attention_pairs_needed": 7000, "reference_forward": False}
    trl = dict(ours, reference_forward=True)
    # multiply-adds of one forward: layers on every token, head on the scored positions, attention
    # (q.k and the weighted sum, hidden 8, 3 layers) on the pairs, projector on 576 image tokens per image
    language_forward = 100 * 1000 + 40 * 30 + 2 * 8 * 3 * 7000 + 10 * 576 * 2
    vision_forward = 50 * 577 * 2  # the frozen tower: forward only, 576 patches + the class token per image
    assert b.step_flops(params, ours, 576, hidden=8, layers=3) == 2 * (3 * language_forward + vision_forward)
    # TRL adds a forward of the reference on the same tokens and images
    assert b.step_flops(params, trl, 576, hidden=8, layers=3) == 2 * (4 * language_forward + 2 * vision_forward)
    # the ratios of that count, on these parts and at LLaVA-1.5-7B's
    tokens = {"mcm": ours, "trl_dpo": trl}
    work = b.work_ratios(tokens, params, 576, hidden=8, layers=3)
    assert work["benchmark model"] == {"mcm/trl_dpo": (3 * language_forward + vision_forward)
                                       / (4 * language_forward + 2 * vision_forward),
                                       # a whole run: the cached reference pass is one more forward of mcm's tokens
                                       "mcm+reference/trl_dpo": 1.0}
    assert 0 < work["LLaVA-1.5-7B shapes"]["mcm/trl_dpo"] < 1
    seconds = {"naive_mcm": 10.0, "mcm": 3.0, "dpo": 1.0, "trl_dpo": 4.0, "trl_dpo_stock": 8.0}
    peaks = {"naive_mcm": 900.0, "mcm": 300.0, "dpo": 200.0, "trl_dpo": 250.0, "trl_dpo_stock": 800.0}
    r = b.compute_ratios(seconds, peaks)
    assert r["mcm/naive_mcm"] == {"value": 0.3, "target": 0.12, "pass": False}
    assert r["dpo/trl_dpo"] == {"value": 0.25, "target": 0.4, "pass": True}
    assert r["mcm/trl_dpo"] == {"value": 0.75, "target": 0.8, "pass": True}
    assert r["peak mcm / peak trl_dpo"] == {"value": 1.2, "target": 0.8, "pass": False}


def _bench_module():
    return import_from(REPO / "benchmarks", "bench_step")


def test_scaling_grid_and_growth_fit(capsys):
    """One axis at a time from the base point; the fit reads exact power laws back; the table prints."""
    b = _bench_module()
    points = b.scaling_points({"image_tokens": (576, 1156, 2916), "context_tokens": (100, 400, 1600), "batch": (1, 4)})
    assert points[0] == {"image_tokens": 576, "context_tokens": 100, "batch": 1}
    assert len(points) == 6 and len({tuple(p.values()) for p in points}) == 6
    assert all(sum(p[k] != points[0][k] for k in p) == 1 for p in points[1:])
    assert abs(b.growth_per_doubling([100, 400, 1600], [3.0, 12.0, 48.0]) - 2.0) < 1e-12  # linear: x2 per doubling
    assert abs(b.growth_per_doubling([1, 4], [5.0, 80.0]) - 4.0) < 1e-12  # quadratic: x4
    assert abs(b.growth_per_doubling([576, 1156, 2916], [7.0, 7.0, 7.0]) - 1.0) < 1e-12
    fits = b.scaling_fits([{"point": p, "seconds_per_step": {v: p["context_tokens"] * p["batch"] for v in b.SCALING_VARIANTS},
                            "step_peak_mb": {v: 10.0 for v in b.SCALING_VARIANTS}} for p in points],
                          {"image_tokens": (576, 1156, 2916), "context_tokens": (100, 400, 1600), "batch": (1, 4)})
    assert {round(f["seconds"], 9) for f in fits["context_tokens"].values()} == {2.0}
    assert {round(f["seconds"], 9) for f in fits["image_tokens"].values()} == {1.0}
    assert {round(f["memory"], 9) for f in fits["batch"].values()} == {1.0}
    rows = [{"point": p, "seconds_per_step": {"mcm": 2.0, "dpo": 1.0, "trl_dpo": 4.0},
             "step_peak_mb": {"mcm": 30.0, "dpo": 20.0, "trl_dpo": 25.0}} for p in points]
    b.print_scaling({"points": rows, "fits": fits})
    out = capsys.readouterr().out
    assert out.count("   0.50\n") == 6  # mcm/trl_dpo of every point
    assert "context_tokens  mcm x2.00 t, x1.00 mem" in out
    # a run cut short before an axis moved: that axis has no fit rather than a division by zero
    assert set(b.scaling_fits(rows[:2], {"image_tokens": (576, 1156), "context_tokens": (100, 400)})) == {"image_tokens"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_scaling_table(tmp_path):
    """--scaling --quick: every grid point reports positive seconds and memory for mcm, dpo and trl_dpo,
    the token counts grow along their axes, and the growth fits are printed."""
    pytest.importorskip("trl", reason="the benchmark compares against TRL: pip install -e '.[bench]'")
    out = tmp_path / "scaling.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--scaling", "--quick", "--json", str(out)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    points = [p["point"] for p in res["points"]]
    assert points == [{"image_tokens": 576, "context_tokens": 100, "batch": 1}, {"image_tokens": 1156, "context_tokens": 100, "batch": 1},
                      {"image_tokens": 576, "context_tokens": 400, "batch": 1}, {"image_tokens": 576, "context_tokens": 100, "batch": 2}]
    for p in res["points"]:
        assert set(p["seconds_per_step"]) == {"mcm", "dpo", "trl_dpo"} and _positive(p["seconds_per_step"])
        assert set(p["step_peak_mb"]) == {"mcm", "dpo", "trl_dpo"}
    base, image, context, batch = (p["tokens_per_step"] for p in res["points"])
    for v in ("mcm", "dpo", "trl_dpo"):
        # 580 more image tokens per image row; 300 more context tokens per question; twice the records
        assert image[v] > base[v] + 500 and context[v] > base[v] + 250 and batch[v] > 1.8 * base[v]
    assert base["mcm"] > base["dpo"]
    assert set(res["fits"]) == {"image_tokens", "context_tokens", "batch"}
    assert all(f[v]["seconds"] > 0 for f in res["fits"].values() for v in ("mcm", "dpo", "trl_dpo"))
    assert "growth when the axis doubles" in proc.stdout
