"""Reading alt-text records from every published format.

Formats (the file's form is detected from its name and first character):

* preference format A: ``{"image": {"path"|"bytes"}, "image_path", "idx", "text": "<JSON string of
  question/chosen/rejected>"}``, or the same with flat ``question``/``chosen``/``rejected`` fields;
* test format T: ``{"image_path", "question", "chosen", "idx"}`` (POPE-style ``label`` yes/no too);
* LLaVA's SFT conversation format: ``{"image", "conversations": [{"from": "human"|"gpt", "value"}]}``;

each as a JSON array, JSON Lines (also under a ``.json`` name), Parquet (image bytes inside) or a
``datasets`` directory (``save_to_disk``). Every problem raises or reports a ``DataProblem`` that
names the file, the record number (0-based position in the file; the line number for JSON Lines)
and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

TASKS = ("sft", "preference", "test")


@dataclass(frozen=True)
class DataProblem:
    file: str
    record: int | None  # position in the file; None for whole-file problems
    field: str | None
    message: str
    line: int | None = None  # 1-based line number for JSON Lines files
    severity: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        where = [self.file]
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.field:
            where.append(f"field '{self.field}'")
        return f"{': '.join([', '.join(where), self.message])}"


class DataError(ValueError):
    """Bad input data; ``problems`` lists every problem found (the message shows the first few)."""

    def __init__(self, problems: list[DataProblem] | DataProblem):
        self.problems = [problems] if isinstance(problems, DataProblem) else list(problems)
        lines = [str(p) for p in self.problems[:5]]
        if len(self.problems) > 5:
            lines.append(f"... and {len(self.problems) - 5} more problems (run python -m llava.data.check)")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class ImageRef:
    """Where a record's image is: a path (resolved against the image folder) or encoded bytes."""

    path: str | None = None
    data: bytes | None = None

    def describe(self) -> str:
        return self.path if self.path is not None else f"<{len(self.data or b'')} image bytes>"


@dataclass
class Record:
    """One record, whatever its format. ``number`` is its 0-based position in ``source``."""

    source: str
    number: int
    idx: Any
    image: ImageRef | None
    question: str
    chosen: str | None = None
    rejected: str | None = None
    label: str | None = None
    turns: list[tuple[str, str]] | None = None  # LLaVA conversations (SFT)
    line: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def where(self, field_name: str | None = None) -> DataProblem:
        return DataProblem(self.source, self.number, field_name, "", self.line)

    def error(self, field_name: str | None, message: str) -> DataError:
        return DataError(DataProblem(self.source, self.number, field_name, message, self.line))

    def output_fields(self) -> dict:
        """The input record as inference writes it back: everything but image bytes."""
        out = {k: v for k, v in self.raw.items() if k not in ("image_bytes",)}
        if isinstance(out.get("image"), dict) and "bytes" in out["image"]:
            out["image"] = {k: v for k, v in out["image"].items() if k != "bytes"}
        return out


# ---------------------------------------------------------------------------------------------
# Raw rows: (number, line, dict | DataProblem)


