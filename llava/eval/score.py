"""Score inference outputs (JSON Lines) against reference alt-text: ``get_score.py``'s engine.

    python get_score.py --file A.jsonl [B.jsonl ...] [--out_dir DIR] [--metrics coco|published|all]

Two metric sets on different scales, never mixed (every key starts with ``coco_`` or ``published_``),
yes/no benchmarks, error rows and bad lines counted; ``scores.json``, ``scores.csv``, ``scores.md`` and
``<name>_score.jsonl`` written atomically. Every input rule and output column: docs/scores.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from llava.flags import FlagParser
from llava.eval import metrics as M
from llava.eval import published_metrics as P
from llava.fileio import iter_jsonl, not_an_object, write_atomic

METRIC_SETS = {"coco": ("coco",), "published": ("published",), "all": ("coco", "published")}
COCO_ROW_KEYS = tuple(f"coco_{k}" for k in M.COCO_KEYS + ("edit_distance",))
PUBLISHED_ROW_KEYS = tuple(f"published_{k}" for k in P.PUBLISHED_KEYS)
#: Titles of the Markdown sections, one per metric set.
SET_TITLES = {
    "coco": "COCO caption metrics (coco_*: pycocoevalcap, PTB tokens, lower-cased; x100)",
    "published": "Published metrics (published_*: the authors' released get_score.py, nltk tokens, "
    "case kept; x100 but edit distance; the paper's scale)",
}
CAPTION_KEYS = COCO_ROW_KEYS + PUBLISHED_ROW_KEYS
LENGTH_KEYS = ("mean_words", "mean_chars", "over_125_chars", "empty")
YESNO_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed")
COUNT_KEYS = ("n", "errors", "bad_lines", "duplicate_idx", "unparsed")

#: Keys of every ``scores.json`` row, in column order.
ROW_KEYS = ("file", "kind", "n", "errors", "bad_lines", "duplicate_idx") + CAPTION_KEYS + LENGTH_KEYS + YESNO_KEYS

#: Per-sample keys added to each record of a caption file's ``<name>_score.jsonl``.
SAMPLE_KEYS_CAPTION = CAPTION_KEYS + ("words", "chars", "over_125", "empty")
#: Per-sample keys added to each record of a yes/no file's ``<name>_score.jsonl``.
SAMPLE_KEYS_YESNO = ("pred", "correct", "words", "chars", "over_125", "empty")


class InputError(Exception):
    """Bad input that stops scoring; the message is meant for the user as it is."""


@dataclass
class Loaded:
    """One parsed input file."""

    path: Path
    kind: str = "caption"
    records: list[tuple[int, dict]] = field(default_factory=list)  # (line number, record)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    duplicates: list[tuple[Any, int, int]] = field(default_factory=list)  # (idx, first, again)
    problems: list[str] = field(default_factory=list)  # missing / invalid fields


def is_error_record(record: dict) -> bool:
    """A record whose inference failed (e.g. unreadable image)."""
    return bool(record.get("error"))


def _idx_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def load_file(path: str | Path, warn=None) -> Loaded:
    """Parse a JSON Lines file. Unparseable lines and duplicate idx are reported with
    ``warn`` (default: print to stderr); field problems are collected in ``problems``."""
    if warn is None:
        warn = _warn
    path = Path(path)
    loaded = Loaded(path=path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    seen: dict[str, int] = {}
    for line in iter_jsonl(data):
        lineno, record = line.number, line.value
        if not line.is_object:
            loaded.bad_lines.append((lineno, line.problem or not_an_object(record)))
            continue
        loaded.records.append((lineno, record))
        if "idx" in record:
            key = _idx_key(record["idx"])
            if key in seen:
                loaded.duplicates.append((record["idx"], seen[key], lineno))
            else:
                seen[key] = lineno
    for lineno, reason in loaded.bad_lines:
        warn(f"{path}, line {lineno}: skipped unparseable line: {reason}")
    for idx, first, again in loaded.duplicates:
        warn(f"warning: {path}: duplicate idx {json.dumps(idx)} on lines {first} and {again}")

    good = [(ln, r) for ln, r in loaded.records if not is_error_record(r)]
    loaded.kind = "yesno" if any("label" in r for _, r in good) else "caption"
    needed = ("response", "label") if loaded.kind == "yesno" else ("response", "chosen")
    for lineno, record in good:
        for name in needed:
            if name not in record:
                loaded.problems.append(f"{path}, line {lineno}: missing field '{name}'")
            elif not isinstance(record[name], str):
                got = "null" if record[name] is None else type(record[name]).__name__
                loaded.problems.append(f"{path}, line {lineno}: field '{name}' must be a string, got {got}")
            elif name == "label" and record[name].strip().lower() not in ("yes", "no"):
                loaded.problems.append(
                    f"{path}, line {lineno}: field 'label' must be 'yes' or 'no', got {record[name]!r}"
                )
    return loaded


def caption_metrics(responses: list[str], references: list[str], sets: Sequence[str], meteor=None):
    """``(summary, per_sample)`` of a caption file with the prefixed keys of the
    requested metric sets (``coco``, ``published``) and the length statistics."""
    summary: dict = M.length_summary(responses)
    each: list[dict] = [M.length_stats(r) for r in responses]
    if "coco" in sets:
        coco, coco_each = M.caption_scores(responses, references, meteor=meteor)
        keys = M.COCO_KEYS + ("edit_distance",)
        summary.update({f"coco_{k}": coco[k] for k in keys})
        for sample, values in zip(each, coco_each):
            sample.update({f"coco_{k}": values[k] for k in keys})
    if "published" in sets:
        published, published_each = P.published_scores(responses, references)
        summary.update({f"published_{k}": v for k, v in published.items()})
        for sample, values in zip(each, published_each):
            sample.update({f"published_{k}": v for k, v in values.items()})
    return summary, [{k: sample.get(k) for k in SAMPLE_KEYS_CAPTION} for sample in each]


def score_loaded(loaded: Loaded, meteor=None, metrics: str = "all") -> tuple[dict, list[dict]]:
    """Score a validated file with the metric sets ``metrics`` names (see
    ``METRIC_SETS``). Returns ``(row, per_sample_records)``; the per-sample list has
    one entry per parsed record (error rows included, metrics null)."""
    if loaded.problems:
        raise InputError("\n".join(loaded.problems))
    good = [r for _, r in loaded.records if not is_error_record(r)]
    responses = [r["response"] for r in good]
    row: dict = dict.fromkeys(ROW_KEYS)
    row.update(
        file=str(loaded.path),
        kind=loaded.kind,
        n=len(good),
        errors=len(loaded.records) - len(good),
        bad_lines=len(loaded.bad_lines),
        duplicate_idx=len(loaded.duplicates),
    )
    if loaded.kind == "yesno":
        labels = [r["label"].strip().lower() for r in good]
        summary, each = M.yes_no_scores(responses, labels)
        summary.update(M.length_summary(responses))
        each = [{**e, **M.length_stats(resp)} for e, resp in zip(each, responses)]
        sample_keys = SAMPLE_KEYS_YESNO
    else:
        summary, each = caption_metrics(responses, [r["chosen"] for r in good], METRIC_SETS[metrics], meteor=meteor)
        sample_keys = SAMPLE_KEYS_CAPTION
    row.update({k: v for k, v in summary.items() if k in row})

    per_sample = []
    scored = iter(each)
    for _, record in loaded.records:
        values = dict.fromkeys(sample_keys) if is_error_record(record) else next(scored)
        per_sample.append({**record, **{k: values[k] for k in sample_keys}})
    return row, per_sample


def score_files(
    paths: Sequence[str | Path], warn=None, metrics: str = "all"
) -> tuple[list[dict], list[list[dict]], list[Loaded]]:
    """Load and validate every file (all problems reported at once), then score them
    with the metric sets ``metrics`` names (``coco``, ``published`` or ``all``).

    Returns ``(rows, per_sample_lists, loaded_files)``. Raises :class:`InputError`
    on missing/invalid fields, :class:`llava.eval.metrics.MetricError` when a
    Java scorer fails or nltk's data is missing.
    """
    if metrics not in METRIC_SETS:
        raise ValueError(f"metrics must be one of {', '.join(METRIC_SETS)}, got {metrics!r}")
    loaded = [load_file(p, warn=warn) for p in paths]
    problems = [msg for lf in loaded for msg in lf.problems]
    if problems:
        shown = problems[:20]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise InputError("\n".join(shown))
    meteor = None
    sets = METRIC_SETS[metrics]
    if any(lf.kind == "caption" and any(not is_error_record(r) for _, r in lf.records) for lf in loaded):
        if "published" in sets:
            P.check_nltk_data()  # before the METEOR jar starts: a missing resource stops at once
        if "coco" in sets:
            meteor = M.get_meteor()  # starts loading now, while the tokenizer runs
    rows, samples = [], []
    for lf in loaded:
        row, per_sample = score_loaded(lf, meteor=meteor, metrics=metrics)
        rows.append(row)
        samples.append(per_sample)
    return rows, samples, loaded


# ----------------------------------------------------------------------------
# Formatting and writing
# ----------------------------------------------------------------------------

def display_name(file: str) -> str:
    """The name a file gets in tables: its file name without ``.jsonl``."""
    name = Path(file).name
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else name


def table_columns(rows: Sequence[dict]) -> list[str]:
    """Columns shown in the Markdown/HTML tables: ``file`` and every key that is not
    null in all rows; count columns only when some row has a non-zero count."""
    cols = ["file"]
    for key in ROW_KEYS[1:]:
        values = [r.get(key) for r in rows]
        if all(v is None for v in values):
            continue
        if key in COUNT_KEYS and key != "n" and not any(values):
            continue
        cols.append(key)
    return cols


def format_value(value: Any) -> str:
    """Table cell text: ints as they are, floats with 2 decimals, null as "-"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown_sections(rows: Sequence[dict]) -> list[tuple[str, list[str]]]:
    """``(title, columns)`` of each Markdown table: first every column that is not a
    published metric (counts, COCO metrics, lengths, yes/no metrics), then, when the
    published set has values, ``file``, ``n`` and the published metrics."""
    cols = table_columns(rows)
    published = [c for c in cols if c in PUBLISHED_ROW_KEYS]
    main = [c for c in cols if c not in PUBLISHED_ROW_KEYS]
    if any(c in COCO_ROW_KEYS for c in main):
        title = SET_TITLES["coco"]
    else:
        title = "Counts and lengths" if published else "Scores"
    sections = [(title, main)]
    if published:
        sections.append((SET_TITLES["published"], [c for c in ("file", "n") if c in cols] + published))
    return sections


