"""Reading alt-text records from every published format.

Formats (the file's form is detected from its name and first character):

* preference format A: ``{"image": {"path"|"bytes"}, "image_path", "idx", "text": "<JSON string of
  question/chosen/rejected>"}``, or the same with flat ``question``/``chosen``/``rejected`` fields;
* test format T: ``{"image_path", "question", "chosen", "idx"}`` (POPE-style ``label`` yes/no too);
* LLaVA's SFT conversation format: ``{"image", "conversations": [{"from": "human"|"gpt", "value"}]}``;

each as a JSON array, JSON Lines (also under a ``.json`` name), Parquet (image bytes inside, found by
its name or its magic bytes), a ``datasets`` directory (``save_to_disk``) or, for a name that is no local
path, a hub dataset split ``org/name[:config][:split]`` (``llava.model.hub``: the image column becomes
``image``, a yes/no ``answer`` the ``label``). Every problem raises or
reports a ``DataProblem`` that names the file, the record number (0-based position in the file; the
line number too for JSON Lines) and the field. Problems are errors (the record is unusable for the
task: ``read_records`` raises, or skips it when not strict) or warnings (used as read; listed by
``python -m llava.data.check``, which also opens every image and looks for duplicate ``idx``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.fileio import iter_jsonl

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

    def __init__(self, problems: list[DataProblem] | DataProblem | str, hint: str | None = None):
        if isinstance(problems, str):  # re-raised by torch's DataLoader from a worker: the worker's traceback
            self.problems = []
            super().__init__(problems)
            return
        self.problems = [problems] if isinstance(problems, DataProblem) else list(problems)
        lines = [str(p) for p in self.problems[:5]]
        if len(self.problems) > 5:
            lines.append(f"... and {len(self.problems) - 5} more problems (run python -m llava.data.check)")
        if hint:  # on the last line: one problem stays one line
            lines[-1] += f" ({hint})"
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


PARQUET_MAGIC = b"PAR1"


def _is_parquet(path: Path) -> bool:
    """A ``.parquet`` name, or Parquet's magic bytes under any other name."""
    if path.suffix.lower() == ".parquet":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == PARQUET_MAGIC
    except OSError:
        return False


