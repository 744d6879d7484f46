"""A self-contained HTML page comparing systems on the same test records.

    python -m llava.eval.report --files SFT.jsonl DPO.jsonl MCM.jsonl \\
        --image_folder IMAGES --out report.html [--names SFT DPO MCM-DPO] [--limit N]

The page has the score table at the top: the scores ``get_score.py`` wrote for each file
(``scores.json`` and ``<name>_score.jsonl``, beside the files: :func:`saved_scores`) or, where
it wrote none, the same numbers computed now by :mod:`llava.eval.score`; then one row per test
record: the image (a base64 JPEG thumbnail, at most 160 px; a missing or unreadable image shows a
visible placeholder, and so does a path leading outside ``--image_folder``, the current directory
without one, unless ``--allow_outside_image_folder``: a warning names its file and record), the context (``question``), the reference (``chosen``, or ``label`` for
yes/no files) and each system's response with its per-sample scores. Responses over
125 characters, empty responses and error rows are flagged.

Records are matched across files by ``idx`` when every record of every file has one
(the first record wins when an idx repeats; the row order is that of the first file,
then idx only later files have), otherwise by position. The page needs no network:
no external resources, all text is HTML-escaped. A small inline script checks every
image after load and writes ``data-images-loaded`` / ``data-images-failed`` on
``<body>``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from llava.flags import FlagParser
from llava.eval import metrics as M
from llava.eval import score as S
from llava.fileio import iter_jsonl, write_atomic

THUMB_PX = 160

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em;
       color: #1d1d1f; background: #fafafa; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
h2 { font-size: 1.2em; margin-top: 1.5em; }
table { border-collapse: collapse; background: #fff; }
div.wide { overflow-x: auto; }
th, td { border: 1px solid #d0d0d5; padding: .4em .55em; vertical-align: top; text-align: left; }
th { background: #eef0f4; position: sticky; top: 0; }
table.scores td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.samples { width: 100%; table-layout: fixed; }
table.samples td { font-size: .92em; white-space: pre-wrap; overflow-wrap: anywhere; }
table.samples col.c-n { width: 3.5em; } table.samples col.c-img { width: 176px; }
td.img img { max-width: 160px; max-height: 160px; display: block; }
.placeholder { width: 150px; height: 90px; border: 2px dashed #c0392b; color: #c0392b;
               display: flex; align-items: center; justify-content: center; text-align: center;
               font-size: .8em; padding: 4px; white-space: normal; }
.meta { color: #6e6e73; font-size: .85em; white-space: normal; }
.scores-line { color: #3a3a3c; font-size: .82em; margin-top: .4em; white-space: normal;
               font-variant-numeric: tabular-nums; }
.flag { display: inline-block; border-radius: 3px; padding: 0 .35em; margin: .3em .3em 0 0;
        font-size: .8em; font-weight: 600; white-space: nowrap; }
.flag.long { background: #fff1d6; color: #8a5300; border: 1px solid #e5b25d; }
.flag.empty, .flag.error, .flag.wrong { background: #fde2e1; color: #a0231b; border: 1px solid #e58b85; }
.flag.error { white-space: normal; }
.flag.missing { background: #e8e8ed; color: #3a3a3c; border: 1px solid #b0b0b8; }
.flag.right { background: #dff3e3; color: #1e6b30; border: 1px solid #86c79a; }
.empty-text { color: #a0231b; font-style: italic; }
td.ref { background: #f6fbf6; }
"""

