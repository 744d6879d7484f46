"""Every output knows what made it (issue 24): training's run identity and lock, the model fingerprint, and
records that llava-check finds exactly where training would stop. Inference's side: tests/test_inference.py;
get_score's: tests/test_score.py."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os

import pytest

from llava.data.check import main as check_main
from llava.fingerprint import model_fingerprint
from llava.train.train import main as train_main
from tests.conftest import write_preference_set


def argv(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--image_folder", str(data.parent),
            "--output_dir", str(out), "--report_to", "none", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--seed", "0", "--dataloader_num_workers", "0", "--max_steps", "1", *map(str, extra)]


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(args, capsys) -> str:
    """What a training run stops with (exit status 2): one line per problem."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err, err
    return err


def test_model_fingerprint_covers_every_byte_and_is_cached(tmp_path):
    """Two models that differ only in the middle of a 3 MiB weight file (the old fingerprint read the first and
    last MiB) differ; a file unchanged in path, size and mtime is not read again."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, middle in ((a, b"\0"), (b, b"\1")):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"x" * (3 << 19) + middle + b"y" * (3 << 19))
    assert model_fingerprint(a) != model_fingerprint(b)
    expected = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        expected.update(f"{name}\0{hashlib.sha256((a / name).read_bytes()).hexdigest()}\n".encode())
    assert model_fingerprint(a) == expected.hexdigest()

    weights = b / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as f:  # rewritten in place, size and mtime restored: only the cache can tell
        f.seek(3 << 19)
        f.write(b"\0")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_fingerprint(b) != model_fingerprint(a)  # the cached digest: the file was not read again
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert model_fingerprint(b) == model_fingerprint(a)  # a new mtime: read again


@pytest.mark.slow
def test_an_output_dir_continues_only_its_own_run(tiny_llava_dir, tmp_path, capsys, caplog):
    """Symptoms 3 and 4: another run's OUTPUT_DIR, a directory of other files and a directory in use are refused
    in one line, before the model loads, with nothing changed; settings that do not change the result do not count."""
    caplog.set_level(logging.INFO, logger="llava.train")
    data = write_preference_set(tmp_path / "data", n=4, seed=1)
    out = tmp_path / "run"
    sft = argv(tiny_llava_dir, data, out, "--task", "LM", "--save_strategy", "steps", "--save_steps", "1",
               "--resume_from_checkpoint", "auto")
    train_main(sft)
    identity = json.loads((out / "run.json").read_text())["identity"]
    assert identity["--loss"] == "sft" and identity["model"] == model_fingerprint(tiny_llava_dir)
    assert json.loads((out / "checkpoint-1" / "run.json").read_text())["identity"] == identity
    before = snapshot(out)

    dpo = argv(tiny_llava_dir, data, out, "--task", "DPO", "--beta", "0.5", "--learning_rate", "1e-3",
               "--save_strategy", "steps", "--save_steps", "1", "--resume_from_checkpoint", "auto")
    assert refused(dpo, capsys).endswith(
        f"--output_dir {out} holds another run (differs in --beta, --learning_rate, --loss, conditions, forward): use another "
        "--output_dir, or --overwrite_output_dir to start afresh there")
    assert snapshot(out) == before

    assert "holds files no training run of this tool wrote (images, preference.json)" in \
        refused(argv(tiny_llava_dir, data, data.parent, "--task", "LM"), capsys)

    # a run holding the lock: refused naming it; once it is gone, its lock file is taken over
    lock = out / ".lock"
    lock.write_text("otherhost 4242\n")
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = refused(sft, capsys)
    assert err.endswith(f"another run is writing --output_dir {out}: PID 4242 on otherhost holds {lock}; wait for it to "
                        "finish, or write elsewhere")
    caplog.clear()
    # logging, saving and workers do not change the result: the finished run is found finished
    train_main(sft + ["--logging_steps", "5", "--save_total_limit", "3", "--dataloader_num_workers", "1"])
    assert f"taking over the lock {lock} left by PID 4242 on otherhost, which no longer runs" in caplog.text
    assert "nothing to train" in caplog.text
    # the same run again: its files as they were, its log appended to (train.log keeps every attempt)
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "train.log"} == \
        {k: v for k, v in before.items() if k not in (".lock", "train.log")} and not lock.exists()
    assert (out / "train.log").read_text().count("nothing to train") == 1

    train_main(dpo + ["--overwrite_output_dir", "True"])  # the way on: afresh, the SFT checkpoint removed first
    assert json.loads((out / "run.json").read_text())["identity"]["--loss"] == "dpo"
    assert json.loads((out / "checkpoint-1" / "run.json").read_text())["identity"]["--beta"] == 0.5


def bad_records_file(folder):
    """Six preference records; 1: <image> in an answer, 2: a lone surrogate in the question, 3: an answer too
    long for --model_max_length 512, 4: a literal </s> in an answer (a warning)."""
    data = write_preference_set(folder, n=6, seed=2)
    rows = json.loads(data.read_text())

    def edit(i, **fields):
        text = json.loads(rows[i]["text"])
        rows[i]["text"] = json.dumps({**text, **fields})

    edit(1, chosen="a chart <image> of sales")
    edit(2, question="Describe the image. Context:\nhi \ud83d there")
    edit(3, chosen=" ".join(["word"] * 600))
    edit(4, chosen="a red circle</s> on a sign")
    data.write_text(json.dumps(rows))
    return data


@pytest.mark.slow
def test_records_the_check_finds_are_where_training_stops(tiny_llava_dir, tmp_path, capsys, caplog):
    """Symptom 7: llava-check names each record training would stop on, training stops on the same records before
    the model loads, and --skip_bad_records leaves them out, counted and listed."""
    data = bad_records_file(tmp_path / "data")
    code = check_main([str(data), "--image_folder", str(data.parent), "--task", "sft", "--model_name_or_path",
                       str(tiny_llava_dir), "--model_max_length", "512"])
    report = capsys.readouterr().out
    assert code == 1
    assert f"error: {data}, record 1, field 'chosen': <image> in an answer: one image placeholder more than the " \
           "record has images" in report
    assert f"error: {data}, record 2, field 'question': unencodable text: a lone surrogate U+D83D at character 32" in report
    assert f"error: {data}, record 3, field 'chosen': the answer cannot fit --model_max_length 512: " in report
    assert f"warning: {data}, record 4, field 'chosen': special-token literal </s>" in report
    assert "3 with errors, 1 with warnings only" in report

    out = tmp_path / "run"
    flags = argv(tiny_llava_dir, data, out, "--task", "LM", "--model_max_length", "512")
    err = refused(flags, capsys)
    assert [line.removeprefix("error: ").split(": ")[0] for line in err.splitlines()] == [
        f"{data}, record 1, field 'chosen'", f"{data}, record 2, field 'question'", f"{data}, record 3, field 'chosen'"]
    assert not out.exists()  # stopped before anything was written (or any model loaded)

    # the published layout too: the original format's processor is built without reading its weights
    from llava.model.convert import main as convert

    orig = tmp_path / "orig"
    convert(["to-original", "--src", str(tiny_llava_dir), "--out", str(orig)])
    assert check_main([str(data), "--image_folder", str(data.parent), "--task", "sft", "--model_name_or_path", str(orig),
                       "--model_max_length", "512"]) == 1
    assert f"error: {data}, record 3, field 'chosen': the answer cannot fit --model_max_length 512: " in capsys.readouterr().out
    err = refused(argv(orig, data, tmp_path / "run_orig", "--task", "LM", "--model_max_length", "512"), capsys)
    assert f"{data}, record 3, field 'chosen'" in err and not (tmp_path / "run_orig").exists()

    caplog.set_level(logging.INFO, logger="llava.train")
    train_main(flags + ["--skip_bad_records", "True"])
    skipped = [json.loads(line) for line in (out / "skipped_records.jsonl").read_text().splitlines()]
    assert [(s["record"], s["field"]) for s in skipped] == [(1, "chosen"), (2, "question"), (3, "chosen")]
    assert "--skip_bad_records: left out 3 of 6 records" in caplog.text
    assert "1 of 4 records of" in caplog.text and "hold special-token literals" in caplog.text
    assert json.loads((out / "run.json").read_text())["identity"]["records"] == 3