def iter_rows(path: str | Path) -> Iterator[tuple[int, int | None, dict | DataProblem]]:
    """Yield ``(record number, line number or None, row dict or DataProblem)`` for a data file."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise DataError(DataProblem(name, None, None, "file not found"))
    if path.is_dir():
        yield from _iter_dataset_dir(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        yield from _iter_json(path)


def _iter_json(path: Path) -> Iterator[tuple[int, int | None, dict | DataProblem]]:
    name = str(path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(DataProblem(name, None, None, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"))
        for i, row in enumerate(rows):
            yield i, None, row if isinstance(row, dict) else DataProblem(name, i, None, "record is not a JSON object")
        return
    number = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield number, line_no, DataProblem(name, number, None, f"unparseable line ({e.msg})", line_no)
        else:
            ok = isinstance(row, dict)
            yield number, line_no, row if ok else DataProblem(name, number, None, "line is not a JSON object", line_no)
        number += 1


def _iter_parquet(path: Path) -> Iterator[tuple[int, int | None, dict | DataProblem]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(DataProblem(str(path), None, None, f"not a readable Parquet file ({e})"))
    for i, row in enumerate(table.to_pylist()):
        yield i, None, row


def _iter_dataset_dir(path: Path) -> Iterator[tuple[int, int | None, dict | DataProblem]]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataError(DataProblem(str(path), None, None, f"not a `datasets` directory saved with save_to_disk ({e})"))
    if hasattr(ds, "keys"):  # a DatasetDict: take its only (or its train) split
        split = "train" if "train" in ds else next(iter(ds.keys()))
        ds = ds[split]
    for i, row in enumerate(ds):
        yield i, None, _plain(row)


def _plain(row: dict) -> dict:
    """datasets decodes Image features to PIL; keep bytes so every reader sees the same thing."""
    out = {}
    for k, v in row.items():
        if hasattr(v, "save") and hasattr(v, "size"):  # a PIL image
            import io

            buf = io.BytesIO()
            v.save(buf, format="PNG")
            v = {"bytes": buf.getvalue()}
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Rows to records


def _image_ref(row: dict) -> ImageRef | None:
    img = row.get("image")
    if isinstance(img, dict):
        if img.get("bytes"):
            return ImageRef(data=bytes(img["bytes"]))
        if img.get("path"):
            return ImageRef(path=str(img["path"]))
    elif isinstance(img, str) and img:
        return ImageRef(path=img)
    elif isinstance(img, (bytes, bytearray)) and img:
        return ImageRef(data=bytes(img))
    if row.get("image_bytes"):
        return ImageRef(data=bytes(row["image_bytes"]))
    if row.get("image_path"):
        return ImageRef(path=str(row["image_path"]))
    return None


def _text_fields(row: dict, problem) -> dict | None:
    """question/chosen/rejected from ``text`` (a JSON string or object) or from flat fields."""
    text = row.get("text")
    if text is None:
        return {k: row[k] for k in ("question", "chosen", "rejected") if k in row}
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as e:
            problem("text", f"not a JSON string of question/chosen/rejected ({e.msg})")
            return None
    if not isinstance(text, dict):
        problem("text", "must hold a JSON object with question, chosen and rejected")
        return None
    # flat fields, where both exist, must not silently disagree with `text`: `text` wins (the
    # released code reads `text`), flat copies fill what it lacks.
    merged = {k: row[k] for k in ("question", "chosen", "rejected") if k in row}
    merged.update({k: text[k] for k in ("question", "chosen", "rejected") if k in text})
    return merged


def _conversation_turns(row: dict, problem) -> list[tuple[str, str]] | None:
    convs = row.get("conversations")
    if not isinstance(convs, list) or not convs:
        problem("conversations", "must be a non-empty list of {from, value} turns")
        return None
    turns, human = [], None
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or "value" not in turn or "from" not in turn:
            problem(f"conversations[{j}]", "each turn needs 'from' and 'value'")
            return None
        who = str(turn["from"]).lower()
        if who in ("human", "user"):
            human = str(turn["value"])
        elif who in ("gpt", "assistant"):
            if human is None:
                problem(f"conversations[{j}]", "an assistant turn without a human turn before it")
                return None
            turns.append((human, str(turn["value"])))
            human = None
    if not turns:
        problem("conversations", "no (human, gpt) pair")
        return None
    return turns


def parse_row(row: dict, source: str, number: int, line: int | None, task: str) -> tuple[Record | None, list[DataProblem]]:
    """Turn one raw row into a ``Record`` for ``task``; return it with the problems found."""
    problems: list[DataProblem] = []

    def problem(field_name, message, severity="error"):
        problems.append(DataProblem(source, number, field_name, message, line, severity))

    image = _image_ref(row)
    turns = None
    if "conversations" in row:
        turns = _conversation_turns(row, problem)
        if turns is None:
            return None, problems
        question, chosen, rejected = turns[0][0], turns[-1][1], None
    else:
        fields = _text_fields(row, problem)
        if fields is None:
            return None, problems
        question, chosen, rejected = fields.get("question"), fields.get("chosen"), fields.get("rejected")
    label = row.get("label")

    required = {"sft": ("question", "chosen"), "preference": ("question", "chosen", "rejected"),
                "test": ("question",)}[task]
    values = {"question": question, "chosen": chosen, "rejected": rejected}
    for name in required:
        value = values[name]
        if value is None:
            hint = " (in 'text' or as a field)" if "conversations" not in row else ""
            problem(name, f"missing{hint}")
        elif not isinstance(value, str):
            problem(name, f"must be a string, got {type(value).__name__}")
        elif not value.strip():
            problem(name, "empty text")
    if task == "test" and chosen is None and label is None:
        problem("chosen", "missing (a test record needs the reference alt-text `chosen`, or a yes/no `label`)")
    if task == "preference" and isinstance(chosen, str) and chosen.strip() and chosen == rejected:
        problem("rejected", "equal to chosen: the pair carries no preference")
    if image is None and (task != "sft" or turns is None):
        problem("image", "no image (expected image.path, image_path or image.bytes)")
    if any(p.severity == "error" for p in problems):
        return None, problems
    record = Record(source, number, row.get("idx", row.get("id")), image, question, chosen, rejected,
                    label=str(label) if label is not None else None, turns=turns, line=line, raw=row)
    return record, problems


def read_records(path: str | Path, task: str, *, strict: bool = True) -> list[Record]:
    """All records of ``path`` for ``task`` (sft, preference or test).

    With ``strict`` (training, inference) the first problems raise ``DataError``; without, bad
    rows are skipped (use ``llava.data.check`` to list them).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    records, problems = [], []
    for number, line, row in iter_rows(path):
        if isinstance(row, DataProblem):
            problems.append(row)
            continue
        record, found = parse_row(row, str(path), number, line, task)
        problems += [p for p in found if p.severity == "error"]
        if record is not None:
            records.append(record)
    if strict and problems:
        raise DataError(problems)
    if strict and not records:
        raise DataError(DataProblem(str(path), None, None, "no records"))
    return records