def format_markdown(rows: Sequence[dict]) -> str:
    """One titled Markdown table per section of :func:`markdown_sections`."""
    return "\n".join(
        f"### {title}\n\n{markdown_table(rows, cols)}" for title, cols in markdown_sections(rows)
    )


def markdown_table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" if c in ("file", "kind") else "---:" for c in cols) + "|",
    ]
    for row in rows:
        cells = [display_name(row["file"]) if c == "file" else format_value(row.get(c)) for c in cols]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ROW_KEYS)
    for row in rows:
        writer.writerow(["" if row.get(k) is None else row.get(k) for k in ROW_KEYS])
    return buf.getvalue()


def per_sample_path(path: str | Path, folder: str | Path | None = None) -> Path:
    """``<name>_score.jsonl`` in ``folder``, or beside ``path`` when no folder is given."""
    path = Path(path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return (Path(folder) if folder is not None else path.parent) / f"{stem}_score.jsonl"


def check_per_sample_names(files: Sequence[Path], folder: Path) -> None:
    """Two inputs of the same name would write one per-sample file in ``folder``."""
    seen: dict[Path, Path] = {}
    for f in files:
        target = per_sample_path(f, folder)
        if target in seen:
            raise InputError(f"{seen[target]} and {f} would both write {target}: score them into different --out_dir")
        seen[target] = f


def refuse_other_scores(files: Sequence[Path], out_dir: Path) -> None:
    """``scores.json`` in ``out_dir`` holding the scores of other inputs is not written over (without ``--overwrite``)."""
    try:
        rows = json.loads((out_dir / "scores.json").read_text())
        earlier = sorted({str(Path(r["file"]).resolve()) for r in rows})
    except FileNotFoundError:
        return
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InputError(f"{out_dir / 'scores.json'} is not a scores file of this tool ({e}): not written over; "
                         "use another --output_dir") from None
    if earlier != sorted(str(f.resolve()) for f in files):
        raise InputError(f"{out_dir / 'scores.json'} holds the scores of {', '.join(earlier[:2])}"
                         f"{', ...' if len(earlier) > 2 else ''}: not written over; use another --output_dir, "
                         "or --overwrite to replace them")


def write_outputs(
    rows: Sequence[dict],
    samples: Sequence[Sequence[dict]],
    out_dir: str | Path,
    per_sample_dir: str | Path | None = None,
) -> str:
    """Write per-sample files (in ``per_sample_dir``, or beside each input when it is
    None), scores.json/csv/md in ``out_dir``; returns the Markdown text."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for row, per_sample in zip(rows, samples):
        text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in per_sample)
        write_atomic(per_sample_path(row["file"], per_sample_dir), text)
    write_atomic(out_dir / "scores.json", json.dumps(list(rows), indent=2, ensure_ascii=False) + "\n")
    write_atomic(out_dir / "scores.csv", format_csv(rows))
    table = format_markdown(rows)
    write_atomic(out_dir / "scores.md", table)
    return table


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        allow_abbrev=False,
        prog="get_score.py",
        description="Score alt-text inference outputs (JSON Lines with 'response' and 'chosen', "
        "or 'label' for yes/no benchmarks) with BLEU, METEOR, ROUGE-L, CIDEr and more, "
        "as the COCO pipeline computes them (coco_*) and as the paper's released scorer does (published_*).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_path", "--file", dest="file", nargs="+", metavar="JSONL",
                        help="one or more inference output files (--file is its old name)")
    source.add_argument("--dir", metavar="DIR", help="score every *.jsonl in DIR except *_score.jsonl")
    parser.add_argument(
        "--output_dir",
        "--out_dir",
        dest="out_dir",
        metavar="DIR",
        help="where scores.json/csv/md and the per-sample *_score.jsonl go "
        "(default: the first file's directory, or DIR; per-sample files then go beside each input)",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a scores.json/csv/md in the output folder that holds the scores of other inputs")
    parser.add_argument(
        "--metrics",
        choices=tuple(METRIC_SETS),
        default="all",
        help="coco: pycocoevalcap's pipeline (coco_* keys); published: the authors' released scorer, "
        "the paper's numbers (published_* keys); all: both (default)",
    )
    return parser


def input_files(args: argparse.Namespace) -> tuple[list[Path], Path]:
    if args.dir is not None:
        folder = Path(args.dir)
        if not folder.is_dir():
            raise InputError(f"--dir {folder}: not a directory")
        files = sorted(p for p in folder.glob("*.jsonl") if not p.name.endswith("_score.jsonl") and p.is_file())
        if not files:
            raise InputError(f"--dir {folder}: no *.jsonl files to score")
        default_out = folder
    else:
        files = [Path(f) for f in args.file]
        for f in files:
            if not f.is_file():
                raise InputError(f"{f}: no such file")
        default_out = files[0].parent
    return files, Path(args.out_dir) if args.out_dir else default_out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``get_score.py``. Exits with status 2 on bad input, 1 when a
    scorer fails; returns 0 otherwise."""
    args = build_parser().parse_args(argv)
    try:
        files, out_dir = input_files(args)
        per_sample_dir = out_dir if args.out_dir else None
        if per_sample_dir is not None:
            check_per_sample_names(files, per_sample_dir)
        if not args.overwrite:
            refuse_other_scores(files, out_dir)
        rows, samples, _ = score_files(files, metrics=args.metrics)
        table = write_outputs(rows, samples, out_dir, per_sample_dir)
    except InputError as exc:
        _warn(f"error: {exc}" if "\n" not in str(exc) else "error:\n" + str(exc))
        raise SystemExit(2) from None
    except M.MetricError as exc:
        _warn(f"error: {exc}")
        raise SystemExit(1) from None
    except OSError as exc:  # a full disk, a quota: write_atomic names the file, which keeps its earlier contents
        where = exc.filename or "outputs"
        _warn(f"error: cannot write {where}: {exc.strerror or exc}; make room and rerun the same command")
        raise SystemExit(1) from None
    for row in rows:
        if row["bad_lines"]:
            _warn(f"warning: {row['file']}: {row['bad_lines']} unparseable line(s) skipped")
        if row["errors"]:
            _warn(f"note: {row['file']}: {row['errors']} error row(s) excluded from the metrics")
    per_sample = ", ".join(str(per_sample_path(f, per_sample_dir)) for f in files)
    _warn(f"wrote {out_dir / 'scores.json'}, scores.csv and scores.md; per sample: {per_sample}")
    sys.stdout.write(table)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    main()
