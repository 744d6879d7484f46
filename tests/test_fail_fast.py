"""A distributed launch fails fast: a rank that meets a bad record mid-run ends the whole launch within
seconds, with one line naming the file, record and field, and its traceback in a log file.

What the checks before step 1 find (``llava-check``: fields, lengths, images) never reaches a step, so the
record goes bad mid-run the way it does on a cluster: its image file disappears after it was verified."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava.train.train import prepare
from tests.conftest import write_preference_set
from tests.test_scripts import free_port
from tests.test_train import argv

REPO = Path(__file__).resolve().parents[1]
BOUND_S = 60  # from the failing rank's error to the launcher's exit


@pytest.mark.slow
def test_a_record_that_fails_on_one_rank_mid_run_stops_the_launch(tiny_llava_dir, tmp_path):
    data = write_preference_set(tmp_path / "data", n=8, seed=0)
    flags = ["--task", "LM", "--per_device_train_batch_size", "1", "--max_steps", "4", "--model_max_length", "128"]
    # Two ranks, one record each a step: rank r reads the records at places r, r + 2, ... of the trainer's order.
    probe = prepare(argv(tiny_llava_dir, data, tmp_path / "probe", *flags))
    order = [i for batch in probe.get_train_dataloader() for i in batch["index"].tolist()]
    # rank 1, step 3 (read while step 2 runs: the loader fetches one batch ahead); record 0 is read before
    # step 1 (the log shows it as the model sees it), so it cannot be the one
    bad = order[5] if order[5] != 0 else order[7]
    image = data.parent / json.loads(data.read_text())[bad]["image"]["path"]

    out = tmp_path / "out"
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "llava/train/train.py",
               *map(str, argv(tiny_llava_dir, data, out, *flags, "--deepspeed", REPO / "scripts" / "zero2.json"))]
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        launch = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr, start_new_session=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
        log = out / "error-rank1.log"
        started, failed = time.monotonic(), None
        while launch.poll() is None and time.monotonic() - started < 600:
            if image.exists() and "images verified" in (tmp_path / "stderr").read_text() + (tmp_path / "stdout").read_text():
                image.unlink()  # verified, not yet read: gone before its step
            if failed is None and log.exists():
                failed = time.monotonic()
            time.sleep(0.2)
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)  # the launcher and its ranks
            launch.wait()
            pytest.fail("the launch did not end within 10 minutes")
    ended = time.monotonic()
    output, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert launch.returncode == 2, output[-3000:] + err[-3000:]
    assert failed is not None and ended - failed < BOUND_S, f"{ended - failed:.0f} s after the failure"
    assert "'loss'" in output  # step 1 was trained: the record was met mid-run
    lines = [ln for ln in err.splitlines() if ln.startswith(f"error: {data}, record {bad}, ")]
    assert len(lines) == 1 and "field 'image'" in lines[0] and f"image file not found: {image}" in lines[0], err[-3000:]
    assert "Traceback" not in output + err
    traceback = log.read_text()
    assert traceback.startswith("Traceback") and "DataError" in traceback