def iter_rows(path: str | Path) -> Iterator[tuple[int, int | None, dict | DataProblem]]:
    """Yield ``(record number, line number or None, row dict or DataProblem)`` for a data file."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        yield from _iter_hub_dataset(name)
    elif path.is_dir():
        yield from _iter_dataset_dir(path)
    elif _is_parquet(path):
        yield from _iter_parquet(path)
    else:
        yield from _iter_json(path)


def _iter_json(path: Path) -> Iterator[tuple[int, int | None, dict | DataProblem]]:
    name = str(path)
    try:
        data = path.read_bytes()
        # utf-8-sig: a byte-order mark (some editors and Windows tools write one) is not data.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(DataProblem(name, None, None, f"not UTF-8 text (byte {e.start}): expected JSON, JSON Lines, "
                                                      "Parquet or a `datasets` directory"))
    except OSError as e:
        raise DataError(DataProblem(name, None, None, f"cannot read ({e.strerror or e})"))
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(DataProblem(name, None, None, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"))
        for i, row in enumerate(rows):
            yield i, None, row if isinstance(row, dict) else DataProblem(name, i, None, "record is not a JSON object")
        return
    for number, line in enumerate(iter_jsonl(data)):
        if line.problem is not None:
            if number == 0 and _single_object(text):
                raise DataError(DataProblem(name, None, None, "one JSON object spread over several lines: expected a "
                                                              "JSON array of records or JSON Lines (one record a line)"))
            yield number, line.number, DataProblem(name, number, None, f"unparseable line: {line.problem}", line.number)
        elif not line.is_object:
            yield number, line.number, DataProblem(name, number, None, "line is not a JSON object", line.number)
        else:
            yield number, line.number, line.value


def _single_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _iter_parquet(path: Path) -> Iterator[tuple[int, int | None, dict | DataProblem]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=256)
        i = 0
        for batch in batches:  # batch by batch: image bytes of a large file never all sit in memory
            for row in batch.to_pylist():
                yield i, None, row
                i += 1
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(DataProblem(str(path), None, None, f"not a readable Parquet file ({e})"))


def _iter_dataset_dir(path: Path) -> Iterator[tuple[int, int | None, dict | DataProblem]]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataError(DataProblem(str(path), None, None, f"not a `datasets` directory saved with save_to_disk ({e})"))
    if hasattr(ds, "keys"):  # a DatasetDict: take its only (or its train) split
        split = "train" if "train" in ds else next(iter(ds.keys()))
        ds = ds[split]
    yield from _iter_dataset(ds)


def _iter_hub_dataset(name: str) -> Iterator[tuple[int, int | None, dict | DataProblem]]:
    """A hub dataset split (``org/name[:config][:split]``, see ``llava.model.hub``), or "file not found"."""
    from llava.model.hub import HubError, hub_dataset, load_hub_dataset

    try:
        found = hub_dataset(name)
        if found is None:
            raise DataError(DataProblem(name, None, None, "file not found"))
        ds = load_hub_dataset(found)
    except HubError as e:
        raise DataError(DataProblem(name, None, None, f"no such file, and as a hub dataset: {e.reason}"))
    yield from _iter_dataset(_hub_columns(ds))


def _hub_columns(ds):
    """Hub datasets name things their own way: the image column becomes ``image``; a bare ``answer``
    (POPE, VQA sets) becomes the yes/no ``label`` or, for other answers, the reference ``chosen``."""
    from datasets import Image

    if "image" not in ds.column_names:
        image_columns = [c for c, f in ds.features.items() if isinstance(f, Image)]
        if image_columns:
            ds = ds.rename_column(image_columns[0], "image")
    if "answer" in ds.column_names and not {"label", "chosen", "text", "conversations"} & set(ds.column_names):
        answers = {str(a).strip().lower() for a in ds["answer"]}
        ds = ds.rename_column("answer", "label" if answers <= {"yes", "no"} else "chosen")
    return ds


def _iter_dataset(ds) -> Iterator[tuple[int, int | None, dict | DataProblem]]:
    from datasets import Image

    # Keep image columns as their stored bytes/path: decoding them here would re-encode every image and
    # stop the whole file at the first corrupt one instead of reporting it on its record.
    for column, feature in ds.features.items():
        if isinstance(feature, Image) and feature.decode:
            ds = ds.cast_column(column, Image(decode=False))
    for i, row in enumerate(ds):
        yield i, None, _plain(row)


def _plain(row: dict) -> dict:
    """A decoded PIL image left in a row (an image feature not cast above) becomes PNG bytes, as the other readers give."""
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


def _as_bytes(value) -> bytes:
    """Image bytes as stored: raw (Parquet, datasets), a list of ints, or base64 text (the only way JSON holds bytes)."""
    if isinstance(value, str):
        import base64
        import binascii

        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return value.encode("utf-8", "replace")  # reported as an unreadable image where it is opened
    return bytes(value)


def image_ref(row: dict) -> ImageRef | None:
    img = row.get("image")
    if isinstance(img, dict):
        if img.get("bytes"):
            return ImageRef(data=_as_bytes(img["bytes"]))
        if img.get("path"):
            return ImageRef(path=str(img["path"]))
    elif isinstance(img, str) and img:
        return ImageRef(path=img)
    elif isinstance(img, (bytes, bytearray)) and img:
        return ImageRef(data=bytes(img))
    if row.get("image_bytes"):
        return ImageRef(data=_as_bytes(row["image_bytes"]))
    if row.get("image_path"):
        return ImageRef(path=str(row["image_path"]))
    return None


def image_field(row: dict) -> str:
    """The field a row's image comes from (as ``image_ref`` reads it): ``image``, or ``image_bytes``/``image_path``
    when ``image`` holds none (absent, empty, or ``{"bytes": null, "path": null}``)."""
    img = row.get("image")
    if (img.get("bytes") or img.get("path")) if isinstance(img, dict) else img:
        return "image"
    for name in ("image_bytes", "image_path"):
        if row.get(name):
            return name
    return "image"


TEXT_FIELDS = ("question", "chosen", "rejected")


def text_fields(row: dict, problem) -> dict | None:
    """question/chosen/rejected from ``text`` (a JSON string or object) or from flat fields."""
    text = row.get("text")
    if text is None:
        return {k: row[k] for k in TEXT_FIELDS if k in row}
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as e:
            problem("text", f"not a JSON string of question/chosen/rejected ({e.msg}, column {e.colno})")
            return None
    if not isinstance(text, dict):
        problem("text", "must hold a JSON object with question, chosen and rejected")
        return None
    # flat fields, where both exist, must not silently disagree with `text`: `text` wins (the
    # released code reads `text`), flat copies fill what it lacks; a disagreement is a warning.
    merged = {k: row[k] for k in TEXT_FIELDS if k in row}
    for k in TEXT_FIELDS:
        if k in text:
            flat = merged.get(k)
            if flat is not None and text[k] is not None and flat != text[k]:
                problem(k, "top-level value differs from the one inside 'text'; 'text' is used", "warning")
            merged[k] = text[k]
    return merged


def _conversation_turns(row: dict, problem) -> list[tuple[str, str]] | None:
    """``(human, gpt)`` pairs of LLaVA's ``conversations``; every problem found is reported."""
    convs = row.get("conversations")
    if not isinstance(convs, list) or not convs:
        problem("conversations", "must be a non-empty list of {from, value} turns")
        return None
    turns, human, ok = [], None, True
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or "value" not in turn or "from" not in turn:
            problem(f"conversations[{j}]", "each turn needs 'from' and 'value'")
            ok = False
            if isinstance(turn, dict) and str(turn.get("from", "")).lower() in ("human", "user"):
                human = ""  # a broken human turn still opens a pair: no second message for its answer
            continue
        value = turn["value"]
        if not isinstance(value, str):
            problem(f"conversations[{j}].value", f"must be a string, got {type(value).__name__}")
            ok = False
            if str(turn["from"]).lower() in ("human", "user"):
                human = ""
            continue
        if j > 0 and DEFAULT_IMAGE_TOKEN in value:
            # The image goes into the first human turn; a placeholder anywhere else would give the
            # sequence more image slots than the record has images.
            problem(f"conversations[{j}].value", f"{DEFAULT_IMAGE_TOKEN} outside the first turn")
            ok = False
        who = str(turn["from"]).lower()
        if who in ("human", "user"):
            if human is not None:
                problem(f"conversations[{j}]", "two human turns in a row: the first has no answer")
                ok = False
            human = value
        elif who in ("gpt", "assistant"):
            if human is None:
                problem(f"conversations[{j}]", "an assistant turn without a human turn before it")
                ok = False
                continue
            if not value.strip():
                problem(f"conversations[{j}].value", "empty text")
                ok = False
            turns.append((human, value))
            human = None
        else:
            problem(f"conversations[{j}].from", f"unknown speaker {turn['from']!r} (expected human or gpt): turn ignored",
                    "warning")
    if human is not None:
        problem(f"conversations[{len(convs) - 1}]", "the last human turn has no answer: ignored", "warning")
    if ok and not turns:
        problem("conversations", "no (human, gpt) pair")
        return None
    return turns if ok else None


