"""Training killed anywhere, or out of space while it saves: the same command, run again, finishes the same.

One MCM-DPO run on a tiny model (6 records, batch 2: 3 steps an epoch; 4 steps, a checkpoint at each,
at most 2 kept, grouped sampler) is run uninterrupted in-process, and once more as the same command in
subprocesses that are stopped on purpose, each time at a named moment (``llava.train.pause_points``),
and SIGKILLed there with their whole process group:

1. during the reference pass, after 3 records: no cache is left; the rerun does the pass again;
2. while checkpoint-2 is written (its weights in, its optimizer not): only ``.tmp-checkpoint-2`` is
   half done, checkpoint-1 is the newest complete one;
3. out of space (a file size limit) while checkpoint-2's optimizer is written: one line naming the
   file, checkpoint-1 untouched, nothing left of checkpoint-2;
4. inside step 3, between its backward pass and its optimizer update (checkpoint-2 just saved);
5. then without a stop: it resumes from checkpoint-2, inside the first epoch, and finishes.

Every step's loss and the final weights then equal the uninterrupted run's, and so do the checkpoints kept.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava.train.checkpoints import newest_complete_checkpoint, steps_done
from llava.train.pause_points import ENV as PAUSE_ENV
from llava.train.train import prepare, train
from tests.conftest import write_preference_set
from tests.test_scripts import step_losses, weights
from tests.test_train import argv

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--task", "DPO", "--use_cross_modal_loss", "True", "--max_steps", "4", "--learning_rate", "1e-3",
         "--group_by_modality_length", "True", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2",
         "--resume_from_checkpoint", "auto"]


def command(model, data, out):
    return [sys.executable, "-m", "llava.train.train", *argv(model, data, out, *FLAGS)]


def launch(cmd, log: Path, pause: str | None = None, file_limit: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = pause

    def limit_file_size():  # a write past the limit fails with EFBIG (the signal it would raise is ignored)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=limit_file_size if file_limit else None)


def kill_when_paused(cmd, log: Path, pause: str) -> None:
    """Run until the process stops itself at ``pause``, then SIGKILL its process group there."""
    proc = launch(cmd, log, pause=pause)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the run did not reach {pause}:\n{log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(cmd, log: Path, **kw) -> tuple[int, str]:
    proc = launch(cmd, log, **kw)
    code = proc.wait(timeout=600)
    return code, log.read_text()


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_killed_or_out_of_space_anywhere_the_same_command_finishes_the_same(tiny_llava_dir, tmp_path):
    data = write_preference_set(tmp_path / "data", n=6, seed=1)
    full = tmp_path / "full"
    train(prepare(argv(tiny_llava_dir, data, full, *FLAGS)))
    run = tmp_path / "run"
    cmd = command(tiny_llava_dir, data, run)
    cache_files = lambda: sorted((run / "ref_logps").glob("*"))  # noqa: E731

    # 1. the reference pass
    kill_when_paused(cmd, tmp_path / "1.log", "reference:3")
    assert cache_files() == [] and not list(run.glob("checkpoint-*"))

    # 2. the save of checkpoint-2
    kill_when_paused(cmd, tmp_path / "2.log", "save:2")
    assert "no complete checkpoint" in (tmp_path / "2.log").read_text()  # step 1 came after a full new pass
    assert [p.name for p in cache_files()] == [p.name for p in sorted((full / "ref_logps").glob("*"))]
    half = run / ".tmp-checkpoint-2"
    assert (half / "model.safetensors").is_file() and not (half / "optimizer.pt").exists()
    assert not (run / "checkpoint-2").exists() and newest_complete_checkpoint(run) == run / "checkpoint-1"

    # 3. out of space while checkpoint-2's optimizer state is written (every other file of it fits)
    sizes = {p.name: p.stat().st_size for p in newest_complete_checkpoint(full).iterdir() if p.is_file()}
    optimizer = sizes.pop("optimizer.pt")
    assert max(sizes.values()) < optimizer
    limit = (max(sizes.values()) + optimizer) // 2
    before = snapshot(run / "checkpoint-1")
    code, log = finish(cmd, tmp_path / "3.log", file_limit=limit)
    assert code == 2, log[-3000:]
    assert "removed 1 unfinished checkpoint save(s) of a killed run: .tmp-checkpoint-2" in log
    assert "Traceback" not in log
    (error,) = [line for line in log.splitlines() if "error" in line.lower()]  # splitlines: at tqdm's \r too
    assert error == (f"error: checkpoint {run / 'checkpoint-2'} was not saved: writing {half / 'optimizer.pt'} failed (the "
                     f"file size limit of {limit} bytes (ulimit -f) was reached); {run / 'checkpoint-1'} is the newest "
                     "complete checkpoint: make room and rerun the same command to continue")
    assert snapshot(run / "checkpoint-1") == before
    assert not half.exists() and not (run / "checkpoint-2").exists()

    # 4. inside step 3
    kill_when_paused(cmd, tmp_path / "4.log", "step:3")
    assert f"resuming from {run / 'checkpoint-1'}" in (tmp_path / "4.log").read_text()
    assert newest_complete_checkpoint(run) == run / "checkpoint-2" and steps_done(run / "checkpoint-2") == 2

    # 5. to the end
    code, log = finish(cmd, tmp_path / "5.log")
    assert code == 0, log[-3000:]
    assert f"resuming from {run / 'checkpoint-2'}" in log
    expected, resumed = step_losses(full), step_losses(run)
    assert sorted(resumed) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    a, b = weights(full), weights(run)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-4"]
    assert sorted(p.name for p in full.iterdir() if "checkpoint" in p.name) == ["checkpoint-3", "checkpoint-4"]
