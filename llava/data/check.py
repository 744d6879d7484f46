"""Check data files before training or inference: every problem, each naming its file, record and field.

    python -m llava.data.check FILE [FILE ...] [--image_folder DIR] [--task sft|preference|test]
    llava-check ...                                  (the same, as a console script)

One line per problem (``error: FILE, record 3, line 4, field 'chosen': empty text``), a summary per
file, exit status 0 (no errors), 1 (errors) or 2 (usage). Which problems are errors and which are
warnings, and why: docs/data-check.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from llava.flags import FlagParser
from llava.data.images import missing_image
from llava.data.records import (TASKS, DataError, DataProblem, Record, image_field, image_ref, iter_rows, parse_row,
                                text_fields)
from llava.data.verify import VerifiedImages, refused_path, verify_image

IMAGE_WORKERS = 4  # PIL decodes with the GIL released: threads overlap image checks
IMAGE_WINDOW = 64  # image checks in flight at once (bounds the image bytes held in memory)


def guess_task(row: dict) -> tuple[str, str] | None:
    """``(task, reason)`` for a raw row, or ``None`` when the row cannot tell (unparseable ``text``)."""
    if "conversations" in row:
        return "sft", "it has 'conversations'"
    fields = text_fields(row, lambda *a, **k: None)
    if fields is None:
        return None
    if fields.get("rejected") is not None:
        return "preference", "it has 'rejected'"
    return "test", "it has no 'rejected' and no 'conversations'"


@dataclass
class FileReport:
    """What checking one file found. ``worst`` maps a record number to ``error`` or ``warning``."""

    file: str
    task: str | None = None
    task_note: str = ""
    read: int = 0
    problems: list[DataProblem] = field(default_factory=list)
    worst: dict[int, str] = field(default_factory=dict)

    def add(self, problem: DataProblem) -> None:
        self.problems.append(problem)
        if problem.record is not None and self.worst.get(problem.record) != "error":
            self.worst[problem.record] = problem.severity

    @property
    def errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    @property
    def warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems)

    @property
    def with_errors(self) -> int:
        return sum(s == "error" for s in self.worst.values())

    @property
    def with_warnings(self) -> int:
        return sum(s == "warning" for s in self.worst.values())

    @property
    def ok(self) -> int:
        return self.read - self.with_errors - self.with_warnings


def _rows_with_task(path: Path, task: str | None, report: FileReport) -> Iterator[tuple[int, int | None, dict | DataProblem]]:
    """The file's rows, after settling ``report.task`` (given, or guessed from the first row that tells)."""
    rows = iter_rows(path)
    if task is not None:
        report.task, report.task_note = task, "--task"
        yield from rows
        return
    held, broken = [], None
    try:
        for number, line, row in rows:
            held.append((number, line, row))
            guess = guess_task(row) if isinstance(row, dict) else None
            if guess is not None:
                report.task = guess[0]
                report.task_note = f"guessed from record {number}: {guess[1]}; pass --task to choose"
                break
    except DataError as e:  # the file breaks further on: the rows read so far are still checked
        broken = e
    if report.task is None and held:
        report.task, report.task_note = "test", "no record tells the task; checked as test, pass --task to choose"
    yield from held
    if broken is not None:
        raise broken
    yield from rows


