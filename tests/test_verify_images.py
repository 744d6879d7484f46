"""Every image a run reads is verified before step 1 (llava.data.verify): training, inference, the cache, --skip_bad_records."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from llava.data import negatives
from llava.data.images import check_image_readable, open_image
from llava.data.records import DataError, read_records
from llava.data.verify import (SKIPPED_RECORDS, VerifiedImages, leave_out, verify_images, verify_images_everywhere,
                               write_skipped_records)
from llava.eval import inference as I
from llava.train.train import prepare
from tests.conftest import write_preference_set
from tests.test_train import argv

REPO = Path(__file__).resolve().parents[1]
INFERENCE_FIX = REPO / "tests" / "fixtures" / "inference"
FAST = ["--max_new_tokens", "4", "--num_beams", "1", "--no_progress"]


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def preference_set_with_a_truncated_last_image(folder: Path, n: int) -> Path:
    data = write_preference_set(folder, n=n)
    truncate(folder / "images" / f"img_{n - 1}.png")
    return data


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The check itself


# A PNG cut after its pixel data: its 12-byte end chunk gone (PIL's verify() raises OSError), or that
# and the pixel chunk's checksum (verify() raises SyntaxError, "broken PNG file").
@pytest.mark.parametrize("cut, error", [(12, "OSError"), (16, "SyntaxError")])
def test_verify_catches_a_png_cut_after_its_pixels_that_decodes(cut, error, tmp_path):
    data = write_preference_set(tmp_path, n=1)
    image = tmp_path / "images" / "img_0.png"
    truncate(image, keep=len(image.read_bytes()) - cut)
    record = read_records(data, "preference")[0]
    assert open_image(record, tmp_path).size == Image.open(image).size  # a decode alone accepts it
    problem = check_image_readable(record, tmp_path)
    assert (problem.file, problem.record, problem.field) == (str(data), 0, "image")
    assert problem.message.startswith(f"unreadable image images/img_0.png ({error}: ")


def test_every_bad_image_is_named_with_file_record_and_field(tmp_path):
    data = write_preference_set(tmp_path, n=5)
    truncate(tmp_path / "images" / "img_1.png")
    (tmp_path / "images" / "img_3.png").unlink()
    rows = json.loads(data.read_text())
    rows[4]["image"] = {"bytes": None, "path": None}  # the path in image_path only: that field is named
    rows[4]["image_path"] = "images/img_1.png"  # and it shares record 1's (bad) file
    data.write_text(json.dumps(rows))
    check = verify_images(read_records(data, "preference"), tmp_path, workers=3)
    assert [(p.record, p.field, p.message.split(" (")[0]) for p in check.problems] == [
        (1, "image", "unreadable image images/img_1.png"),
        (3, "image", f"image file not found: {tmp_path / 'images' / 'img_3.png'}"),
        (4, "image_path", "unreadable image images/img_1.png"),
    ]
    assert all(p.file == str(data) for p in check.problems)
    # img_1.png opened once for records 1 and 4, img_3.png missing: not opened; img_0 and img_2 verified
    assert (check.opened, check.cached, check.unreadable, check.images) == (3, 0, 1, 2)


# ---------------------------------------------------------------------------------------------
# The cache of verified files


def test_cache_spares_unchanged_files_and_verifies_changed_ones_again(tmp_path):
    data = write_preference_set(tmp_path, n=4)
    records = read_records(data, "preference")
    cache_file = tmp_path / "cache" / "verified-images.json"
    images = [tmp_path / "images" / f"img_{i}.png" for i in range(4)]

    def verify():
        cache = VerifiedImages.load(cache_file)
        check = verify_images(records, tmp_path, workers=2, cache=cache)
        cache.save()
        return check

    first = verify()
    assert (first.opened, first.cached, first.problems) == (4, 0, [])
    stored = json.loads(cache_file.read_text())
    assert stored["version"] == 1
    assert stored["files"] == {os.path.realpath(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in images}

    second = verify()
    assert (second.opened, second.cached) == (0, 4)  # nothing opened again

    st = images[0].stat()
    os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same size, newer
    truncate(images[2])  # cut: another size (and maybe the same mtime_ns)
    third = verify()
    assert (third.opened, third.cached) == (2, 2)
    assert [p.record for p in third.problems] == [2]
    files = json.loads(cache_file.read_text())["files"]
    assert files[os.path.realpath(images[0])] == [st.st_size, st.st_mtime_ns + 10**9]
    assert files[os.path.realpath(images[2])] != [images[2].stat().st_size, images[2].stat().st_mtime_ns]  # not as bad

    fourth = verify()  # the bad file is not remembered: opened (and reported) every time
    assert (fourth.opened, fourth.cached, [p.record for p in fourth.problems]) == (1, 3, [2])


def test_an_unreadable_cache_is_ignored(tmp_path):
    data = write_preference_set(tmp_path, n=2)
    cache_file = tmp_path / "verified-images.json"
    cache_file.write_text("{not json")
    check = verify_images_everywhere(read_records(data, "preference"), tmp_path, cache_path=cache_file)
    assert (check.opened, check.problems) == (2, [])
    assert len(json.loads(cache_file.read_text())["files"]) == 2  # rewritten whole


def test_the_cache_lives_in_the_users_cache_folder(monkeypatch, tmp_path):
    from llava.data.verify import default_cache_path

    monkeypatch.delenv("LLAVA_MCMDPO_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "llava-mcmdpo" / "verified-images.json"
    monkeypatch.setenv("LLAVA_MCMDPO_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_path() == tmp_path / "mine" / "verified-images.json"


# ---------------------------------------------------------------------------------------------
# Training: SFT, DPO, MCM-DPO


TASKS = {"sft": ["--task", "LM"], "dpo": ["--task", "DPO"], "mcmdpo": ["--task", "DPO", "--use_cross_modal_loss", "True"]}


@pytest.mark.parametrize("method", sorted(TASKS))
def test_training_stops_on_a_truncated_image_before_step_1(method, tiny_llava_dir, tmp_path):
    data = preference_set_with_a_truncated_last_image(tmp_path, n=4)
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        prepare(argv(tiny_llava_dir, data, out, *TASKS[method]))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{data}, record 3, field 'image': unreadable image images/img_3.png (OSError: ")
    assert message.endswith("(--skip_bad_records leaves bad records out)")
    assert not (out / "ref_logps").exists() and not (out / SKIPPED_RECORDS).exists()


def test_bad_data_is_found_before_the_model_loads(tiny_llava_dir, tmp_path):
    """A model whose weights are missing fails only when loaded: the bad image is named first."""
    data = preference_set_with_a_truncated_last_image(tmp_path, n=3)
    model = tmp_path / "model-without-weights"
    shutil.copytree(tiny_llava_dir, model, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(DataError, match=r"record 2, field 'image': unreadable image"):
        prepare(argv(model, data, tmp_path / "out", *TASKS["dpo"]))
    # the same model without the bad record: the model load is what fails, on the missing weights
    with pytest.raises(OSError, match=r"no file named model.safetensors.* found in directory .*model-without-weights"):
        prepare(argv(model, data, tmp_path / "out", *TASKS["dpo"], "--skip_bad_records", "True"))


def test_skip_bad_records_leaves_the_record_out_and_pairs_among_the_rest(tiny_llava_dir, tmp_path):
    n = 5
    data = preference_set_with_a_truncated_last_image(tmp_path, n=n)
    rows = json.loads(data.read_text())
    rows[1]["text"] = json.dumps({**json.loads(rows[1]["text"]), "chosen": " "})  # a bad field, left out too
    data.write_text(json.dumps(rows))
    out = tmp_path / "out"
    trainer = prepare(argv(tiny_llava_dir, data, out, *TASKS["mcmdpo"], "--use_image_type", "random",
                           "--skip_bad_records", "True", "--seed", "3"))
    dataset = trainer.train_dataset
    assert [r.number for r in dataset.records] == [0, 2, 3]
    listed = read_jsonl(out / SKIPPED_RECORDS)
    assert [(x["file"], x["record"], x["line"], x["field"]) for x in listed] == [(str(data), 1, None, "chosen"),
                                                                                  (str(data), 4, None, "image")]
    assert listed[0]["reason"] == "empty text" and listed[1]["reason"].startswith("unreadable image images/img_4.png")
    # the swapped contexts (and the `random` image, the same partner's) are drawn among the records kept
    for i in range(len(dataset)):
        partner = negatives.swapped_context_index(i, len(dataset), 3)
        assert partner != i and 0 <= partner < len(dataset)
        example = dataset[i]  # opens its image and its partner's
        assert example.question_l is not None and example.image_l is not None


def test_skipped_records_list_keeps_the_training_lines_when_held_out_data_join(tmp_path):
    from llava.data.records import DataProblem

    listed = tmp_path / SKIPPED_RECORDS
    write_skipped_records(listed, [DataProblem("old.json", 0, "image", "stale")])
    write_skipped_records(listed, [DataProblem("train.json", 2, "image", "gone")])  # a new run starts afresh
    write_skipped_records(listed, [DataProblem("eval.json", 1, "chosen", "empty text")], replacing="eval.json")
    write_skipped_records(listed, [DataProblem("eval.json", 3, "image", "cut")], replacing="eval.json")
    assert [(x["file"], x["record"], x["reason"]) for x in read_jsonl(listed)] == [("train.json", 2, "gone"),
                                                                                  ("eval.json", 3, "cut")]
    write_skipped_records(listed, [])
    assert not listed.exists()


def test_leave_out_keeps_the_order():
    from llava.data.records import DataProblem, Record

    records = [Record("f", i, i, None, "q") for i in range(4)]
    assert [r.number for r in leave_out(records, [DataProblem("f", 2, "image", "x"), DataProblem("g", 1, "image", "y")])] \
        == [0, 1, 3]


# ---------------------------------------------------------------------------------------------
# Inference


def inference_file_with_a_truncated_last_image(tmp_path: Path, n: int = 3) -> Path:
    """Test format T records over copies of the inference fixtures' images, the last one cut short."""
    shutil.copytree(INFERENCE_FIX / "images", tmp_path / "images")
    names = [f"img{i}.png" for i in range(n)]
    truncate(tmp_path / "images" / names[-1])
    src = tmp_path / "test.jsonl"
    src.write_text("".join(json.dumps({"image_path": name, "question": "Describe the image.", "chosen": "a picture",
                                       "idx": 10 + i}) + "\n" for i, name in enumerate(names)))
    return src



