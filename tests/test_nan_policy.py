"""--nan_policy: a step whose loss or gradient is not finite stops the run (naming the step, its records
and the last good checkpoint) or is skipped and counted; alone, in-process, and under DeepSpeed.

The NaN is honest: the tiny model's embedding of one token is NaN (a corrupt weight) and only one
record's answer holds that token, so exactly the batches holding that record give a NaN loss.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava.train.errors import error_line, exit_code, write_traceback
from llava.train.nonfinite import StepRecords, describe_records, gradients_finite, stop_message, verdict
from llava.train.train import main, prepare, train
from tests.conftest import write_preference_set
from tests.test_scripts import caller_dir  # noqa: F401 -- a fixture: a user's directory for the scripts' dry runs
from tests.test_train import argv, log_history

REPO = Path(__file__).resolve().parents[1]
WORD = "quixotically"  # in no other record: some of its tokens are the poisoned record's alone


# -- the pieces, alone ---------------------------------------------------------------------------


def test_verdict():
    assert verdict("stop", True) == verdict("skip", True) == "update"
    assert verdict("stop", False) == "stop"
    assert verdict("skip", False) == "skip"
    with pytest.raises(ValueError, match="--nan_policy must be one of"):
        verdict("ignore", False)


def test_step_records_blame_the_nonfinite_micro_batches_or_else_all():
    step = StepRecords()
    step.add([4, 1], loss_finite=True)
    assert step.blamed() == [4, 1]  # a gradient alone went bad: every record of the step
    step.add([7], loss_finite=False)
    step.add([2], loss_finite=True)
    assert step.seen == [4, 1, 7, 2] and step.blamed() == [7]
    step.clear()
    assert step.seen == step.nonfinite == []


def test_gradients_finite():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    assert gradients_finite([a, b])  # no gradients yet
    a.grad = torch.tensor([1.0, 2.0])
    assert gradients_finite([a, b])
    b.grad = torch.tensor([0.0, float("inf")])
    assert not gradients_finite([a, b])
    b.grad = torch.tensor([float("nan"), 0.0])
    assert not gradients_finite([a, b])


def test_records_are_named_by_file_and_place():
    class R:
        def __init__(self, source, number):
            self.source, self.number = source, number

    records = [R("a.json", 10), R("a.json", 11), R("b.json", 0)]
    assert describe_records([1, 0, 1, 2], records) == "a.json records 10, 11; b.json record 0"
    assert describe_records([3, 1]) == "records 1, 3"
    line = stop_message(7, "loss", "a.json record 10", "out/checkpoint-5")
    assert line.startswith("non-finite loss at step 7 (a.json record 10): the last good checkpoint is out/checkpoint-5; ")
    assert "no checkpoint was saved before it" in stop_message(1, "gradient", "records 0", None)


def test_error_lines(tmp_path, monkeypatch):
    from llava.data.records import DataError, DataProblem

    monkeypatch.setenv("RANK", "3")
    bad = DataError(DataProblem("d.json", 4, "image", "unreadable image"))
    assert error_line(bad, None) == "error: d.json, record 4, field 'image': unreadable image" and exit_code(bad) == 2
    try:
        raise RuntimeError("kernel failed\nmore detail")
    except RuntimeError as e:
        log = write_traceback(e, tmp_path / "out", create=True)
        assert log == tmp_path / "out" / "error-rank3.log"
        assert "Traceback" in log.read_text() and "kernel failed" in log.read_text()
        assert error_line(e, log) == f"error: RuntimeError: kernel failed (traceback in {log})" and exit_code(e) == 1
    assert write_traceback(ValueError("x"), tmp_path / "absent", create=False) is None
    assert not (tmp_path / "absent").exists()


class _BadRecord(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        from llava.data.records import DataError, DataProblem

        raise DataError(DataProblem("d.json", 4, "image", "unreadable image"))


def test_a_data_error_from_a_loader_worker_keeps_its_one_line():
    """torch's DataLoader re-raises a worker's error with the worker's traceback as its message."""
    from llava.data.records import DataError

    with pytest.raises(DataError) as e:
        next(iter(torch.utils.data.DataLoader(_BadRecord(), num_workers=1)))
    assert "Original Traceback" in str(e.value)
    assert error_line(e.value, None) == "error: d.json, record 4, field 'image': unreadable image"


# -- a tiny run meets the poisoned record -----------------------------------------------------------

GA = ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2", "--task", "LM", "--learning_rate", "1e-3"]
POSITION = 4  # the poisoned record is the 5th read: step 3, with its companion (the 6th) in the same step
STEP = POSITION // 2 + 1