def check_file(path: str | Path, task: str | None = None, image_folder: str | Path | None = None,
               open_images: bool = True, *, allow_outside: bool = False, cache: VerifiedImages | None = None,
               lengths=None) -> FileReport:
    """Every problem of one data file for ``task`` (guessed when ``None``), images checked in ``image_folder``
    as training and inference check them (``llava.data.verify.verify_image``; ``cache``: files verified before).
    ``lengths``: records -> answers too long for ``--model_max_length`` (``llava.data.lengths.too_long``), as
    training finds them (not for test files: their answers are not trained)."""
    path = Path(path)
    report = FileReport(str(path))
    seen_idx: dict[str, int] = {}
    no_idx: list[tuple[int, int | None]] = []
    objects = 0  # rows that are JSON objects
    pending: deque = deque()
    records: list[Record] = []

    def settle(n: int) -> None:
        while len(pending) > n:
            future, row_field = pending.popleft()
            problem = future.result()
            if problem is not None:
                report.add(replace(problem, field=row_field))

    with ThreadPoolExecutor(IMAGE_WORKERS) as pool:
        try:
            for number, line, row in _rows_with_task(path, task, report):
                report.read += 1
                if isinstance(row, DataProblem):
                    report.add(row)
                    continue
                objects += 1
                record, found = parse_row(row, str(path), number, line, report.task)
                if record is not None:
                    records.append(record)
                for p in found:
                    report.add(p)
                _check_idx(row, number, line, report, seen_idx, no_idx)
                ref = image_ref(row)
                if ref is not None:
                    record = Record(str(path), number, row.get("idx"), ref, "", line=line)
                    if open_images:
                        job = pool.submit(lambda r: verify_image(r, image_folder, allow_outside=allow_outside,
                                                                 cache=cache)[0], record)
                    else:
                        job = pool.submit(_check_image_exists, record, image_folder, allow_outside)
                    pending.append((job, image_field(row)))
                    settle(IMAGE_WINDOW)
        except DataError as e:  # the file itself: missing, not JSON, not Parquet, not a datasets dir
            for p in e.problems:
                report.add(p)
        settle(0)
    if lengths is not None and report.task != "test":
        for p in lengths(records):
            report.add(p)
    if report.task == "test" and no_idx:  # outputs are matched to records by idx (inference, report)
        if len(no_idx) == objects:
            report.add(DataProblem(str(path), None, "idx", "no record has an idx: outputs are matched by position only",
                                   severity="warning"))
        else:
            for number, line in no_idx:
                report.add(DataProblem(str(path), number, "idx", "no idx (other records have one): this record's "
                                       "output is matched by position only", line, "warning"))
    if report.read == 0 and not report.problems:
        report.add(DataProblem(str(path), None, None, "no records"))
    report.problems.sort(key=lambda p: -1 if p.record is None else p.record)  # stable: order within a record kept
    return report


def _check_image_exists(record: Record, image_folder, allow_outside: bool = False) -> DataProblem | None:
    if not allow_outside and (refused := refused_path(record, image_folder)) is not None:
        return refused
    return missing_image(record, image_folder)


def _check_idx(row: dict, number: int, line: int | None, report: FileReport, seen: dict[str, int],
               no_idx: list[tuple[int, int | None]]) -> None:
    idx = row.get("idx", row.get("id"))
    name = "idx" if "idx" in row else "id"
    if idx is None:
        no_idx.append((number, line))
        return
    key = json.dumps(idx, sort_keys=True, default=str)
    if key in seen:
        severity = "error" if report.task == "test" else "warning"
        report.add(DataProblem(report.file, number, name, f"duplicate {name} {key} (first at record {seen[key]})",
                               line, severity))
    else:
        seen[key] = number


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _counts(read: int, ok: int, errors: int, warnings_only: int) -> str:
    return (f"{_plural(read, 'record')} read: {ok} ok, {errors} with errors, {warnings_only} with warnings only")


