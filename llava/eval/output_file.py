"""The output file of batch inference (``llava.eval.inference``): its lines, resuming from it, merging into it.

The records to do (``load_items``), the output lines (``result_line``, ``dumps_line``), reading them back
(``read_lines``, which cuts off a torn last line), matching them to the records (``match_lines``), the
per-rank part files, folding everything into OUT in input order (``consolidate``) and whose OUT is
(``claim_output``: the run identity in ``OUT.run.json``). The rules of resuming and merging: docs/inference.md.
"""

from __future__ import annotations

import base64
import datetime as _dt
import glob
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llava.fileio import iter_jsonl, write_atomic

PART_SUFFIX = ".part"


class InferenceError(RuntimeError):
    """A problem reported to the user as one message (exit status 2), never as a traceback.

    ``local``: found by one process in its own share (every process reports its own); otherwise
    every process finds the same problem and only rank 0 reports it.
    """

    def __init__(self, message: str, local: bool = False):
        super().__init__(message)
        self.local = local


# ---------------------------------------------------------------------------------------------
# Records and output lines


@dataclass
class Item:
    """One input record with its place in the run: ``order`` is its position over all files."""

    order: int
    file_index: int
    key: Any  # idx, or position, within its file
    record: Any  # llava.data.records.Record
    signature: str