@pytest.fixture(scope="module")
def poisoned(tiny_llava_dir, tmp_path_factory):
    """``(model, data, record)``: the record read at ``POSITION`` holds the one token whose embedding is NaN."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("poisoned")
    data = write_preference_set(root / "data", n=8, seed=0)  # one epoch holds every step below
    clean = prepare(argv(tiny_llava_dir, data, root / "probe", *GA, "--max_steps", "1"))
    order = [i for batch in clean.get_train_dataloader() for i in batch["index"].tolist()]  # the order the trainer reads
    record = order[POSITION]
    others = {t for i in range(len(clean.train_dataset)) if i != record for t in clean.train_dataset[i].input_ids}
    tokens = set(clean.processing_class.tokenizer(f" {WORD}", add_special_tokens=False).input_ids) - others
    assert tokens, f"every token of {WORD!r} is in another record"
    records = json.loads(data.read_text())
    text = json.loads(records[record]["text"])
    text["chosen"] += f" {WORD}"
    records[record]["text"] = json.dumps(text)
    data.write_text(json.dumps(records))
    model = root / "model"
    shutil.copytree(tiny_llava_dir, model)
    weights = load_file(model / "model.safetensors")
    (embed,) = [k for k in weights if k.endswith("embed_tokens.weight")]
    weights[embed][sorted(tokens)] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model, data, record, embed, sorted(tokens)


@pytest.mark.slow
def test_stop_names_the_step_its_records_and_the_last_checkpoint(poisoned, tmp_path, capsys):
    model, data, record, _, _ = poisoned
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(argv(model, data, out, *GA, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # the companion record of the same step had a finite loss: only the poisoned one is named
    assert err.strip().splitlines()[-1] == "error: " + stop_message(STEP, "loss", f"{data} record {record}",
                                                                      str(out / f"checkpoint-{STEP - 1}"))
    assert not (out / f"checkpoint-{STEP}").exists()
    assert "NonFiniteStep" in (out / "error-rank0.log").read_text()


@pytest.mark.slow
def test_skip_leaves_the_step_out_and_counts_it(poisoned, tmp_path):
    from safetensors.torch import load_file

    model, data, _, embed, tokens = poisoned
    out = tmp_path / "run"
    trainer = prepare(argv(model, data, out, *GA, "--max_steps", STEP + 1, "--save_strategy", "steps", "--save_steps", "1",
                           "--nan_policy", "skip"))
    train(trainer)
    logs = [h for h in log_history(out) if "loss" in h]
    assert {h["step"]: h["nan_skipped"] for h in logs} == {s: int(s == STEP) for s in range(1, STEP + 2)}
    weights = {s: load_file(out / f"checkpoint-{s}" / "model.safetensors") for s in (STEP - 1, STEP, STEP + 1)}
    for name in weights[STEP]:  # the skipped step changed nothing; the one after it trained
        torch.testing.assert_close(weights[STEP][name], weights[STEP - 1][name], rtol=0, atol=0, equal_nan=True)
    assert any(not torch.equal(weights[STEP + 1][n], weights[STEP][n]) for n in weights[STEP] if n != embed)
    optimizer = {s: torch.load(out / f"checkpoint-{s}" / "optimizer.pt", weights_only=True)["state"] for s in (STEP - 1, STEP)}
    assert [v["step"] for v in optimizer[STEP].values()] == [v["step"] for v in optimizer[STEP - 1].values()]
    for name, w in weights[STEP + 1].items():  # finite, but for the rows that were NaN from the start
        healthy = torch.ones(w.shape[0], dtype=torch.bool)
        if name == embed:
            healthy[tokens] = False
        assert torch.isfinite(w[healthy]).all(), name


@pytest.mark.slow
def test_skip_under_deepspeed_on_two_processes(poisoned, tmp_path):
    """The poisoned record is on one rank; both skip the same step (DeepSpeed drops the update itself)."""
    from safetensors.torch import load_file

    from tests.test_scripts import free_port

    model, data, _, embed, tokens = poisoned
    out = tmp_path / "run"
    flags = argv(model, data, out, "--task", "LM", "--per_device_train_batch_size", "1", "--max_steps", "3",
                 "--nan_policy", "skip", "--deepspeed", REPO / "scripts" / "zero2.json")
    launcher = Path(sys.executable).parent / "deepspeed"
    result = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "llava/train/train.py",
                             *flags], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = [h for h in log_history(out) if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    # two records a step: the 5th record read (the poisoned one) is in step 3
    assert [h["nan_skipped"] for h in logs] == [0, 0, 1]
    assert math.isinf(logs[2]["grad_norm"]) or math.isnan(logs[2]["grad_norm"])
    weights = load_file(out / "model.safetensors")
    weights[embed][tokens] = 0.0
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_the_scripts_stop_by_default_and_take_nan_policy(caller_dir):
    import shlex

    from tests.test_scripts import RELATIVE, dry_run, parsed, trainer_argv

    for env, expect in (({}, "stop"), ({"NAN_POLICY": "skip"}, "skip")):
        words = shlex.split(dry_run(caller_dir, "mcmdpo.sh", gpu_host=False, **RELATIVE, **env).stdout)
        assert parsed(trainer_argv(words))[2].nan_policy == expect