def print_report(report: FileReport, out=None) -> None:
    out = out or sys.stdout  # looked up now: callers (and tests) may have redirected it
    print(f"== {report.file}: task {report.task or '-'}" + (f" ({report.task_note})" if report.task_note else ""),
          file=out)
    for p in report.problems:
        print(f"{p.severity}: {p}", file=out)
    print(f"{report.file}: {_counts(report.read, report.ok, report.with_errors, report.with_warnings)} "
          f"({_plural(report.errors, 'error')}, {_plural(report.warnings, 'warning')})", file=out)


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        allow_abbrev=False,
        prog="python -m llava.data.check",
        description="Check alt-text data files (JSON, JSON Lines, Parquet, datasets directories) and list every "
                    "problem with its file, record number (0-based), line (JSON Lines) and field.",
        epilog="Exit status: 0 no errors (warnings allowed), 1 errors found, 2 usage error. "
               "See the module docstring for which problems are errors and which are warnings.",
    )
    # The files: as positional words, or after --data_path as training names them (both may be given).
    p.add_argument("files", nargs="*", metavar="FILE", help="data file(s) or datasets directories")
    p.add_argument("--data_path", nargs="+", default=[], metavar="FILE", help="the same, named as in training")
    p.add_argument("--image_folder", default=None, help="folder image paths are relative to (as in training)")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="what the file is for; default: guessed per file from its first record "
                        "(conversations -> sft, rejected -> preference, else test)")
    p.add_argument("--no_image_open", action="store_true",
                   help="only check that image files exist (fast); by default every image is opened, verified and "
                        "decoded with PIL (files verified before and unchanged since are not opened again)")
    p.add_argument("--allow_outside_image_folder", action="store_true",
                   help="accept image paths that lead outside --image_folder (absolute, or climbing out with ..), "
                        "as training and inference do with the same flag")
    p.add_argument("--model_name_or_path", default=None, metavar="MODEL",
                   help="an HF-format LLaVA directory: also find answers that cannot fit --model_max_length after the "
                        "image's tokens (its tokenizer and image processor only; the weights are not loaded)")
    p.add_argument("--model_max_length", type=int, default=2048, help="as in training (default 2048)")
    p.add_argument("--version", default="v1", help="conversation template, as training's --version (default v1)")
    p.add_argument("--image_aspect_ratio", default="pad", help="as in training (default pad)")
    return p


def length_check(args):
    """records -> answers too long (``llava.data.lengths``) for ``--model_name_or_path``; None without one."""
    if args.model_name_or_path is None:
        return None
    from llava.data.lengths import early_processor, too_long

    processor = early_processor(args.model_name_or_path)
    if processor is None:
        raise ValueError(f"--model_name_or_path {args.model_name_or_path}: not a LLaVA checkpoint (HF or original layout, or a LoRA adapter)")
    strategy = getattr(processor, "vision_feature_select_strategy", None) or "default"
    return lambda records: too_long(records, processor, args.version, args.image_aspect_ratio, args.model_max_length,
                                    strategy)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): return the status rather than exit
        return int(e.code or 0)
    args.files += args.data_path
    if not args.files:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: no data file: give FILE ... or --data_path FILE ...", file=sys.stderr)
        return 2
    if args.image_folder is not None and not Path(args.image_folder).is_dir():
        print(f"{parser.prog}: error: --image_folder {args.image_folder}: not a directory", file=sys.stderr)
        return 2

    try:
        lengths = length_check(args)
    except Exception as e:  # noqa: BLE001 -- a path that is no model, a broken tokenizer: one line
        print(f"{parser.prog}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    reports = []
    cache = VerifiedImages.load()
    for f in args.files:
        report = check_file(f, args.task, args.image_folder, open_images=not args.no_image_open,
                            allow_outside=args.allow_outside_image_folder, cache=cache, lengths=lengths)
        print_report(report)
        reports.append(report)
    cache.save()

    if len(reports) > 1:
        for task in TASKS:
            mine = [r for r in reports if r.task == task]
            if mine:
                print(f"total {task}: {_plural(len(mine), 'file')}, "
                      + _counts(sum(r.read for r in mine), sum(r.ok for r in mine),
                                sum(r.with_errors for r in mine), sum(r.with_warnings for r in mine)))
    errors, warnings = sum(r.errors for r in reports), sum(r.warnings for r in reports)
    not_found = any("image file not found" in p.message for r in reports for p in r.problems)
    if not_found and args.image_folder is None:
        print("hint: image paths were looked up from the current directory; pass --image_folder DIR")
    bad = sum(r.errors > 0 for r in reports)
    verdict = "FAILED" if errors else "OK"
    print(f"result: {verdict}: {_plural(errors, 'error')}, {_plural(warnings, 'warning')} "
          f"in {_plural(len(reports), 'file')}" + (f" ({bad} of them with errors)" if len(reports) > 1 else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