CHECK_SCRIPT = """
(function () {
  function check() {
    var imgs = document.querySelectorAll('img');
    var ok = 0, failed = [];
    for (var i = 0; i < imgs.length; i++) {
      if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } else { failed.push(imgs[i].alt); }
    }
    var body = document.body;
    body.setAttribute('data-images-total', String(imgs.length));
    body.setAttribute('data-images-loaded', String(ok));
    body.setAttribute('data-images-failed', String(failed.length));
    body.setAttribute('data-images-checked', 'true');
    var status = document.getElementById('image-status');
    if (status) {
      status.textContent = ok + ' of ' + imgs.length + ' images loaded' +
        (failed.length ? ' (failed: ' + failed.join(', ') + ')' : '');
    }
  }
  if (document.readyState === 'complete') { check(); } else { window.addEventListener('load', check); }
})();
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# ----------------------------------------------------------------------------
# Scores: those get_score.py wrote, else scored now
# ----------------------------------------------------------------------------

def saved_scores(file: str | Path, scores_dir: str | Path | None = None,
                 first_file: str | Path | None = None) -> tuple[dict, list[dict]] | None:
    """``(row, per-sample records)`` that ``get_score.py`` wrote for ``file``, or None when there are none
    to trust.

    They are looked for where ``get_score.py`` puts them: in ``scores_dir`` (its ``--out_dir``) when given,
    else ``<name>_score.jsonl`` beside ``file`` and ``scores.json`` beside ``file`` or beside
    ``first_file`` (its default folder). The ``scores.json`` row is the one naming ``file`` (the same
    file, or the same name where the path it records is not found from here). They are not used when
    older than ``file`` (it was rewritten since), unreadable, or not one per-sample line per record.
    """
    file = Path(file)
    per_sample = S.per_sample_path(file, scores_dir)
    folders = [Path(scores_dir)] if scores_dir is not None else [file.parent] + ([Path(first_file).parent] if first_file else [])
    row = next((r for folder in dict.fromkeys(folders) for r in _scores_rows(folder / "scores.json", file)), None)
    if row is None or not per_sample.is_file() or per_sample.stat().st_mtime < file.stat().st_mtime:
        return None
    lines = list(iter_jsonl(per_sample.read_bytes()))
    if not all(line.is_object for line in lines) or len(lines) != row["n"] + row["errors"]:
        return None
    return {**row, "file": str(file)}, [line.value for line in lines]


def _scores_rows(scores_json: Path, file: Path) -> list[dict]:
    """The rows of ``scores_json`` (when newer than ``file``) that name ``file`` and have every ``ROW_KEYS``."""
    try:
        if scores_json.stat().st_mtime < file.stat().st_mtime:
            return []
        rows = json.loads(scores_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(rows, list):
        return []
    return [r for r in rows if isinstance(r, dict) and set(S.ROW_KEYS) <= set(r) and _names(str(r["file"]), file)]


def _names(recorded: str, file: Path) -> bool:
    """Whether a path ``get_score.py`` recorded (as it was given, maybe from another folder) is ``file``."""
    path = Path(recorded)
    return path.samefile(file) if path.exists() else path.name == file.name


def scores_for(files: Sequence[str | Path], scores_dir: str | Path | None = None, warn=None
               ) -> tuple[list[dict], list[list[dict]]]:
    """``(rows, per-sample records)`` of ``files`` as :func:`llava.eval.score.score_files` gives them: the
    ones ``get_score.py`` wrote (:func:`saved_scores`) where they exist, the others scored now."""
    warn = warn or (lambda message: print(message, file=sys.stderr))
    found = [saved_scores(f, scores_dir, files[0]) for f in files]
    todo = [str(f) for f, saved in zip(files, found) if saved is None]
    scored = iter(zip(*S.score_files(todo, warn=warn)[:2])) if todo else iter(())
    rows, samples = [], []
    for f, saved in zip(files, found):
        if saved is not None:
            warn(f"{f}: using the scores get_score.py wrote ({S.per_sample_path(f, scores_dir)})")
        row, per_sample = saved if saved is not None else next(scored)
        rows.append(row)
        samples.append(per_sample)
    return rows, samples


# ----------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------

def image_path_of(record: dict) -> str | None:
    path = record.get("image_path")
    if not path and isinstance(record.get("image"), dict):
        path = record["image"].get("path")
    return path if isinstance(path, str) and path else None


def resolve_image(image_path: str, image_folder: Path | None, allow_outside: bool = False) -> tuple[Path | None, str | None]:
    """``(file, None)``: ``image_path`` as training reads it (absolute as it is, relative under
    ``image_folder``), else the bare file name under ``image_folder``, whichever exists first.
    ``(None, why)`` when the path leads outside the image folder (``llava.data.images.outside_image_folder``;
    the current directory without one) and nothing inside it matched, unless ``allow_outside``;
    ``(None, None)`` when no file exists."""
    from llava.data.images import outside_image_folder

    p = Path(image_path)
    refused = None if allow_outside else outside_image_folder(image_path, image_folder)
    candidates = [] if refused else [p if p.is_absolute() or image_folder is None else image_folder / p]
    if image_folder is not None and p.name not in ("", ".", ".."):
        candidates.append(image_folder / p.name)
    for c in candidates:
        if c.is_file():
            return c, None
    return None, refused


def thumbnail_data_uri(path: Path, max_px: int = THUMB_PX) -> str:
    """A ``data:image/jpeg;base64,...`` thumbnail; raises on unreadable images."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im.thumbnail((max_px, max_px))
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        else:
            im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Thumbnails:
    def __init__(self, image_folder: Path | None, allow_outside: bool = False, warn=None):
        self.image_folder = image_folder
        self.allow_outside = allow_outside
        self.warn = warn or (lambda message: print(message, file=sys.stderr))
        self.cache: dict[str, str] = {}
        self.missing = 0

    def cell(self, records: Sequence[dict | None], where: Sequence[str | None] = ()) -> str:
        """The image of the first record whose image file resolves (files may differ
        in their paths), else a visible placeholder naming the first path. ``where`` names
        each record (``FILE, record N``) for the warning about a path refused."""
        paths = []
        for record, name in itertools.zip_longest(records, where):
            path = image_path_of(record) if record else None
            if path is not None and path not in (p for p, _ in paths):
                paths.append((path, name))
        if not paths:
            self.missing += 1
            return '<div class="placeholder">no image path</div>'
        for path, name in paths:
            html_ = self._cell(path, name)
            if not html_.startswith('<div class="placeholder"'):
                return html_
        self.missing += 1
        return self._cell(*paths[0])

    def _cell(self, image_path: str, where: str | None) -> str:
        if image_path not in self.cache:
            resolved, refused = resolve_image(image_path, self.image_folder, self.allow_outside)
            if refused is not None:
                self.warn(f"{where or 'a record'}: {refused}: not shown (--allow_outside_image_folder shows it)")
                html_ = f'<div class="placeholder">outside the image folder:<br>{esc(image_path)}</div>'
            elif resolved is None:
                html_ = f'<div class="placeholder">image not found:<br>{esc(image_path)}</div>'
            else:
                try:
                    uri = thumbnail_data_uri(resolved)
                    html_ = f'<img src="{uri}" alt="{esc(image_path)}" title="{esc(image_path)}">'
                except Exception as exc:  # noqa: BLE001 - any decoding failure shows a placeholder
                    html_ = (
                        f'<div class="placeholder">unreadable image:<br>{esc(image_path)}'
                        f"<br>({esc(type(exc).__name__)})</div>"
                    )
            self.cache[image_path] = html_
        return self.cache[image_path]