def test_inference_stops_before_generating_or_writes_error_rows(tiny_llava_dir, tmp_path, capsys):
    src = inference_file_with_a_truncated_last_image(tmp_path)
    out = tmp_path / "out.jsonl"
    base = ["--model_name", str(tiny_llava_dir), "--data_path", str(src), "--image_folder", str(tmp_path / "images"),
            "--output", str(out), *FAST]
    with pytest.raises(SystemExit) as e:
        I.main(base)
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {src}, record 2, line 3, field 'image_path': unreadable image ")
    assert errors[0].endswith("--skip_bad_records writes an error row for each and goes on)")
    assert not out.exists() or out.read_text() == ""  # nothing generated

    I.main(base + ["--skip_bad_records"])
    rows = read_jsonl(out)
    assert [r["idx"] for r in rows] == [10, 11, 12]
    assert "response" in rows[0] and "response" in rows[1]
    assert rows[2]["error"].startswith("unreadable image ") and "response" not in rows[2]
    listed = read_jsonl(I.skipped_records_path(out))
    assert [(x["file"], x["record"], x["line"], x["field"]) for x in listed] == [(str(src), 2, 3, "image_path")]
    assert "--skip_bad_records: 1 of 3 records have a bad image" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Several processes: each verifies its share, every one gets the whole verdict


@pytest.mark.slow
def test_two_processes_share_the_work_and_the_verdict(tmp_path):
    import torch.multiprocessing as mp

    from tests.verify_worker import verify_as_rank  # a light module: each process imports it

    data = write_preference_set(tmp_path / "set", n=6)
    truncate(tmp_path / "set" / "images" / "img_3.png")  # in rank 1's share (records 1, 3, 5)
    cache_file = tmp_path / "cache.json"
    mp.spawn(verify_as_rank, args=(2, str(tmp_path / "init"), str(data), str(cache_file), str(tmp_path), 2), nprocs=2)
    for run in range(2):
        results = [json.loads((tmp_path / f"rank{r}_{run}.json").read_text()) for r in range(2)]
        assert results[0] == results[1]  # the same verdict on both
        assert [p[:3] for p in results[0]["problems"]] == [[str(data), 3, "image"]]
        # the first run opens all six; rank 0 writes the cache with both shares' good files; the second
        # opens only the bad one again
        assert (results[0]["opened"], results[0]["cached"]) == ((6, 0) if run == 0 else (1, 5))
    assert len(json.loads(cache_file.read_text())["files"]) == 5
