"""Out of space while inference outputs or scores are written: one line naming the file, nothing lost.

A full disk is played by a file size limit (``ulimit -f``, RLIMIT_FSIZE) on a subprocess: a write
past it fails with EFBIG as a write to a full disk fails with ENOSPC. The same command run again
without the limit then finishes with every record exactly once, byte for byte the uninterrupted
run's output. (A checkpoint save out of space: tests/test_kill.py.)
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval import output_file as O
from llava.eval import score as S
from llava.fileio import remove_stale_temporaries, write_atomic
from tests.test_inference import FIX, IMAGES, KILL_ARGS, env, run_main

REPO = Path(__file__).resolve().parents[1]


def with_file_size_limit(limit: int):
    def apply():  # the signal a write past the limit raises is ignored: the write fails with EFBIG instead
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def run_limited(args, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env={**env(), "PYTHONDONTWRITEBYTECODE": "1"},
                          capture_output=True, text=True, timeout=600, preexec_fn=with_file_size_limit(limit))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


# -- the writer every atomic output goes through ------------------------------------------------------


def test_a_failed_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text("old")

    def fill_the_disk(f):
        f.write(b"new, half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as e:
        write_atomic(path, fill_the_disk)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(path))
    assert str(e.value) == f"[Errno {errno.ENOSPC}] No space left on device: '{path}'"
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]


def test_a_killed_atomic_write_leaves_a_temporary_file_that_is_removed(tmp_path):
    path = tmp_path / "ref_logps_1.pt"
    left = [tmp_path / ".ref_logps_1.pt.k3j2.tmp", tmp_path / ".ref_logps_1.pt.x.tmp"]
    kept = [tmp_path / ".ref_logps_2.pt.k3j2.tmp", tmp_path / "ref_logps_1.pt.tmp", path]
    for p in left + kept:
        p.write_bytes(b"x")
    assert remove_stale_temporaries(path) == left
    assert sorted(tmp_path.iterdir()) == sorted(kept)


# -- inference ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_inference_out_of_space_then_rerun_writes_every_record_once(tiny_llava_dir, tmp_path):
    files = [FIX / "pope.jsonl"]
    reference = tmp_path / "uninterrupted" / "out.jsonl"
    assert run_main(tiny_llava_dir, files, reference, *KILL_ARGS) == 0
    lines = reference.read_bytes().splitlines(keepends=True)
    limit = len(lines[0]) + len(lines[1]) // 2  # room for 1 record and half of the 2nd
    out = tmp_path / "out.jsonl"
    shutil.copy(O.identity_path(reference), O.identity_path(out))  # the run identity is written first: not this test's
    result = run_limited(["mcmdpo_inference.py", "--model_name", tiny_llava_dir, "--test_datasets", *files,
                          "--image_folder", IMAGES, "--eval_output", out, *KILL_ARGS], limit)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [f"error: cannot write {out}: File too large; the lines written before are "
                                          "kept: make room and rerun the same command to finish"]
    assert out.read_bytes() == lines[0] + lines[1][: limit - len(lines[0])]

    assert run_main(tiny_llava_dir, files, out, *KILL_ARGS) == 0
    assert out.read_bytes() == reference.read_bytes()  # every record once, in input order
    assert len(lines) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.run.json", "uninterrupted"]


# -- scores ---------------------------------------------------------------------------------------------


def test_scores_out_of_space_then_rerun_writes_them_whole(tmp_path):
    """Yes/no records: no Java needed. The files are written in this order; the first one larger than the
    limit fails, those before it are whole, it and those after are not there (no temporary file either)."""
    source = tmp_path / "yesno.jsonl"
    source.write_bytes((REPO / "tests/fixtures/eval/yesno.jsonl").read_bytes())
    expected, out = tmp_path / "expected", tmp_path / "out"
    assert S.main(["--file", str(source), "--out_dir", str(expected)]) == 0
    order = ["yesno_score.jsonl", "scores.json", "scores.csv", "scores.md"]
    sizes = {name: (expected / name).stat().st_size for name in order}
    limit = sizes["scores.json"] - 1
    failing = next(name for name in order if sizes[name] > limit)

    result = run_limited(["get_score.py", "--file", source, "--out_dir", out], limit)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [f"error: cannot write {out / failing}: File too large; make room and rerun "
                                          "the same command"]
    written = order[: order.index(failing)]
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    for name in written:
        assert (out / name).read_bytes() == (expected / name).read_bytes()

    assert S.main(["--file", str(source), "--out_dir", str(out)]) == 0
    for name in order:
        assert (out / name).read_bytes() == (expected / name).read_bytes(), name
    samples = [json.loads(line) for line in (out / "yesno_score.jsonl").read_text().splitlines()]
    assert len(samples) == len((REPO / "tests/fixtures/eval/yesno.jsonl").read_text().strip().splitlines())
