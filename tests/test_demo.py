"""`make demo` at smoke size: the whole main job runs end to end, stage 1 included (CI keeps it from rotting)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_demo(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "DEMO_SIZE": "smoke", "OUT": str(out), "PYTHON": sys.executable, "MASTER_PORT": "29517"}
    result = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    table = result.stdout[result.stdout.index("| file |"):]
    for name in ("| sft |", "| dpo |", "| mcmdpo |"):
        assert name in table
    assert "stage 1: captions" in result.stdout
    for path in ("report.html", "curves.png", "scores.json", "eval/mcmdpo.jsonl", "pretrain/config.json",
                 "pretrain/trainer_state.json", "sft/config.json", "mcmdpo/trainer_state.json"):
        assert (out / path).is_file(), path
    assert f"report: {out}/report.html" in result.stdout
