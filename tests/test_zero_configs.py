"""The demo's DeepSpeed config (scripts/zero2_demo.json) is the released ZeRO-2 file with one all-reduce
bucket, the demo's stages use it, and the bucket leaves the training itself unchanged."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _settings(name: str) -> dict:
    return {k: v for k, v in json.loads((REPO / "scripts" / name).read_text()).items() if not k.startswith("_comment")}


def test_demo_config_is_the_released_zero2_but_its_bucket():
    released, demo = _settings("zero2.json"), _settings("zero2_demo.json")
    assert released["zero_optimization"].pop("reduce_bucket_size") == "auto"
    bucket = demo["zero_optimization"].pop("reduce_bucket_size")
    assert demo == released
    # one bucket holds every gradient of the demo's model (language model + tower + projector)
    from llava.model import tiny

    model, _ = tiny.build("llava", seed=0, size="small")
    assert bucket >= sum(p.numel() for p in model.parameters())


def test_demo_stages_launch_with_the_demo_config(tmp_path):
    script = ('source scripts/demo_stages.sh; demo_size smoke; DATA=data/sample VISION_TOWER=x; '
              'DRY_RUN=1 demo_stage1 lm out 0; DRY_RUN=1 demo_preference mcmdpo sft out 0')
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("ZERO", None)
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    configs = re.findall(r"--deepspeed (\S+)", out.stdout)
    assert configs == [str(REPO / "scripts" / "zero2_demo.json")] * 2


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bucket_benchmark_trains_the_same_with_either_bucket():
    env = {**os.environ, "PYTHON": sys.executable, "STEPS": "3", "MASTER_PORT": "29655"}
    env.pop("ZERO", None)
    out = subprocess.run(["bash", "benchmarks/bench_bucket.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=380)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = re.findall(r"^scripts/(zero2\w*)\.json: 3 steps in ([0-9.]+) s, loss at step 3: ([0-9.]+)$", out.stdout, re.M)
    assert [r[0] for r in runs] == ["zero2", "zero2_demo"]
    assert runs[0][2] == runs[1][2]  # the bucket changes how gradients travel, not their sum
    assert re.search(r"^ratio \(released auto bucket / one bucket\): [0-9.]+$", out.stdout, re.M)
