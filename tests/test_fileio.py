"""llava.fileio: the JSON Lines reader and the atomic writer every module uses."""

from __future__ import annotations

import json
import os
import stat

import pytest

from llava.fileio import iter_jsonl, not_an_object, write_atomic


def test_lines_numbers_values_and_problems():
    data = b"\n".join([
        b'{"a": 1}',
        b"",
        b"   ",
        b'{"a": ',
        b"[1, 2]",
        b'{"a": "caf\xe9"}',  # latin-1, not UTF-8
        b'{"b": 2}\r',  # CRLF
    ]) + b"\n"
    lines = list(iter_jsonl(data))
    assert [(ln.number, ln.is_object) for ln in lines] == [(1, True), (4, False), (5, False), (6, False), (7, True)]
    assert lines[0].value == {"a": 1} and lines[0].raw == b'{"a": 1}'
    assert lines[1].problem.startswith("not valid JSON (Expecting value at column")
    assert lines[2].problem is None and lines[2].value == [1, 2]
    assert not_an_object(lines[2].value) == "not a JSON object (a list)"
    assert lines[3].problem.startswith("not UTF-8 (") and lines[3].value is None
    assert lines[4].value == {"b": 2} and lines[4].raw == b'{"b": 2}\r'


def test_unicode_separators_stay_inside_their_line_and_a_bom_is_not_data():
    text = "first\u2028second\x85third"
    data = "\ufeff" + "\n".join(json.dumps({"q": text, "i": i}, ensure_ascii=False) for i in range(2))
    lines = list(iter_jsonl(data.encode("utf-8")))
    assert [(ln.number, ln.value) for ln in lines] == [(1, {"q": text, "i": 0}), (2, {"q": text, "i": 1})]


@pytest.mark.parametrize("content, expected", [
    ("caf\u00e9\n", "caf\u00e9\n".encode()),
    (b"\x00\x01", b"\x00\x01"),
    ([b"a", b"b", b"c"], b"abc"),
    (lambda f: f.write(b"written by a function"), b"written by a function"),
])
def test_write_atomic_takes_text_bytes_chunks_or_a_writer(tmp_path, content, expected):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    write_atomic(path, content)
    assert path.read_bytes() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary file left


def test_write_atomic_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def chunks():
        yield b"half"
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_atomic(path, chunks())
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_write_atomic_gives_the_mode_a_plain_open_would(tmp_path):
    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "f", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644