# ----------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------

def align(samples: Sequence[Sequence[dict]]) -> tuple[str, list[list[dict | None]]]:
    """Match records across files: by ``idx`` when all records have one, else by
    position. Returns ``(mode, rows)``; each row holds one record (or None) per file."""
    if samples and all("idx" in r for recs in samples for r in recs):
        order: list[str] = []
        maps: list[dict[str, dict]] = []
        for recs in samples:
            m: dict[str, dict] = {}
            for r in recs:
                key = json.dumps(r["idx"], sort_keys=True)
                if key not in m:
                    m[key] = r
            maps.append(m)
        seen: set[str] = set()
        for m in maps:
            for key in m:
                if key not in seen:
                    seen.add(key)
                    order.append(key)
        return "idx", [[m.get(key) for m in maps] for key in order]
    length = max((len(recs) for recs in samples), default=0)
    return "position", [[recs[i] if i < len(recs) else None for recs in samples] for i in range(length)]


# ----------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------

def score_table_html(rows: Sequence[dict], names: Sequence[str]) -> str:
    cols = S.table_columns(rows)
    head = "<tr><th>system</th>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
    body = []
    for name, row in zip(names, rows):
        cells = [f"<td>{esc(name)}</td>"]
        for c in cols:
            if c == "file":
                cells.append(f'<td title="{esc(row["file"])}">{esc(S.display_name(row["file"]))}</td>')
            elif c == "kind":
                cells.append(f"<td>{esc(row[c])}</td>")
            else:
                cells.append(f'<td class="num">{esc(S.format_value(row.get(c)))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="scores"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _num(value: Any) -> str:
    return S.format_value(value)


def response_cell(record: dict | None, kind: str) -> str:
    if record is None:
        return '<td class="resp"><span class="flag missing">no record</span></td>'
    if S.is_error_record(record):
        return f'<td class="resp"><span class="flag error">error: {esc(record.get("error"))}</span></td>'
    response = record.get("response", "")
    text = esc(response) if response.strip() else '<span class="empty-text">(empty response)</span>'
    flags = []
    if record.get("empty"):
        flags.append('<span class="flag empty">EMPTY</span>')
    if record.get("over_125"):
        flags.append(f'<span class="flag long">over 125 chars ({esc(record.get("chars"))})</span>')
    if kind == "yesno":
        pred = record.get("pred")
        flags.append(
            f'<span class="flag {"right" if record.get("correct") else "wrong"}">'
            f'pred: {esc(pred if pred is not None else "none")}</span>'
        )
        line = f'{record.get("words")} words · {record.get("chars")} chars'
    else:
        line = (
            f'COCO BLEU-4 {_num(record.get("coco_Bleu_4"))} · METEOR {_num(record.get("coco_METEOR"))} · '
            f'ROUGE-L {_num(record.get("coco_ROUGE_L"))} · CIDEr {_num(record.get("coco_CIDEr"))} · '
            f'edit {_num(record.get("coco_edit_distance"))} · {record.get("words")} words · '
            f'{record.get("chars")} chars'
        )
    return (
        f'<td class="resp"><div class="text">{text}</div>'
        f'<div>{"".join(flags)}</div><div class="scores-line">{esc(line)}</div></td>'
    )


def render(
    rows: Sequence[dict],
    samples: Sequence[Sequence[dict]],
    names: Sequence[str],
    kinds: Sequence[str],
    image_folder: Path | None,
    limit: int | None = None,
    title: str = "Alt-text evaluation report",
    allow_outside: bool = False,
    warn=None,
) -> str:
    mode, aligned = align(samples)
    where = {id(r): f"{row['file']}, record {i}" for row, recs in zip(rows, samples) for i, r in enumerate(recs)}
    total = len(aligned)
    if limit is not None:
        aligned = aligned[: max(limit, 0)]
    thumbs = Thumbnails(image_folder, allow_outside, warn)
    body_rows = []
    for number, recs in enumerate(aligned, start=1):
        first = next((r for r in recs if r is not None), None) or {}
        idx = first.get("idx")
        label_kind = next((k for k, r in zip(kinds, recs) if r is not None), "caption")
        reference = first.get("label") if label_kind == "yesno" else first.get("chosen")
        question = first.get("question")
        number_cell = f"{number}" + (f'<div class="meta">idx {esc(idx)}</div>' if idx is not None else "")
        cells = [
            f"<td>{number_cell}</td>",
            f'<td class="img">{thumbs.cell(recs, [where.get(id(r)) for r in recs])}</td>',
            f"<td>{esc(question) if question is not None else '<span class=meta>(no context)</span>'}</td>",
            f'<td class="ref">{esc(reference) if reference is not None else "<span class=meta>-</span>"}</td>',
        ]
        cells += [response_cell(r, k) for r, k in zip(recs, kinds)]
        idx_attr = f' data-idx="{esc(json.dumps(idx))}"' if idx is not None else ""
        body_rows.append(f'<tr class="sample"{idx_attr}>' + "".join(cells) + "</tr>")

    cols = '<col class="c-n"><col class="c-img"><col><col>' + "<col>" * len(names)
    head = (
        "<tr><th>#</th><th>Image</th><th>Context</th><th>Reference</th>"
        + "".join(f"<th>{esc(n)}</th>" for n in names)
        + "</tr>"
    )
    shown = f"{len(aligned)} of {total}" if len(aligned) != total else f"{total}"
    files = "".join(f"<li><b>{esc(n)}</b>: {esc(r['file'])}</li>" for n, r in zip(names, rows))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body data-rows="{len(aligned)}" data-systems="{len(names)}" data-image-placeholders="{thumbs.missing}">
<h1>{esc(title)}</h1>
<ul class="meta">{files}</ul>
<h2>Scores</h2>
<div class="wide">{score_table_html(rows, names)}</div>
<p class="meta">Caption metrics x100: coco_* as pycocoevalcap computes them (PTB tokenizer, BLEU,
METEOR, ROUGE-L, CIDEr), published_* as the paper's released scorer does (another scale);
edit distances in words; over_125_chars and empty in percent of responses; scores over all records
of each file.</p>
<h2>Samples</h2>
<p class="meta">{esc(shown)} records, matched by {esc(mode)};
<span id="image-status">image check pending</span>.
Flags: <span class="flag long">over 125 chars</span> <span class="flag empty">EMPTY</span></p>
<table class="samples">
<colgroup>{cols}</colgroup>
<thead>{head}</thead>
<tbody>
{chr(10).join(body_rows)}
</tbody>
</table>
<script>{CHECK_SCRIPT}</script>
</body>
</html>
"""


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        allow_abbrev=False,
        prog="python -m llava.eval.report",
        description="Write a self-contained HTML page comparing systems' alt-text on the same records.",
    )
    parser.add_argument("--data_path", "--files", dest="files", nargs="+", required=True, metavar="JSONL",
                        help="inference outputs, one per system (--files is its old name)")
    parser.add_argument("--image_folder", metavar="DIR", help="folder that image_path is relative to (default: the "
                        "current directory); images outside it are not shown")
    parser.add_argument("--allow_outside_image_folder", action="store_true",
                        help="show images whose paths lead outside --image_folder (absolute, or climbing out with ..)")
    parser.add_argument("--output", "--out", dest="out", required=True, metavar="HTML", help="where the page goes")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="column names (default: file names)")
    parser.add_argument("--scores_dir", metavar="DIR", help="where get_score.py wrote its scores (its --out_dir; "
                        "default: beside the files); files without saved scores there are scored now")
    parser.add_argument("--limit", type=int, metavar="N", help="show only the first N records")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.files):
        parser.error(f"--names has {len(args.names)} names for {len(args.files)} files")
    if args.limit is not None and args.limit < 0:
        parser.error("--limit must be >= 0")
    try:
        for f in args.files:
            if not Path(f).is_file():
                raise S.InputError(f"{f}: no such file")
        rows, samples = scores_for(args.files, args.scores_dir)
        names = args.names or [S.display_name(r["file"]) for r in rows]
        page = render(
            rows,
            samples,
            names,
            [r["kind"] for r in rows],
            Path(args.image_folder) if args.image_folder else None,
            limit=args.limit,
            allow_outside=args.allow_outside_image_folder,
        )
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, page)
    except S.InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except M.MetricError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    main()
