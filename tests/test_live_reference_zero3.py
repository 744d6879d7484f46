"""The live reference under ZeRO-3 on two processes: its weights are partitioned across the ranks, and its
log-probabilities equal the cached reference pass's (tests/live_reference_zero3.py does the run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import write_preference_set
from tests.test_scripts import free_port
from tests.test_train import argv

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_live_reference_is_sharded_and_equals_the_cached_pass(tiny_llava_dir, tmp_path):
    data = write_preference_set(tmp_path / "data", n=5, seed=2)  # odd: the ranks' shares are padded
    out = tmp_path / "out"
    flags = argv(tiny_llava_dir, data, out, "--task", "DPO", "--use_cross_modal_loss", "True", "--reference_mode", "live",
                 "--per_device_train_batch_size", "1", "--max_steps", "1", "--deepspeed", REPO / "scripts" / "zero3.json")
    launcher = Path(sys.executable).parent / "deepspeed"
    result = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
                             "tests/live_reference_zero3.py", *map(str, flags)], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / f"live-rank{r}.json").read_text()) for r in (0, 1)]
    cached = torch.tensor(ranks[0]["cached"])
    assert cached.shape == (5, 8) and torch.isfinite(cached).all()  # every record, each MCM-DPO condition
    torch.testing.assert_close(torch.tensor(ranks[1]["cached"]), cached, rtol=0, atol=0)  # every rank holds the table
    seen = set()
    for rank in ranks:
        assert rank["world"] == 2 and rank["engine"] == "DeepSpeedEngine"
        # ZeRO-3: each rank holds about half of the reference's weights, not a full copy
        assert rank["held"] <= rank["total"] / 2 + 1000, (rank["held"], rank["total"])
        for i, live in rank["live"].items():
            seen.add(int(i))
            # the same weights and inputs in two engines: equal up to float32 summation order
            torch.testing.assert_close(torch.tensor(live), cached[int(i)], rtol=1e-5, atol=1e-5)
    assert seen == set(range(5))
