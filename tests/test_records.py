"""llava.data.records and llava.data.images: every reader on a real file, and the problems they name.

Each reader test reads a good record and, from a file of the same form, a bad one: the ``DataError`` of
``read_records(strict=True)`` must name the file, the record number (and the line, for JSON Lines) and
the field. Fixtures live in tests/fixtures/data (``make_fixtures.py`` writes them).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from llava.data.images import check_image_readable, missing_images, open_image
from llava.data.records import DataError, DataProblem, iter_rows, parse_row, read_records
from tests.conftest import SEED_DATA

FIXTURES = Path(__file__).parent / "fixtures" / "data"
IMAGES = FIXTURES / "images"
SEED = SEED_DATA
Q = "Given an image and context, generate alt-text for the image.Context:\n"


def png_bytes(size=(8, 8), colour=(220, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def format_a(idx, chosen="A red square.", rejected="A dog.", **image) -> dict:
    row = {"idx": idx, "text": json.dumps({"question": Q + "logo", "chosen": chosen, "rejected": rejected})}
    row["image"] = image or {"path": "red.png"}
    return row


def problem_of(path, task, record, field, line=None) -> str:
    """The message read_records(strict) raises for ``path``; asserts it names file, record, line and field."""
    with pytest.raises(DataError) as info:
        read_records(path, task)
    message = str(info.value)
    where = f"{path}, record {record}" + (f", line {line}" if line is not None else "") + f", field '{field}'"
    assert where in message, message
    return message


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Readers


def test_json_array_format_a_with_text_as_json_string(tmp_path):
    records = read_records(FIXTURES / "pref_text.json", "preference")
    assert [r.idx for r in records] == [1, 2]
    r = records[0]
    assert r.question == Q + "Our new logo!" and r.chosen == "A red square on white." and r.rejected == "A cat sleeping."
    assert r.image.path == "red.png" and r.number == 0 and r.line is None
    assert open_image(r, IMAGES).size == (8, 8)

    bad = tmp_path / "array.json"
    bad.write_text(json.dumps([format_a(1), format_a(2, chosen="")]))
    assert "empty text" in problem_of(bad, "preference", 1, "chosen")


def test_json_lines(tmp_path):
    records = read_records(FIXTURES / "test.jsonl", "test")
    assert [(r.idx, r.number, r.line) for r in records] == [(10, 0, 1), (11, 1, 2)]
    assert records[1].image.path == "wide.png" and records[1].chosen == "A blue rectangle."

    bad = write_jsonl(tmp_path / "t.jsonl", [
        {"image_path": "red.png", "question": "q", "chosen": "c", "idx": 1}, "",
        {"image_path": "red.png", "chosen": "c", "idx": 2},
    ])
    assert "missing" in problem_of(bad, "test", 1, "question", line=3)


def test_json_lines_under_a_json_name(tmp_path):
    records = read_records(FIXTURES / "test_lines.json", "test")
    assert [(r.idx, r.line) for r in records] == [(10, 1), (11, 2)]

    bad = write_jsonl(tmp_path / "lines.json", [{"image_path": "red.png", "question": "q", "chosen": 3, "idx": 1}])
    assert "must be a string, got int" in problem_of(bad, "test", 0, "chosen", line=1)


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_with_image_bytes(tmp_path):
    rows = [format_a(1, bytes=png_bytes((10, 6)), path="a.png"), format_a(2, bytes=png_bytes((4, 4)), path="b.png")]
    path = write_parquet(tmp_path / "train.parquet", rows)
    records = read_records(path, "preference")
    assert [r.idx for r in records] == [1, 2]
    assert records[0].image.data is not None and records[0].image.path is None  # bytes win over the name
    assert open_image(records[0], None).size == (10, 6)
    assert "bytes" not in records[0].output_fields()["image"]

    bad = write_parquet(tmp_path / "bad.parquet", [rows[0], format_a(2, rejected="A red square.", bytes=png_bytes())])
    assert "equal to chosen" in problem_of(bad, "preference", 1, "rejected")


def save_dataset(path: Path, rows: list[dict], dict_split: str | None = None) -> Path:
    import datasets

    features = datasets.Features({"idx": datasets.Value("int64"), "image": datasets.Image(),
                                  "text": datasets.Value("string")})
    ds = datasets.Dataset.from_list(rows, features=features)
    (datasets.DatasetDict({dict_split: ds}) if dict_split else ds).save_to_disk(str(path))
    return path


def test_datasets_directory(tmp_path):
    rows = [format_a(1, bytes=png_bytes((10, 6)), path=None), format_a(2, bytes=png_bytes(), path=None)]
    path = save_dataset(tmp_path / "ds", rows)
    records = read_records(path, "preference")
    assert [r.idx for r in records] == [1, 2] and records[1].chosen == "A red square."
    assert open_image(records[0], None).size == (10, 6)

    # a DatasetDict directory: its train split
    assert [r.idx for r in read_records(save_dataset(tmp_path / "dd", rows, "train"), "preference")] == [1, 2]

    bad = save_dataset(tmp_path / "bad", [rows[0], format_a(2, chosen=" ", bytes=png_bytes(), path=None)])
    assert "empty text" in problem_of(bad, "preference", 1, "chosen")


def test_datasets_directory_with_a_corrupt_image_reads_and_reports_it(tmp_path):
    rows = [format_a(1, bytes=b"not an image", path="x.png"), format_a(2, bytes=png_bytes(), path=None)]
    records = read_records(save_dataset(tmp_path / "ds", rows), "preference")  # decoding is left to open_image
    problem = check_image_readable(records[0], None)
    assert problem is not None and (problem.record, problem.field) == (0, "image")
    assert "unreadable image" in problem.message
    assert check_image_readable(records[1], None) is None


def test_format_a_flat_fields_beside_text_pinterest_style(tmp_path):
    flat = read_records(FIXTURES / "pref_flat.json", "preference")
    text = read_records(FIXTURES / "pref_text.json", "preference")
    assert [(r.question, r.chosen, r.rejected) for r in flat] == [(r.question, r.chosen, r.rejected) for r in text]
    assert "chosen" in flat[0].raw and "text" in flat[0].raw

    # a flat copy that disagrees with `text`: `text` wins, with a warning naming the field
    row = dict(format_a(5), chosen="Something else.")
    record, problems = parse_row(row, "f.json", 3, None, "preference")
    assert record.chosen == "A red square."
    assert [(p.severity, p.record, p.field) for p in problems] == [("warning", 3, "chosen")]

    # flat fields only (no `text`), and a missing one named
    only = tmp_path / "flat_only.json"
    only.write_text(json.dumps([{"idx": 1, "image_path": "red.png", "question": "q", "chosen": "c", "rejected": "r"},
                                {"idx": 2, "image_path": "red.png", "question": "q", "chosen": "c"}]))
    assert "missing" in problem_of(only, "preference", 1, "rejected")
    assert read_records(only, "test")[1].chosen == "c"


def test_format_t(tmp_path):
    records = read_records(FIXTURES / "test.jsonl", "test")
    assert records[0].question == Q + "Our new logo!" and records[0].rejected is None
    pope = write_jsonl(tmp_path / "pope.jsonl", [{"image_path": "red.png", "question": "Is it red?", "label": "yes", "idx": 1}])
    assert read_records(pope, "test")[0].label == "yes"
    bad = write_jsonl(tmp_path / "t.jsonl", [{"image_path": "red.png", "question": "q", "idx": 1}])
    assert "reference alt-text" in problem_of(bad, "test", 0, "chosen", line=1)


def test_conversation_format_for_sft(tmp_path):
    records = read_records(FIXTURES / "conversations.json", "sft")
    assert records[0].turns == [("<image>\nDescribe the image.", "A red square."), ("What colour is it?", "Red.")]
    assert records[0].image.path == "red.png" and records[0].idx == "c1"
    assert records[1].image is None  # text-only conversations are allowed for SFT

    bad = tmp_path / "conv.json"
    bad.write_text(json.dumps([{"id": "x", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}]))
    assert "empty text" in problem_of(bad, "sft", 0, "conversations[1].value")


def test_alt_text_records_for_sft_train_on_chosen():
    records = read_records(FIXTURES / "pref_text.json", "sft")
    assert records[0].chosen == "A red square on white." and records[0].turns is None


# ---------------------------------------------------------------------------------------------
# Whole-file problems and reading edge cases


def test_strict_read_raises_data_error_naming_file_record_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [format_a(1), format_a(2, chosen="  "), "{broken"])
    with pytest.raises(DataError) as info:
        read_records(path, "preference")
    assert f"{path}, record 1, line 2, field 'chosen': empty text" in str(info.value)
    assert f"{path}, record 2, line 3: unparseable line" in str(info.value)
    assert [(p.record, p.field) for p in info.value.problems] == [(1, "chosen"), (2, None)]
    assert [r.idx for r in read_records(path, "preference", strict=False)] == [1]  # lenient: bad rows skipped


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.json'}: file not found"):
        read_records(tmp_path / "nope.json", "preference")


def test_directory_that_is_not_a_datasets_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.json").write_text("[]")
    with pytest.raises(DataError, match="not a `datasets` directory saved with save_to_disk"):
        read_records(tmp_path / "d", "preference")


def test_parquet_file_that_is_not_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_text(json.dumps([format_a(1)]))
    with pytest.raises(DataError, match=f"{path}: not a readable Parquet file"):
        read_records(path, "preference")


def test_parquet_under_another_name_is_recognised(tmp_path):
    path = write_parquet(tmp_path / "train.data", [format_a(1, bytes=png_bytes(), path=None)])
    assert read_records(path, "preference")[0].image.data is not None


def test_empty_file_and_invalid_json_array(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(DataError, match="no records"):
        read_records(empty, "test")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"idx": 1},\n {"idx": 2,]')
    with pytest.raises(DataError, match=r"not valid JSON \(line 2"):
        read_records(broken, "test")


def test_json_lines_keep_unicode_line_separators_inside_strings(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028/U+0085 raw; they must not split a record."""
    text = "first\u2028second\x85third"
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"image_path": "red.png", "question": text, "chosen": "c", "idx": i},
                                         ensure_ascii=False) for i in range(2)) + "\n", encoding="utf-8")
    records = read_records(path, "test")
    assert [(r.question, r.line) for r in records] == [(text, 1), (text, 2)]