SPECIAL_TEXT = ("</s>", "<s>", "<unk>")  # LLaMA/Vicuna's special tokens: the tokenizer reads them as such
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(question, chosen, rejected, turns, task: str, problem) -> None:
    """What tokenizing would stop on, or silently misread, in a record's texts.

    Errors: a lone surrogate (JSON's ``"\\ud83d"`` unpaired: no encoding can write it, the tokenizer
    raises mid-run); ``<image>`` in an answer (one image placeholder more than the record has images)
    or in a test question (inference puts the image first itself). Warning: a special-token literal,
    read as that token (``</s>`` in an answer ends it early); ``--strip_special_text`` removes them.
    """
    fields = [("question", question), ("chosen", chosen), ("rejected", rejected)]
    if turns is not None:  # LLaVA conversations: the texts are the turns' (their own field names)
        fields = [(f"conversations[{2 * i + j}].value", text) for i, pair in enumerate(turns) for j, text in enumerate(pair)]
    for name, text in fields:
        if not isinstance(text, str):
            continue
        if (bad := _SURROGATE.search(text)) is not None:
            problem(name, f"unencodable text: a lone surrogate U+{ord(bad.group()):04X} at character {bad.start()} "
                          "(half of a UTF-16 pair)")
        answer = name in ("chosen", "rejected") and task != "test"
        if DEFAULT_IMAGE_TOKEN in text and (answer or (name == "question" and task == "test")):
            where = "an answer" if answer else "a test question (inference puts the image before the question itself)"
            problem(name, f"{DEFAULT_IMAGE_TOKEN} in {where}: one image placeholder more than the record has images")
        found = [t for t in SPECIAL_TEXT if t in text]
        if found:
            problem(name, f"special-token literal {', '.join(found)}: tokenized as that token (</s> ends the text); "
                          "--strip_special_text removes them", "warning")


