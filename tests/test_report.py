"""Tests for llava.eval.report: the static HTML comparison page."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from llava.eval import report as R
from llava.eval import score as S

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "eval"
FILES = ("sft.jsonl", "dpo.jsonl", "mcm.jsonl")
NAMES = ("SFT", "DPO", "MCM-DPO")
N_RECORDS = 6
N_IMAGES = 5  # img_106.jpg is deliberately missing

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is needed to score the files")


def make_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (640, 480), (200, 160, 40)).save(folder / "img_101.jpg")
    Image.new("RGBA", (120, 300), (20, 90, 200, 120)).save(folder / "img_102.png")
    Image.new("L", (90, 60), 128).save(folder / "img_103.jpg")
    Image.new("RGB", (1600, 900), (30, 140, 60)).save(folder / "img_104.jpg")
    Image.new("P", (200, 200), 3).save(folder / "img_105.jpg", format="PNG")  # wrong extension, still an image


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A report over the three caption fixtures, plus get_score's scores.json beside it."""
    if shutil.which("java") is None:
        pytest.skip("Java is needed to score the files")
    root = tmp_path_factory.mktemp("report")
    files = []
    for name in FILES:
        shutil.copy(FIX / name, root / name)
        files.append(str(root / name))
    make_images(root / "images")
    out = root / "site" / "report.html"
    assert R.main(["--files", *files, "--image_folder", str(root / "images"), "--out", str(out), "--names", *NAMES]) == 0
    assert S.main(["--file", *files, "--out_dir", str(root / "scores")]) == 0
    return root, out


def cells(row_html: str) -> list[str]:
    return re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row_html, flags=re.S)


