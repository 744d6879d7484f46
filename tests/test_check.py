"""python -m llava.data.check: counts, every problem with file / record / line / field, exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llava.data.check import check_file, guess_task, main
from tests.conftest import SEED_DATA

FIXTURES = Path(__file__).parent / "fixtures" / "data"
IMAGES = FIXTURES / "images"
SEED = SEED_DATA


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


def png_bytes(size=(6, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 30)).save(buf, format="PNG")
    return buf.getvalue()


def format_a(idx, chosen="A green square.", rejected="A dog.", **image) -> dict:
    return {"idx": idx, "image": image or {"path": "red.png"},
            "text": json.dumps({"question": "Describe. Context:\nhi", "chosen": chosen, "rejected": rejected})}


# ---------------------------------------------------------------------------------------------
# Every problem, named by file, record, line and field


BAD_PREF = FIXTURES / "bad_pref.jsonl"
# (severity, record, line, field, text in the message): one problem per record of bad_pref.jsonl
BAD_PREF_PROBLEMS = [
    ("error", 1, 2, None, "unparseable line"),
    ("error", 2, 4, "rejected", "missing"),
    ("error", 3, 5, "chosen", "empty text"),
    ("error", 4, 6, "image", "image file not found"),
    ("error", 5, 7, "image", "unreadable image corrupt.png"),
    ("error", 6, 8, "rejected", "equal to chosen"),
    ("warning", 7, 9, "idx", "duplicate idx 1 (first at record 0)"),
    ("error", 8, 10, "text", "not a JSON string of question/chosen/rejected"),
    ("error", 9, 11, None, "line is not a JSON object"),
    ("error", 10, 12, "image", "no image"),
    ("warning", 11, 13, "chosen", "top-level value differs from the one inside 'text'"),
    ("error", 12, 14, "question", "missing"),
]


def expected_line(file, severity, record, line, field, text) -> str:
    where = f"{file}, record {record}" + (f", line {line}" if line else "") + (f", field '{field}'" if field else "")
    return f"{severity}: {where}: {text}"


@pytest.mark.parametrize("severity, record, line, field, text", BAD_PREF_PROBLEMS,
                         ids=[p[4].split(" (")[0].replace(" ", "_") for p in BAD_PREF_PROBLEMS])
def test_each_problem_names_file_record_line_and_field(capsys, severity, record, line, field, text):
    code, out = run(capsys, BAD_PREF, "--image_folder", IMAGES, "--task", "preference")
    assert code == 1
    wanted = expected_line(BAD_PREF, severity, record, line, field, text)
    assert any(row.startswith(wanted) for row in out.splitlines()), f"{wanted!r} not in\n{out}"


def test_bad_file_lists_every_problem_once_in_record_order_and_counts(capsys):
    code, out = run(capsys, BAD_PREF, "--image_folder", IMAGES)
    problems = [row for row in out.splitlines() if row.startswith(("error:", "warning:"))]
    assert len(problems) == len(BAD_PREF_PROBLEMS)
    for row, p in zip(problems, BAD_PREF_PROBLEMS):
        assert row.startswith(expected_line(BAD_PREF, *p)), row
    assert f"{BAD_PREF}: 13 records read: 1 ok, 10 with errors, 2 with warnings only (10 errors, 2 warnings)" in out
    assert out.splitlines()[-1] == "result: FAILED: 10 errors, 2 warnings in 1 file"
    assert code == 1


def test_test_file_problems_duplicate_idx_is_an_error_there(capsys):
    path = FIXTURES / "bad_test.jsonl"
    code, out = run(capsys, path, "--image_folder", IMAGES)
    assert code == 1
    assert f"== {path}: task test (guessed from record 0" in out
    for p in [("error", 1, 2, "idx", "duplicate idx 20 (first at record 0)"), ("error", 2, 3, "question", "missing"),
              ("warning", 3, 4, "chosen", "empty text (the reference alt-text"), ("warning", 4, 5, "idx", "no idx")]:
        assert expected_line(path, *p) in out, p
    assert "5 records read: 1 ok, 2 with errors, 2 with warnings only" in out


def test_conversation_problems(capsys):
    path = FIXTURES / "bad_conversations.json"
    code, out = run(capsys, path, "--image_folder", IMAGES)
    assert code == 1 and "task sft (guessed from record 0: it has 'conversations'" in out
    for p in [("error", 1, None, "conversations[1].value", "empty text"),
              ("error", 2, None, "conversations[2].value", "<image> outside the first turn"),
              ("error", 3, None, "conversations[0]", "each turn needs 'from' and 'value'"),
              ("error", 4, None, "conversations", "must be a non-empty list")]:
        assert expected_line(path, *p) in out, p
    assert "5 records read: 1 ok, 4 with errors, 0 with warnings only" in out


def test_warnings_alone_exit_zero(tmp_path, capsys):
    path = tmp_path / "w.json"
    path.write_text(json.dumps([format_a(1), format_a(1, path="wide.png")]))
    code, out = run(capsys, path, "--image_folder", IMAGES)
    assert code == 0
    assert expected_line(path, "warning", 1, None, "idx", "duplicate idx 1 (first at record 0)") in out
    assert "2 records read: 1 ok, 0 with errors, 1 with warnings only (0 errors, 1 warning)" in out
    assert out.splitlines()[-1] == "result: OK: 0 errors, 1 warning in 1 file"


# ---------------------------------------------------------------------------------------------
# Readers through the command


def test_parquet_with_image_bytes(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [format_a(1, bytes=png_bytes(), path="a.png"), format_a(2, bytes=b"\x89PNG broken", path="b.png")]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    code, out = run(capsys, path)
    assert code == 1
    assert expected_line(path, "error", 1, None, "image", "unreadable image <11 image bytes>") in out
    assert "2 records read: 1 ok, 1 with errors" in out


def test_datasets_directory_with_a_corrupt_image(tmp_path, capsys):
    import datasets

    features = datasets.Features({"idx": datasets.Value("int64"), "image": datasets.Image(), "text": datasets.Value("string")})
    rows = [format_a(1, bytes=png_bytes(), path=None), format_a(2, bytes=b"garbage", path="g.png")]
    path = tmp_path / "ds"
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(path))
    code, out = run(capsys, path, "--task", "preference")
    assert code == 1 and "task preference (--task)" in out
    assert expected_line(path, "error", 1, None, "image", "unreadable image") in out


@pytest.mark.parametrize("name, task", [("pref_text.json", "preference"), ("pref_flat.json", "preference"),
                                        ("test.jsonl", "test"), ("test_lines.json", "test"),
                                        ("conversations.json", "sft")])
def test_good_fixtures_are_clean_and_the_task_is_guessed(capsys, name, task):
    path = FIXTURES / name
    code, out = run(capsys, path, "--image_folder", IMAGES)
    assert code == 0, out
    assert f"== {path}: task {task} (guessed from record 0" in out
    assert "0 with errors, 0 with warnings only (0 errors, 0 warnings)" in out


def test_task_option_overrides_the_guess(capsys):
    code, out = run(capsys, FIXTURES / "pref_text.json", "--image_folder", IMAGES, "--task", "test")
    assert code == 0 and "task test (--task)" in out
    code, out = run(capsys, FIXTURES / "test.jsonl", "--image_folder", IMAGES, "--task", "preference")
    assert code == 1 and "field 'rejected': missing" in out


def test_guess_task():
    assert guess_task({"conversations": []})[0] == "sft"
    assert guess_task(format_a(1))[0] == "preference"
    assert guess_task({"question": "q", "chosen": "c", "rejected": "r"})[0] == "preference"
    assert guess_task({"question": "q", "chosen": "c"})[0] == "test"
    assert guess_task({"text": "{broken"}) is None


def test_guess_skips_rows_that_cannot_tell(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("{broken\n" + json.dumps({"idx": 1, "text": "{x"}) + "\n"
                    + json.dumps({"image_path": "red.png", "question": "q", "chosen": "c", "idx": 2}) + "\n")
    report = check_file(path, image_folder=IMAGES)
    assert report.task == "test" and report.task_note.startswith("guessed from record 2")
    assert [(p.record, p.line, p.field) for p in report.problems] == [(0, 1, None), (1, 2, "text")]


# ---------------------------------------------------------------------------------------------
# Whole files, options, exit codes


def test_missing_file_is_an_error(tmp_path, capsys):
    code, out = run(capsys, tmp_path / "nope.json")
    assert code == 1 and f"error: {tmp_path / 'nope.json'}: file not found" in out


def test_directory_that_is_not_a_datasets_directory(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    code, out = run(capsys, tmp_path / "d")
    assert code == 1 and f"error: {tmp_path / 'd'}: not a `datasets` directory" in out


def test_parquet_file_that_is_not_parquet(tmp_path, capsys):
    path = tmp_path / "x.parquet"
    path.write_text("[]")
    code, out = run(capsys, path)
    assert code == 1 and f"error: {path}: not a readable Parquet file" in out


def test_empty_file_has_no_records(tmp_path, capsys):
    path = tmp_path / "e.jsonl"
    path.write_text("\n\n")
    code, out = run(capsys, path)
    assert code == 1 and f"error: {path}: no records" in out


@pytest.mark.parametrize("argv", [[], ["--task", "dpo", "x.json"], ["x.json", "--bogus"]])
def test_usage_errors_exit_2(capsys, argv):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_image_folder_that_is_not_a_directory_is_a_usage_error(tmp_path, capsys):
    assert main([str(FIXTURES / "test.jsonl"), "--image_folder", str(tmp_path / "none")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_without_image_folder_a_hint_is_given(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out = run(capsys, FIXTURES / "test.jsonl")
    images = FIXTURES / "images"  # where the records' images are: the data file's images/ folder
    assert code == 1 and (f"field 'image_path': image file not found: {tmp_path}/red.png (no --image_folder: from the "
                          f"current directory); it is in {images}: pass --image_folder {images}") in out
    assert "hint: image paths were looked up from the current directory; pass --image_folder DIR" in out


def test_no_image_open_only_checks_existence(capsys):
    code, out = run(capsys, BAD_PREF, "--image_folder", IMAGES, "--no_image_open")
    assert "image file not found" in out and "unreadable image" not in out


def test_several_files_totals_per_task(capsys):
    code, out = run(capsys, FIXTURES / "pref_text.json", FIXTURES / "pref_flat.json", FIXTURES / "test.jsonl",
                    "--image_folder", IMAGES)
    assert code == 0
    assert "total preference: 2 files, 4 records read: 4 ok, 0 with errors, 0 with warnings only" in out
    assert "total test: 1 file, 2 records read: 2 ok" in out
    assert out.splitlines()[-1] == "result: OK: 0 errors, 0 warnings in 3 files (0 of them with errors)"


def test_module_entry_point_exit_status(tmp_path):
    """python -m llava.data.check (and the llava-check console script, which calls main) exits with main's status."""
    done = subprocess.run([sys.executable, "-m", "llava.data.check", str(FIXTURES / "bad_test.jsonl"),
                           "--image_folder", str(IMAGES)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "duplicate idx 20" in done.stdout


# ---------------------------------------------------------------------------------------------
# The published samples pass cleanly


@pytest.mark.skipif(not SEED.is_dir(), reason=f"the published samples are not at {SEED}")
@pytest.mark.parametrize("name, task", [("twitter/twitter_train.json", "preference"), ("twitter/twitter_test.json", "test"),
                                        ("pinterest/pinterest_train.json", "preference"),
                                        ("pinterest/pinterest_test.json", "test")])
def test_seed_samples_pass_cleanly(capsys, name, task):
    path = SEED / name
    folder = path.parent / "image" / path.stem
    code, out = run(capsys, path, "--image_folder", folder, "--task", task)
    assert code == 0, out
    assert f"{path}: 10 records read: 10 ok, 0 with errors, 0 with warnings only (0 errors, 0 warnings)" in out
    code, out = run(capsys, path, "--image_folder", folder)  # and the guess agrees
    assert code == 0 and f"task {task} (guessed from record 0" in out


def test_test_file_without_any_idx_gets_one_file_warning(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"image_path": "red.png", "question": "q", "chosen": "c"}) + "\n" for _ in range(3)))
    code, out = run(capsys, path, "--image_folder", IMAGES)
    assert code == 0
    assert f"warning: {path}, field 'idx': no record has an idx: outputs are matched by position only" in out
    assert "3 records read: 3 ok, 0 with errors, 0 with warnings only (0 errors, 1 warning)" in out