def test_byte_order_mark_and_crlf(tmp_path):
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([format_a(1)]).encode())
    assert read_records(array, "preference")[0].idx == 1
    lines = tmp_path / "crlf.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(format_a(i)).encode() for i in (1, 2)) + b"\r\n")
    assert [(r.idx, r.line) for r in read_records(lines, "preference")] == [(1, 1), (2, 2)]


def test_one_pretty_printed_object_is_a_clear_file_error(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(format_a(1), indent=2))
    with pytest.raises(DataError, match="one JSON object spread over several lines"):
        read_records(path, "preference")


def test_not_utf8_text(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"idx": 1, "question": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_records(path, "test")


def test_base64_image_bytes_in_json(tmp_path):
    import base64

    path = tmp_path / "b64.json"
    path.write_text(json.dumps([format_a(1, bytes=base64.b64encode(png_bytes((5, 7))).decode())]))
    assert open_image(read_records(path, "preference")[0], None).size == (5, 7)


def test_rows_report_non_objects_with_their_numbers(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [format_a(1), "[1, 2]", '"text"'])
    rows = list(iter_rows(path))
    assert isinstance(rows[0][2], dict)
    assert [(n, line, str(p)) for n, line, p in rows[1:]] == [
        (1, 2, f"{path}, record 1, line 2: line is not a JSON object"),
        (2, 3, f"{path}, record 2, line 3: line is not a JSON object"),
    ]


# ---------------------------------------------------------------------------------------------
# Images


def test_missing_and_unreadable_images_name_the_record(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([format_a(1), format_a(2, path="nope.png"), format_a(3, path="corrupt.png")]))
    records = read_records(path, "preference")
    assert check_image_readable(records[0], IMAGES) is None
    missing = check_image_readable(records[1], IMAGES)
    assert (missing.file, missing.record, missing.field) == (str(path), 1, "image") and "not found" in missing.message
    corrupt = check_image_readable(records[2], IMAGES)
    assert (corrupt.record, corrupt.field) == (2, "image") and "unreadable image corrupt.png" in corrupt.message
    assert [p.record for p in missing_images(records, IMAGES)] == [1]


def test_decompression_bomb_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8x8 = 64 > 2 * 10 pixels: PIL refuses it
    record = read_records(FIXTURES / "pref_text.json", "preference")[0]
    with pytest.raises(DataError, match="record 0, field 'image': unreadable image red.png .*DecompressionBomb"):
        open_image(record, IMAGES)


# ---------------------------------------------------------------------------------------------
# The published samples, read as they are


@pytest.mark.skipif(not SEED.is_dir(), reason=f"the published samples are not at {SEED}")
@pytest.mark.parametrize("name, task", [("twitter/twitter_train.json", "preference"), ("twitter/twitter_test.json", "test"),
                                        ("pinterest/pinterest_train.json", "preference"),
                                        ("pinterest/pinterest_test.json", "test")])
def test_seed_samples_read_as_they_are(name, task):
    path = SEED / name
    records = read_records(path, task)
    assert len(records) == 10 and len({r.idx for r in records}) == 10
    folder = path.parent / "image" / path.stem
    assert missing_images(records, folder) == []
    if name == "twitter/twitter_train.json":  # messy as published: no newline before "Context:"
        assert "image.Context:" in records[0].question
    if name == "pinterest/pinterest_train.json":  # flat copies equal to `text`: no warnings
        for r in records:
            assert parse_row(r.raw, str(path), r.number, r.line, task)[1] == []


def test_data_problem_string():
    p = DataProblem("f.jsonl", 3, "chosen", "empty text", line=5)
    assert str(p) == "f.jsonl, record 3, line 5, field 'chosen': empty text"
    assert str(DataProblem("f.json", None, None, "file not found")) == "f.json: file not found"


def test_fixtures_are_what_make_fixtures_writes(tmp_path):
    """The committed fixtures can be regenerated (same bytes for the text files)."""
    import runpy

    copy = tmp_path / "data"
    shutil.copytree(FIXTURES, copy)
    runpy.run_path(str(copy / "make_fixtures.py"), run_name="__main__")
    for f in FIXTURES.glob("*.json*"):
        assert (copy / f.name).read_bytes() == f.read_bytes(), f.name