@needs_java
def test_report_content(built):
    root, out = built
    page = out.read_text(encoding="utf-8")

    # one row per record, systems as column headers
    samples = page[page.index('<table class="samples">') :]
    assert samples.count('<tr class="sample"') == N_RECORDS
    head = cells(re.search(r"<thead>(.*?)</thead>", samples, flags=re.S).group(1))
    assert head == ["#", "Image", "Context", "Reference", *NAMES]
    assert 'data-idx="101"' in samples and 'data-idx="106"' in samples

    # the score table shows get_score's numbers
    rows = json.loads((root / "scores" / "scores.json").read_text())
    table = re.search(r'<table class="scores">(.*?)</table>', page, flags=re.S).group(1)
    header = cells(re.search(r"<thead>(.*?)</thead>", table, flags=re.S).group(1))
    assert header == ["system", *S.table_columns(rows)]
    body_rows = re.findall(r"<tr>(.*?)</tr>", re.search(r"<tbody>(.*?)</tbody>", table, flags=re.S).group(1))
    assert len(body_rows) == 3
    for name, row, tr in zip(NAMES, rows, body_rows):
        values = dict(zip(header, [html.unescape(c) for c in cells(tr)]))
        assert values["system"] == name
        for key in ("coco_Bleu_4", "coco_METEOR", "coco_ROUGE_L", "coco_CIDEr", "coco_edit_distance", "n"):
            assert values[key] == S.format_value(row[key])

    # self-contained: embedded images only, no links to anything outside
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", page)
    assert "url(" not in page and "@import" not in page
    thumbs = re.findall(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(thumbs) == N_IMAGES
    for b64 in thumbs:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            assert im.format == "JPEG" and max(im.size) <= R.THUMB_PX
    assert 'class="placeholder">image not found:<br>img_106.jpg' in page

    # everything is escaped: the only script is the page's own
    assert page.count("<script") == 1
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot;" in page

    # flags: over 125 chars, empty responses, error rows
    tr = {m.group(1): m.group(2) for m in re.finditer(r'<tr class="sample" data-idx="(\d+)">(.*?)</tr>', page, re.S)}
    sft, dpo, mcm = cells(tr["104"])[4:]
    assert "over 125 chars" in dpo and "over 125 chars" not in sft
    assert "error: cannot open image img_104.jpg" in mcm
    assert "EMPTY" in cells(tr["103"])[5] and "(empty response)" in cells(tr["103"])[5]
    assert "EMPTY" in cells(tr["105"])[6]
    assert "BLEU-4" in cells(tr["101"])[4]
    assert "Given an image and context" in cells(tr["101"])[2]
    assert "golden retriever puppy sniffing red tulips" in cells(tr["101"])[3]


@needs_java
def test_report_limit_and_default_names(tmp_path):
    for name in FILES[:2]:
        shutil.copy(FIX / name, tmp_path / name)
    out = tmp_path / "r.html"
    files = [str(tmp_path / n) for n in FILES[:2]]
    assert R.main(["--files", *files, "--out", str(out), "--limit", "2"]) == 0
    page = out.read_text()
    assert page.count('<tr class="sample"') == 2
    assert "<th>sft</th>" in page and "<th>dpo</th>" in page
    assert page.count('class="placeholder">image not found') == 2  # no --image_folder, nothing found


def test_align_by_position_when_idx_missing():
    a = [{"response": "x"}, {"response": "y"}, {"response": "z"}]
    b = [{"idx": 1, "response": "p"}]
    mode, rows = R.align([a, b])
    assert mode == "position"
    assert rows == [[a[0], b[0]], [a[1], None], [a[2], None]]
    mode, rows = R.align([[{"idx": 2}, {"idx": 1}, {"idx": 2, "dup": True}], [{"idx": 1}, {"idx": 3}]])
    assert mode == "idx"
    assert rows == [[{"idx": 2}, None], [{"idx": 1}, {"idx": 1}], [None, {"idx": 3}]]


def test_names_must_match_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        R.main(["--files", str(FIX / "sft.jsonl"), "--out", str(tmp_path / "r.html"), "--names", "A", "B"])
    assert exc.value.code == 2
    assert "--names has 2 names for 1 files" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


# ----------------------------------------------------------------------------
# The scores get_score.py wrote are read, not computed again


def write_saved_scores(folder: Path, file: Path, recorded: str, cider: float) -> None:
    """scores.json and <name>_score.jsonl as get_score.py writes them, with a CIDEr no scorer would give."""
    records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    good = [r for r in records if not r.get("error")]
    row = {**dict.fromkeys(S.ROW_KEYS), "file": recorded, "kind": "caption", "n": len(good),
           "errors": len(records) - len(good), "bad_lines": 0, "duplicate_idx": 0, "coco_CIDEr": cider}
    per_sample = [{**r, **dict.fromkeys(S.SAMPLE_KEYS_CAPTION), "coco_Bleu_4": 12.5} for r in records]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scores.json").write_text(json.dumps([row]))
    S.per_sample_path(file, folder).write_text("".join(json.dumps(r) + "\n" for r in per_sample))


def refuse_to_score(paths, **kwargs):
    raise AssertionError(f"scored again: {paths}")


def test_report_reads_the_scores_get_score_wrote_beside_the_file(tmp_path, monkeypatch, capsys):
    file = tmp_path / "sft.jsonl"
    shutil.copy(FIX / "sft.jsonl", file)
    write_saved_scores(tmp_path, file, "elsewhere/sft.jsonl", cider=987.65)  # scored from another folder
    monkeypatch.setattr(S, "score_files", refuse_to_score)
    out = tmp_path / "r.html"
    assert R.main(["--files", str(file), "--out", str(out)]) == 0
    page = out.read_text()
    assert '<td class="num">987.65</td>' in page
    assert "COCO BLEU-4 12.50" in page
    assert f"{file}: using the scores get_score.py wrote ({tmp_path / 'sft_score.jsonl'})" in capsys.readouterr().err


def test_report_reads_the_scores_from_the_folder_named_by_scores_dir(tmp_path, monkeypatch, capsys):
    # the demo's layout: inference outputs in eval/, get_score.py --out_dir one folder up
    file = tmp_path / "eval" / "sft.jsonl"
    file.parent.mkdir()
    shutil.copy(FIX / "sft.jsonl", file)
    write_saved_scores(tmp_path, file, str(file), cider=321.5)
    monkeypatch.setattr(S, "score_files", refuse_to_score)
    out = tmp_path / "r.html"
    with pytest.raises(AssertionError, match="scored again"):  # not beside the file: it would score again
        R.main(["--files", str(file), "--out", str(out)])
    assert R.main(["--files", str(file), "--out", str(out), "--scores_dir", str(tmp_path)]) == 0
    assert '<td class="num">321.50</td>' in out.read_text()
    assert f"{file}: using the scores get_score.py wrote ({tmp_path / 'sft_score.jsonl'})" in capsys.readouterr().err


def test_saved_scores_in_a_given_folder_and_when_they_are_stale(tmp_path, monkeypatch):
    files = [tmp_path / name for name in FILES[:2]]
    for f in files:
        shutil.copy(FIX / f.name, f)
    write_saved_scores(tmp_path / "scores", files[0], str(files[0]), cider=1.5)
    assert R.saved_scores(files[0]) is None  # nothing beside the file
    row, samples = R.saved_scores(files[0], tmp_path / "scores")
    assert (row["file"], row["coco_CIDEr"], len(samples)) == (str(files[0]), 1.5, N_RECORDS)
    assert samples[0]["coco_Bleu_4"] == 12.5 and samples[0]["idx"] == 101

    # dpo.jsonl has no saved scores: it alone is scored, and the rows keep the order of the files
    calls = []

    def score_files(paths, **kwargs):
        calls.append(list(paths))
        return [{"file": paths[0], "kind": "caption"}], [["scored"]], None

    monkeypatch.setattr(S, "score_files", score_files)
    rows, samples = R.scores_for([str(f) for f in files], tmp_path / "scores", warn=lambda m: None)
    assert calls == [[str(files[1])]]
    assert rows[0]["coco_CIDEr"] == 1.5 and rows[1] == {"file": str(files[1]), "kind": "caption"}
    assert samples[1] == ["scored"]

    # the input rewritten after scoring: its saved scores are stale
    stamp = (tmp_path / "scores" / "scores.json").stat().st_mtime
    os.utime(files[0], (stamp + 10, stamp + 10))
    assert R.saved_scores(files[0], tmp_path / "scores") is None
    # a per-sample file that does not hold one line per record is not used either
    os.utime(files[0], (stamp - 10, stamp - 10))
    per_sample = S.per_sample_path(files[0], tmp_path / "scores")
    per_sample.write_text("".join(per_sample.read_text().splitlines(keepends=True)[:-1]))
    assert R.saved_scores(files[0], tmp_path / "scores") is None


@needs_java
def test_saved_scores_equal_scoring_again(built):
    root, _ = built
    files = [str(root / name) for name in FILES]
    rows, samples = R.scores_for(files, root / "scores", warn=lambda m: None)
    scored_rows, scored_samples, _ = S.score_files(files)
    assert rows == scored_rows and samples == scored_samples


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


@pytest.mark.slow
@needs_java
def test_report_renders_in_chromium(built, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium binary (install it with `make browser` or `apt-get install chromium`)")
    _, out = built
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        out.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    # the page's own script ran after load and checked img.complete && naturalWidth > 0
    assert attrs.get("data-images-checked") == "true", attrs
    assert attrs["data-images-total"] == str(N_IMAGES)
    assert attrs["data-images-loaded"] == str(N_IMAGES)
    assert attrs["data-images-failed"] == "0"
    assert attrs["data-rows"] == str(N_RECORDS)
    assert dom.count('<tr class="sample"') == N_RECORDS
    assert f"{N_IMAGES} of {N_IMAGES} images loaded" in dom


# ----------------------------------------------------------------------------
# Hostile text in every field the page shows stays text


def hostile(field: str) -> str:
    """Markup that would run or inject if it reached the page unescaped; ``field`` marks where it came from."""
    return f"<x-evil data-f={field} onerror=alert(1)>'\"&"  # no "/": a file name can hold it


def test_every_field_the_report_shows_is_escaped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the image folder below, relative paths as given
    images = tmp_path / "images"
    images.mkdir()
    shown_path = hostile("image_path") + ".png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(images / shown_path, format="PNG")
    caption_file, yesno_file = hostile("file") + "/sft.jsonl", hostile("file2") + "/pope.jsonl"
    captions = [
        {"idx": hostile("idx"), "image_path": shown_path, "question": hostile("question"), "chosen": hostile("chosen"),
         "response": hostile("response"), "coco_Bleu_4": hostile("coco_Bleu_4"), "coco_METEOR": hostile("coco_METEOR"),
         "coco_ROUGE_L": hostile("coco_ROUGE_L"), "coco_CIDEr": hostile("coco_CIDEr"),
         "coco_edit_distance": hostile("coco_edit_distance"), "words": hostile("words"), "chars": hostile("chars"),
         "over_125": True, "empty": False},
        {"idx": "2", "image_path": hostile("missing_path") + ".png", "question": "q", "chosen": "c", "error": hostile("error")},
        {"idx": "3", "image_path": "../" + hostile("outside_path") + ".png", "question": "q", "chosen": "c", "response": "r"},
    ]
    yesno = [{"idx": "4", "image_path": "x.png", "question": "q", "label": hostile("label"), "response": "yes",
              "pred": hostile("pred"), "correct": False, "words": hostile("yesno_words"), "chars": 3}]
    rows = [{**dict.fromkeys(S.ROW_KEYS), "file": caption_file, "kind": hostile("kind"), "n": 2, "coco_CIDEr": hostile("score")},
            {**dict.fromkeys(S.ROW_KEYS), "file": yesno_file, "kind": "yesno", "n": 1}]
    warnings = []
    page = R.render(rows, [captions, yesno], [hostile("name"), "POPE"], ["caption", "yesno"], images,
                    title=hostile("title"), warn=warnings.append)
    assert "<x-evil" not in page and "onerror=alert(1)>" not in page
    shown = re.findall(r"&lt;x-evil data-f=([\w]+) onerror=alert\(1\)&gt;", page)
    assert set(shown) == {"title", "name", "file", "file2", "kind", "score", "idx", "image_path", "question", "chosen",
                          "response", "coco_Bleu_4", "coco_METEOR", "coco_ROUGE_L", "coco_CIDEr", "coco_edit_distance",
                          "words", "chars", "missing_path", "error", "outside_path", "label", "pred", "yesno_words"}
    assert page.count("<img ") == 1 and page.count("<script") == 1
    assert 'class="placeholder">outside the image folder:<br>../&lt;x-evil data-f=outside_path' in page
    assert len(warnings) == 1 and warnings[0].startswith(f"{caption_file}, record 2: image path ../")


# ----------------------------------------------------------------------------
# Image paths stay inside --image_folder


def test_images_outside_the_image_folder_are_not_shown_unless_allowed(tmp_path, capsys):
    inside, outside = tmp_path / "images", tmp_path / "private"
    inside.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    Image.new("RGB", (8, 8)).save(inside / "ok.png")
    out_file = tmp_path / "out.jsonl"
    out_file.write_text("".join(json.dumps(r) + "\n" for r in [
        {"idx": 1, "image_path": "ok.png", "question": "q", "chosen": "a photo", "error": "x"},
        {"idx": 2, "image_path": str(outside / "secret.png"), "question": "q", "chosen": "a photo", "error": "x"},
        {"idx": 3, "image_path": "../private/secret.png", "question": "q", "chosen": "a photo", "error": "x"},
    ]))
    page_file = tmp_path / "r.html"
    assert R.main(["--data_path", str(out_file), "--image_folder", str(inside), "--output", str(page_file)]) == 0
    page = page_file.read_text()
    assert page.count("<img ") == 1 and page.count("outside the image folder") == 2
    err = capsys.readouterr().err
    assert f"{out_file}, record 1: image path {outside / 'secret.png'} is outside --image_folder {inside}" in err
    assert f"{out_file}, record 2: image path ../private/secret.png is outside --image_folder {inside}" in err

    assert R.main(["--data_path", str(out_file), "--image_folder", str(inside), "--output", str(page_file),
                   "--allow_outside_image_folder"]) == 0
    assert page_file.read_text().count("<img ") == 3
    assert "outside" not in capsys.readouterr().err
