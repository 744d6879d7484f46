"""scripts/ablate.sh at smoke size: rows run end to end, rows naming the same run share it, the best row is
rerun, the table is written."""

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
           "ROWS": "only_image image_black image_diffusion paradigm_d", "RERUN_SEEDS": "1", "MASTER_PORT": "29533"}
    result = subprocess.run(["bash", "scripts/ablate.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for run in ("only_image/seed0", "image_black/seed0", "terms7/seed1"):
        assert (out / run / "grounding.json").is_file(), run
    assert (out / "base" / "pretrain" / "config.json").is_file()  # stage 1 ran once, shared by the rows
    # paradigm_d is image_diffusion's run (the default: paradigm d, diffusion, 7 terms): linked, not run again
    assert (out / "paradigm_d" / "seed0").is_symlink()
    assert (out / "paradigm_d" / "seed0").resolve() == (out / "image_diffusion" / "seed0").resolve()
    assert "paradigm_d (seed 0) is the run of" in result.stdout
    table = (out / "table.md").read_text()
    assert "| only_image |" in table and "| terms7 |" in table and "| image_black |" in table
    assert "| paradigm_d |" in table
    best_rerun = [r for r in ("only_image", "image_black", "image_diffusion", "paradigm_d")
                  if (out / r / "seed1" / "grounding.json").is_file()]
    assert len(best_rerun) == 1  # the grid's best row by key facts, and only it, gets the extra seed
    assert not (out / "terms7" / "seed1").is_symlink()
    if best_rerun[0] in ("image_diffusion", "paradigm_d"):  # the default's run: the same as terms7's
        assert (out / best_rerun[0] / "seed1").resolve() == (out / "terms7" / "seed1").resolve()
