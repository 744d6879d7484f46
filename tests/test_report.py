"""Tests for llava.eval.report: the static HTML comparison page."""

from __future__ import annotations

import base64
import html
import io
import json
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