def strip_special_text(record: Record) -> Record:
    """The record with the special-token literals (``SPECIAL_TEXT``) removed from its texts (``--strip_special_text``);
    ``raw`` is kept, so inference still writes the record back as read."""
    def strip(text):
        if not isinstance(text, str):
            return text
        for t in SPECIAL_TEXT:
            text = text.replace(t, "")
        return text

    turns = [(strip(h), strip(g)) for h, g in record.turns] if record.turns is not None else None
    return replace(record, question=strip(record.question), chosen=strip(record.chosen),
                   rejected=strip(record.rejected), turns=turns)


def parse_row(row: dict, source: str, number: int, line: int | None, task: str) -> tuple[Record | None, list[DataProblem]]:
    """Turn one raw row into a ``Record`` for ``task``; return it with the problems found.

    Problems have a severity: ``error`` (the row is unusable for ``task``; ``None`` is returned) or
    ``warning`` (the record is usable as read, but something looks wrong).
    """
    problems: list[DataProblem] = []

    def problem(field_name, message, severity="error"):
        problems.append(DataProblem(source, number, field_name, message, line, severity))

    image = image_ref(row)
    img, img_path = row.get("image"), row.get("image_path")
    if isinstance(img, dict) and img.get("path") and not img.get("bytes") and img_path and str(img["path"]) != str(img_path):
        problem("image_path", f"differs from image.path ({img['path']!r}); image.path is used", "warning")
    turns = None
    if "conversations" in row:
        turns = _conversation_turns(row, problem)
        if turns is None:
            return None, problems
        question, chosen, rejected = turns[0][0], turns[-1][1], None
    else:
        fields = text_fields(row, problem)
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
    if task == "test":
        if chosen is None and label is None:
            problem("chosen", "missing (a test record needs the reference alt-text `chosen`, or a yes/no `label`)")
        elif chosen is not None and not isinstance(chosen, str):
            problem("chosen", f"must be a string, got {type(chosen).__name__}")
        elif isinstance(chosen, str) and not chosen.strip():
            # generation does not need the reference: run, but this record cannot be scored
            problem("chosen", "empty text (the reference alt-text: this record cannot be scored)", "warning")
    if (task == "preference" and isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip()
            and chosen.strip() == rejected.strip()):
        problem("rejected", "equal to chosen: the pair carries no preference")
    if image is None and (task != "sft" or turns is None):
        problem("image", "no image (expected image.path, image_path or image.bytes)")
    check_text(question, chosen, rejected, turns, task, problem)
    if any(p.severity == "error" for p in problems):
        return None, problems
    record = Record(source, number, row.get("idx", row.get("id")), image, question, chosen, rejected,
                    label=str(label) if label is not None else None, turns=turns, line=line, raw=row)
    return record, problems


def read_records(path: str | Path, task: str, *, strict: bool = True) -> list[Record]:
    """All records of ``path`` for ``task`` (sft, preference or test).

    With ``strict`` (training, inference) the first problems raise ``DataError``; without, bad
    rows are skipped (use ``llava.data.check`` to list them, or ``read_records_checked``).
    """
    records, problems = read_records_checked(path, task)
    if strict and problems:
        raise DataError(problems)
    return records


def read_records_checked(path: str | Path, task: str) -> tuple[list[Record], list[DataProblem]]:
    """``(usable records, errors of the rows left out)`` of ``path`` for ``task``.

    A problem of the whole file (missing, not JSON, no records at all) raises ``DataError``; a bad
    row is left out and its problems returned, for the caller to stop on or to list
    (``--skip_bad_records``).
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
    if not records and not problems:
        raise DataError(DataProblem(str(path), None, None, "no records"))
    return records, problems