def _json_default(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy values
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def dumps_line(fields: dict) -> bytes:
    """One output line (with its newline) as UTF-8 bytes."""
    try:
        return (json.dumps(fields, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: escape them
        return (json.dumps(fields, ensure_ascii=True, default=_json_default) + "\n").encode("ascii")


RESULT_FIELDS = ("response", "error")


def signature_of(fields: dict) -> str:
    """What identifies a line's record: its fields without the result, canonically written."""
    return json.dumps({k: v for k, v in fields.items() if k not in RESULT_FIELDS}, sort_keys=True, ensure_ascii=True)


def record_fields(record) -> dict:
    """The record's output fields exactly as they read back from a written line."""
    return json.loads(dumps_line(record.output_fields()))


def result_line(record, response: str | None = None, error: str | None = None) -> bytes:
    fields = {k: v for k, v in record.output_fields().items() if k not in RESULT_FIELDS}
    if error is not None:
        fields["error"] = error
    else:
        fields["response"] = response
    return dumps_line(fields)


def load_items(paths: Sequence[str], strip_special: bool = False, left_out: list | None = None) -> list[Item]:
    """Every record of every test file, in order; a ``DataError`` lists the problems of all files.

    ``strip_special``: special-token literals removed from the texts (``--strip_special_text``).
    ``left_out``: a list to collect the problems of bad records into, leaving those records out
    (``--skip_bad_records``), instead of stopping on them; a bad file still stops."""
    from llava.data.records import DataError, read_records_checked, strip_special_text

    items: list[Item] = []
    problems = []
    for fi, path in enumerate(paths):
        try:
            records, bad = read_records_checked(path, "test")
        except DataError as e:
            problems += e.problems
            continue
        if bad and left_out is not None:
            left_out += bad
        else:
            problems += bad
        ids = [r.idx for r in records]
        by_idx = all(i is not None for i in ids) and len({json.dumps(i, sort_keys=True, default=str) for i in ids}) == len(ids)
        for pos, r in enumerate(records):
            r = strip_special_text(r) if strip_special else r
            items.append(Item(len(items), fi, r.idx if by_idx else pos, r, signature_of(record_fields(r))))
    if problems:
        raise DataError(problems)
    return items


@dataclass
class Line:
    source: Path
    number: int  # 1-based line number in its file
    data: bytes  # with its newline
    fields: dict

    @property
    def is_response(self) -> bool:
        return "response" in self.fields


def read_lines(path: Path, *, truncate_torn: bool) -> tuple[list[Line], list[str]]:
    """Complete, parseable lines of ``path`` and warnings about the rest.

    A last line without its newline is torn (a write cut short): with ``truncate_torn`` the file
    is cut back to the end of the last complete line.
    """
    if not path.exists():
        return [], []
    data = path.read_bytes()
    warnings = []
    end = data.rfind(b"\n") + 1  # 0 when there is no complete line
    if end < len(data):
        warnings.append(f"{path}: dropping a torn last line ({len(data) - end} bytes); its record is redone")
        if truncate_torn:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
    lines = []
    for line in iter_jsonl(data[:end]):
        if not line.is_object or not any(k in line.value for k in RESULT_FIELDS):
            warnings.append(f"{path}, line {line.number}: not an output line (unparseable or without response/error); dropped")
            continue
        lines.append(Line(path, line.number, line.raw + b"\n", line.value))
    return lines, warnings


@dataclass
class Matched:
    """Output lines assigned to input items."""

    best: dict[int, Line]  # item order -> the line kept for it (a response line when there is one)
    clean_in_order: bool  # the lines are exactly one per matched item, in input order, nothing dropped
    dropped: int  # duplicate or superseded lines

    def done(self) -> set[int]:
        return {o for o, line in self.best.items() if line.is_response}


def match_lines(items: Sequence[Item], lines: Sequence[Line], warnings: Sequence[str] = ()) -> Matched:
    """Assign each line to the record it was written for (see the module docstring).

    Raises ``InferenceError`` for a line that matches no record.
    """
    by_sig: dict[str, list[int]] = defaultdict(list)
    for it in items:
        by_sig[it.signature].append(it.order)
    grouped: dict[str, list[Line]] = defaultdict(list)
    for line in lines:
        sig = signature_of(line.fields)
        if sig not in by_sig:
            shown = json.dumps({k: v for k, v in line.fields.items() if k not in RESULT_FIELDS}, ensure_ascii=False)
            raise InferenceError(
                f"{line.source}, line {line.number}: matches no record of the test files ({shown[:200]}): "
                "it is the output of another command or the test files changed; "
                "use another --eval_output, or --overwrite to discard it"
            )
        grouped[sig].append(line)
    best: dict[int, Line] = {}
    dropped = 0
    for sig, group in grouped.items():
        responses = [ln for ln in group if ln.is_response]
        errors = [ln for ln in group if not ln.is_response]
        for order in by_sig[sig]:
            if responses:
                best[order] = responses.pop(0)
            elif errors:
                best[order] = errors.pop(0)
        dropped += len(responses) + len(errors)
    kept_orders = sorted(best, key=lambda o: (str(best[o].source), best[o].number))
    clean = not warnings and dropped == 0 and len({ln.source for ln in lines}) <= 1 and kept_orders == sorted(best)
    return Matched(best, clean, dropped)


# ---------------------------------------------------------------------------------------------
# Writing: part files and merging


def append_lines(f, path: Path, data: bytes) -> None:
    """Append whole output lines to ``f`` (``path`` opened unbuffered) and flush them to disk.

    A write that fails (a full disk, a quota, a file size limit) may leave part of a line, which the
    next run cuts off (``read_lines``) and redoes; it stops this run with one message naming the file.
    The file is unbuffered so that nothing is left in a buffer to fail again when it is closed.
    """
    try:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
        os.fsync(f.fileno())
    except OSError as e:
        raise InferenceError(f"cannot write {path}: {e.strerror or e}; the lines written before are kept: "
                             "make room and rerun the same command to finish", local=True) from None


def part_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{glob.escape(out.name)}.rank*{PART_SUFFIX}"))


def merge_tmp(out: Path) -> Path:
    """The temporary file that earlier versions of this module merged into: removed where a killed run left it."""
    return out.with_name(out.name + ".merge.tmp")


def part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}{PART_SUFFIX}")


def scan_outputs(out: Path, items: Sequence[Item], *, include_parts: bool, truncate_torn: bool, log) -> tuple[Matched, list[Path]]:
    """Read OUT (and the part files), match their lines to ``items``; report dropped lines."""
    lines, warnings = read_lines(out, truncate_torn=truncate_torn)
    parts = part_files(out) if include_parts else []
    for p in parts:
        more, warn = read_lines(p, truncate_torn=False)
        lines += more
        warnings += warn
    for w in warnings:
        log(f"warning: {w}")
    matched = match_lines(items, lines, warnings)
    if parts:
        matched.clean_in_order = False
    return matched, parts


def consolidate(out: Path, items: Sequence[Item], log, *, final: bool) -> Matched:
    """Fold the part files into OUT and put OUT in input order when it is not already.

    ``final``: every item must have a line (else nothing is removed and an error is raised).
    """
    stale = merge_tmp(out)
    if stale.exists():
        stale.unlink()
    matched, parts = scan_outputs(out, items, include_parts=True, truncate_torn=True, log=log)
    if final:
        missing = [it for it in items if it.order not in matched.best]
        if missing:
            it = missing[0]
            raise InferenceError(f"{len(missing)} record(s) have no output line (first: {it.record.source}, record "
                                 f"{it.record.number}); rerun the same command to finish them")
    if matched.dropped:
        log(f"note: {matched.dropped} duplicate or superseded line(s) left out of {out}")
    if not matched.clean_in_order:
        try:
            write_atomic(out, (matched.best[o].data for o in sorted(matched.best)))
        except OSError as e:  # OUT and the part files are as they were: a rerun merges them again
            raise InferenceError(f"cannot write {out}: {e.strerror or e}; nothing was lost: make room and rerun "
                                 "the same command to finish") from None
    for p in parts:
        p.unlink()
    return matched


# ---------------------------------------------------------------------------------------------
# Whose output: the run identity beside OUT


def identity_path(out: Path) -> Path:
    """``OUT.run.json``: the settings that made OUT's lines (``inference.run_identity``)."""
    return out.with_name(out.name + ".run.json")


def differing(saved: dict, current: dict) -> list[str]:
    """The settings, by name, whose values differ between two run identities."""
    return sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))


