"""Tests for llava.eval.curves (training curves from trainer_state.json) and scripts/draw_figures.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest
from PIL import Image

from llava.eval import curves as C
from tests.conftest import import_from

REPO = Path(__file__).resolve().parents[1]
TERMS = ("response", "image", "context", "context_response", "image_response", "context_image", "all")
CONDITIONS = ("cw_mw_yw", "cw_mw_yl", "cw_ml_yw", "cw_ml_yl", "cl_mw_yw", "cl_mw_yl", "cl_ml_yw", "cl_ml_yl")


def _sft_entries(n: int = 12) -> list[dict]:
    return [{"epoch": s / n, "grad_norm": 1.0, "learning_rate": 2e-5 * (1 - s / n), "loss": 2.0 - 0.05 * s,
             "step": s} for s in range(1, n + 1)]


def _pref_entries(n: int = 10, mcm: bool = False, terms=TERMS) -> list[dict]:
    out = []
    for s in range(1, n + 1):
        e = {"epoch": s / n, "learning_rate": 5e-7, "loss": 0.69 - 0.01 * s, "rewards/chosen": -0.01 * s,
             "rewards/rejected": -0.03 * s, "rewards/margins": 0.02 * s, "rewards/accuracies": min(1.0, 0.5 + 0.05 * s),
             "step": s}
        if mcm:
            for i, t in enumerate(terms):
                e[f"mcm/{t}/margin"] = 0.01 * s * (i + 1)
                e[f"mcm/{t}/accuracy"] = min(1.0, 0.5 + 0.04 * s)
            for c in CONDITIONS:
                e[f"mcm/reward/{c}"] = -0.01 * s
        out.append(e)
    return out


def write_state(folder: Path, entries: list[dict], summary: bool = True) -> Path:
    """A transformers-style trainer_state.json in ``folder`` (with a final summary entry without loss)."""
    folder.mkdir(parents=True, exist_ok=True)
    history = list(entries)
    if summary:
        history.append({"epoch": 1.0, "step": entries[-1]["step"], "total_flos": 0.0, "train_loss": 0.5,
                        "train_runtime": 1.0})
    path = folder / "trainer_state.json"
    path.write_text(json.dumps({"global_step": entries[-1]["step"], "log_history": history, "epoch": 1.0}))
    return path


@pytest.fixture()
def runs(tmp_path):
    sft = tmp_path / "sft"
    write_state(sft, _sft_entries())
    dpo = tmp_path / "dpo"
    write_state(dpo, _pref_entries())
    mcm = tmp_path / "mcmdpo"
    write_state(mcm, _pref_entries(mcm=True))
    # the state only inside checkpoints: the newest (by step number, not by name) is read
    ckpt = tmp_path / "ckpt_only"
    write_state(ckpt / "checkpoint-2", _pref_entries(2, mcm=True))
    write_state(ckpt / "checkpoint-10", _pref_entries(10, mcm=True, terms=TERMS[:3]))
    (ckpt / "checkpoint-11").mkdir()  # a checkpoint without a state is ignored
    return {"SFT": sft, "DPO": dpo, "MCM-DPO": mcm, "MCM-ckpt": ckpt}


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        return im.size


def test_plot_runs_all_kinds(runs, tmp_path):
    out = C.plot_runs(runs, tmp_path / "figs" / "curves.png", smooth=3)
    assert out == tmp_path / "figs" / "curves.png" and out.is_file()
    # 8 panels (LM loss, preference loss, lr, rewards, margins, accuracies, term margins, term accuracies)
    # in a 3x3 grid; the term legend fills the empty cell, so there is no footer row
    assert C.figure_size(8, True) == (1380, 1220)
    assert _size(out) == (1380, 1220)


def test_panels_follow_the_logged_keys(runs):
    loaded = [C.Run(n, p, C.read_log(p)) for n, p in runs.items()]
    titles = [p.title for p in C._panels(loaded)]
    assert titles == ["Language-model loss (SFT)", "Preference loss", "Learning rate", "Rewards: chosen vs rejected",
                      "Reward margin (chosen − rejected)", "Reward accuracy", "MCM-DPO term margins",
                      "MCM-DPO term accuracies"]
    only_sft = [C.Run("SFT", runs["SFT"], C.read_log(runs["SFT"]))]
    assert [p.title for p in C._panels(only_sft)] == ["Language-model loss (SFT)", "Learning rate"]
    # the DPO run draws no MCM lines; the checkpoint run draws only the three terms it logged
    panels = {p.title: p for p in C._panels(loaded)}
    term_lines = [(ln.run.name, ln.key) for ln in panels["MCM-DPO term margins"].lines]
    assert {n for n, _ in term_lines} == {"MCM-DPO", "MCM-ckpt"}
    assert [k for n, k in term_lines if n == "MCM-ckpt"] == [f"mcm/{t}/margin" for t in TERMS[:3]]


def test_plot_sft_only_size(runs, tmp_path):
    out = C.plot_runs({"SFT": runs["SFT"]}, tmp_path / "sft.png")
    assert _size(out) == C.figure_size(2, False) == (920, 520)


def test_checkpoint_state_and_summary_entry(runs, tmp_path):
    assert C.find_state(runs["MCM-ckpt"]) == runs["MCM-ckpt"] / "checkpoint-10" / "trainer_state.json"
    entries = C.read_log(runs["MCM-ckpt"])
    assert [e["step"] for e in entries] == list(range(1, 11))  # the summary entry (no loss) is skipped
    # a top-level state wins over the checkpoints'
    write_state(runs["MCM-ckpt"], _pref_entries(4))
    assert C.find_state(runs["MCM-ckpt"]) == runs["MCM-ckpt"] / "trainer_state.json"
    assert len(C.read_log(runs["MCM-ckpt"])) == 4
    # a path to the file itself is accepted
    assert len(C.read_log(runs["SFT"] / "trainer_state.json")) == 12


def test_cli(runs, tmp_path):
    out = tmp_path / "cli.png"
    rc = C.main(["--runs", f"SFT={runs['SFT']}", "--out", str(out), "--smooth", "2", "--title", "SFT run"])
    assert rc == 0 and _size(out) == (920, 520)
    # as a module, in a fresh interpreter
    out2 = tmp_path / "cli2.png"
    proc = subprocess.run([sys.executable, "-m", "llava.eval.curves", "--runs", f"DPO={runs['DPO']}",
                           "--out", str(out2)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr
    # DPO alone: preference loss, lr, rewards, margins, accuracies = 5 panels in 2x3, no terms
    assert _size(out2) == C.figure_size(5, False) == (1380, 870)


def test_missing_state_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(C.CurvesError) as e:
        C.plot_runs({"X": empty}, tmp_path / "x.png")
    assert str(empty / "trainer_state.json") in str(e.value) and "no trainer_state.json" in str(e.value)
    assert not (tmp_path / "x.png").exists()
    missing = tmp_path / "does_not_exist"
    with pytest.raises(C.CurvesError, match="does_not_exist: run directory does not exist"):
        C.read_log(missing)
    rc = C.main(["--runs", f"X={missing}", "--out", str(tmp_path / "y.png")])
    err = capsys.readouterr().err
    assert rc == 2 and str(missing) in err and "does not exist" in err


def test_unparseable_and_empty_states(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "trainer_state.json").write_text("{not json")
    with pytest.raises(C.CurvesError) as e:
        C.read_log(bad)
    assert str(bad / "trainer_state.json") in str(e.value) and "not valid JSON" in str(e.value)
    (bad / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    with pytest.raises(C.CurvesError, match="no 'log_history' list"):
        C.read_log(bad)
    (bad / "trainer_state.json").write_text(json.dumps({"log_history": [{"train_runtime": 1.0, "step": 3}]}))
    with pytest.raises(C.CurvesError, match="none with 'loss'"):
        C.read_log(bad)


def test_run_specs_and_smoothing():
    assert C.parse_run("MCM-DPO=outputs/demo/mcmdpo") == ("MCM-DPO", Path("outputs/demo/mcmdpo"))
    assert C.parse_run("outputs/demo/sft") == ("sft", Path("outputs/demo/sft"))
    assert C.smooth_values([1, 2, 3, 4], 1) == [1, 2, 3, 4]
    assert C.smooth_values([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert C.smooth_values([3.0], 5) == [3.0]


def test_terms_come_from_the_method_table():
    from llava import method

    assert C.TERMS == tuple(t.name for t in method.TERMS)
    assert C.TERM_LOSERS == {t.name: t.loser for t in method.TERMS}
    assert set(C.TERM_COLORS) == set(C.TERM_LABELS) == set(C.TERMS) and len(set(C.TERM_COLORS.values())) == 7


def _draw_figures_module():
    return import_from(REPO / "scripts", "draw_figures")


def test_draw_figures_is_deterministic(tmp_path, capsys):
    # once as a script in a fresh interpreter, once in this process, at the same time
    outs = [tmp_path / "images0", tmp_path / "images1"]
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "draw_figures.py"), "--out", str(outs[0]),
                             "--demo-dir", str(tmp_path / "no_runs")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "MPLBACKEND": "Agg"})
    try:
        assert _draw_figures_module().main(["--out", str(outs[1]), "--demo-dir", str(tmp_path / "no_runs")]) == 0
        assert "synthetic log" in capsys.readouterr().out
    finally:
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "synthetic log" in stdout
    sizes = {"mcm_conditions.png": (1430, 814), "paradigms.png": (1430, 616),
             "training_curves_example.png": (1380, 1220)}
    for name, size in sizes.items():
        a, b = (o / name for o in outs)
        assert a.is_file() and _size(a) == size, name
        assert a.read_bytes() == b.read_bytes(), f"{name} differs between two runs"
        data = a.read_bytes()
        assert b"Software" not in data and b"tIME" not in data  # no tool or time stamp in the PNG


def test_draw_figures_uses_real_runs_when_present(tmp_path):
    D = _draw_figures_module()
    demo = tmp_path / "demo"
    write_state(demo / "dpo", _pref_entries())
    (demo / "sft").mkdir()  # a run folder without a state yet is left out
    path, source = D.draw_training_curves(tmp_path / "ex.png", demo)
    assert source == f"runs in {demo}" and _size(path) == C.figure_size(5, False)
    # the synthetic log looks like the trainer's: every logged key, a summary entry without loss
    states = D.synthetic_logs()
    mcm = states["MCM-DPO"]["log_history"]
    assert "loss" not in mcm[-1] and all(f"mcm/{t}/margin" in mcm[0] for t in TERMS)
    assert math.isclose(mcm[0]["loss"], math.log(2), abs_tol=0.02)


def test_committed_figures_exist():
    for name in ("mcm_conditions.png", "paradigms.png", "training_curves_example.png"):
        assert (REPO / "images" / name).is_file(), name
