"""scripts/ablate.sh at smoke size: rows run end to end, the best row is rerun, the table is written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_ablation(tmp_path):
    out = tmp_path / "ablate"
    env = {**os.environ, "ABLATE_SIZE": "smoke", "OUT": str(out), "PYTHON": sys.executable, "NUM_GPUS": "1",
           "ROWS": "only_image image_black", "RERUN_SEEDS": "1", "MASTER_PORT": "29533"}
    result = subprocess.run(["bash", "scripts/ablate.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for run in ("only_image/seed0", "image_black/seed0", "terms7/seed1"):
        assert (out / run / "grounding.json").is_file(), run
    assert (out / "base" / "pretrain" / "config.json").is_file()  # stage 1 ran once, shared by the rows
    table = (out / "table.md").read_text()
    assert "| only_image |" in table and "| terms7 |" in table and "| image_black |" in table
    best_rerun = [r for r in ("only_image", "image_black") if (out / r / "seed1" / "grounding.json").is_file()]
    assert len(best_rerun) == 1  # the grid's best row by key facts, and only it, gets the extra seed