def refuse_input_as_output(out: Path, inputs: Sequence[str]) -> None:
    """An output path that is one of the test files would be written over (``--eval_output`` = ``--data_path``)."""
    for name in inputs:
        if Path(name).exists() and Path(name).resolve() in {p.resolve() for p in (out, identity_path(out))}:
            raise InferenceError(f"--eval_output {out} is the input file {name}: it would be written over; "
                                 "choose another --eval_output")


def foreign_line(out: Path) -> str | None:
    """Where OUT holds something that is not an inference output line (a torn last line aside), or None."""
    data = out.read_bytes() if out.is_file() else b""
    end = data.rfind(b"\n") + 1
    for line in iter_jsonl(data[:end]):
        if not line.is_object or not any(k in line.value for k in RESULT_FIELDS):
            return f"line {line.number}"
    return "its only line" if end == 0 and data.strip() else None


def claim_output(out: Path, identity: dict, overwrite: bool, log) -> None:
    """Make OUT this run's: resume it only when its identity (``OUT.run.json``) is this run's.

    Refused in one line: a file that is not an inference output (not even with ``--overwrite``: it
    is not ours to discard), and one written by another run (other model, decoding or prompt
    settings) or by a version that wrote no identity (``--overwrite`` discards those).
    """
    sidecar = identity_path(out)
    written = (out.is_file() and out.stat().st_size > 0) or bool(part_files(out))
    saved = None
    if sidecar.is_file():
        try:
            saved = json.loads(sidecar.read_text())["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            saved = None
    if written and saved is None:
        where = foreign_line(out)
        if where is not None:
            raise InferenceError(f"--eval_output {out} is not an inference output ({where} has no response or error): "
                                 "it is not written over, not even with --overwrite; choose another --eval_output")
        if not overwrite:
            raise InferenceError(f"--eval_output {out} has no run identity ({sidecar} is missing or unreadable): its "
                                 "model and settings are unknown; use another --eval_output, or --overwrite to discard it")
    elif written and saved != identity and not overwrite:
        raise InferenceError(f"--eval_output {out} was written by another run (differs in "
                             f"{', '.join(differing(saved, identity))}): use another --eval_output, or --overwrite to discard it")
    if overwrite:
        for p in [out, merge_tmp(out), *part_files(out)]:
            p.unlink(missing_ok=True)
    if overwrite or saved != identity:
        try:
            write_atomic(sidecar, json.dumps({"tool": "llava-mcmdpo inference", "identity": identity}, indent=1) + "\n")
        except OSError as e:
            raise InferenceError(f"cannot write {sidecar}: {e.strerror or e}; make room and rerun the same command") from None
