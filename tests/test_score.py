"""Tests for llava.eval.metrics and llava.eval.score (get_score.py): the COCO metric set,
outputs and bad input (the published set: tests/test_published_scores.py).

Starting the METEOR jar costs ~10 s, so every in-process test shares one jar
(``metrics.get_meteor()``); subprocess runs of get_score.py only go where no METEOR
is needed (input errors stop before scoring; yes/no files need no METEOR).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval import metrics as M
from llava.eval import score as S

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "eval"
CAPTION_FIXTURES = ("sft.jsonl", "dpo.jsonl", "mcm.jsonl")


def _java_ok() -> bool:
    return shutil.which("java") is not None


pytestmark = pytest.mark.skipif(not _java_ok(), reason="Java is needed for the PTB tokenizer and METEOR")


@pytest.fixture(scope="session")
def meteor():
    return M.get_meteor()


def copy_fixtures(dst: Path, *names: str) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        shutil.copy(FIX / name, dst / name)
        out.append(dst / name)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "get_score.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


# ----------------------------------------------------------------------------
# 1. Metric values against pycocoevalcap called directly
# ----------------------------------------------------------------------------

def direct_coco(responses, references, meteor):
    """The COCO pipeline by hand, as pycocoevalcap's eval.py runs it: PTB-tokenize
    references and responses, then the four scorers; empty tokenized text becomes the
    documented placeholders."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    assert isinstance(meteor, Meteor)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r}] for i, r in enumerate(references)})
    res = tok.tokenize({i: [{"caption": r}] for i, r in enumerate(responses)})
    gts = {i: [v[0] or M.EMPTY_REFERENCE_TOKEN] for i, v in gts.items()}
    res = {i: [v[0] or M.EMPTY_RESPONSE_TOKEN] for i, v in res.items()}
    corpus, each = {}, {}
    b, b_each = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        corpus[f"Bleu_{k + 1}"], each[f"Bleu_{k + 1}"] = b[k], b_each[k]
    corpus["METEOR"], each["METEOR"] = meteor.compute_score(gts, res)
    corpus["ROUGE_L"], each["ROUGE_L"] = Rouge().compute_score(gts, res)
    corpus["CIDEr"], each["CIDEr"] = Cider().compute_score(gts, res)
    return corpus, each


@pytest.mark.parametrize("name", CAPTION_FIXTURES)
def test_metrics_equal_pycocoevalcap(name, meteor):
    loaded = S.load_file(FIX / name)
    good = [r for _, r in loaded.records if not S.is_error_record(r)]
    responses = [r["response"] for r in good]
    references = [r["chosen"] for r in good]
    summary, per_sample = M.caption_scores(responses, references, meteor=meteor)
    corpus, each = direct_coco(responses, references, meteor)
    for key in M.COCO_KEYS:
        assert summary[key] == pytest.approx(100 * corpus[key], rel=0, abs=1e-9), key
        for i, sample in enumerate(per_sample):
            assert sample[key] == pytest.approx(100 * each[key][i], rel=0, abs=1e-9), (key, i)
    # the file-level numbers of the scoring command are these very numbers, under coco_ keys
    row, _ = S.score_loaded(loaded, meteor=meteor, metrics="coco")
    for key in M.COCO_KEYS:
        assert row[f"coco_{key}"] == pytest.approx(100 * corpus[key], rel=0, abs=1e-9)
    assert all(row[k] is None for k in S.PUBLISHED_ROW_KEYS)  # not asked for


def test_identical_and_disjoint_extremes(meteor):
    refs = [
        "a golden retriever puppy sniffing red tulips in a sunny garden",
        "bar chart showing revenue rising in each quarter of 2023",
        "a cup of black coffee next to an open book",
        "a runner in a blue shirt crossing the finish line",
    ]
    same, same_each = M.caption_scores(refs, refs, meteor=meteor)
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L"):
        assert same[key] == pytest.approx(100, abs=1e-6), key
        for s in same_each:
            assert s[key] == pytest.approx(100, abs=1e-6), key
    assert all(s["edit_distance"] == 0 for s in same_each)

    disjoint = ["zebra umbrella volcano", "quantum violin marmalade", "xylophone glacier pudding", "saxophone nebula tofu"]
    diff, diff_each = M.caption_scores(disjoint, refs, meteor=meteor)
    for key in M.COCO_KEYS:
        assert diff[key] == pytest.approx(0, abs=1e-6), key
        for s in diff_each:
            assert s[key] == pytest.approx(0, abs=1e-6), key
    assert diff["CIDEr"] == 0 and all(s["CIDEr"] == 0 for s in diff_each)
    # CIDEr of identical pairs is no fixed value (IDF), but beats disjoint ones everywhere
    assert same["CIDEr"] > diff["CIDEr"]
    assert all(s["CIDEr"] > 0 for s in same_each)


def test_empty_responses_score_zero_and_are_counted(meteor):
    refs = [
        "a red bicycle leaning against a brick wall",
        "two cats sleeping on a sofa",
        "a lighthouse on a rocky coast at dusk",
        "a bowl of ramen with a soft boiled egg",
    ]
    responses = ["", "   ", "...", "a bowl of ramen with an egg"]
    tok_res, _ = M.tokenize_pairs(responses, refs)
    assert tok_res[:3] == [M.EMPTY_RESPONSE_TOKEN] * 3
    summary, each = M.caption_scores(responses, refs, meteor=meteor)
    for s in each[:2]:
        assert s["empty"] is True and s["words"] == 0 and s["chars"] == 0
    assert each[2]["empty"] is False  # punctuation is text: not empty, yet scores zero
    for s in each[:3]:
        for key in ("METEOR", "ROUGE_L", "CIDEr"):
            assert s[key] == 0.0, key
        for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"):
            assert 0 <= s[key] < 1e-6, key
    assert each[3]["ROUGE_L"] > 0
    assert summary["empty"] == pytest.approx(50.0)
    # an empty response's edit distance is the reference length in words
    assert each[0]["edit_distance"] == len(refs[0].split())


def test_word_edit_distance_and_lengths():
    assert M.word_edit_distance([], []) == 0
    assert M.word_edit_distance(["a"], []) == 1
    assert M.word_edit_distance("a b c".split(), "a x c d".split()) == 2
    assert M.word_edit_distance(M.words("The Cat sat"), M.words("the cat  SAT")) == 0
    stats = M.length_stats("  " + "x" * 126 + " ")
    assert stats == {"words": 1, "chars": 126, "over_125": True, "empty": False}
    assert M.length_stats("x" * 125)["over_125"] is False
    summary = M.length_summary(["a b", "", "x" * 130, "c d e f"])
    assert summary["mean_words"] == pytest.approx(7 / 4)
    assert summary["over_125_chars"] == pytest.approx(25.0)
    assert summary["empty"] == pytest.approx(25.0)


def test_parse_yes_no():
    assert M.parse_yes_no("Yes, there is.") == "yes"
    assert M.parse_yes_no("There is no dog. Yes.") == "no"
    assert M.parse_yes_no("NO!") == "no"
    assert M.parse_yes_no("Nope, not really") is None
    assert M.parse_yes_no("eyes only") is None
    assert M.parse_yes_no("") is None


def test_ptb_line_breaks_do_not_misalign(meteor):
    # \r, \u2028, \x0b split lines in the Java tokenizer; they must not shift captions
    responses = ["first\rline", "second\u2028line", "third\x0bline", "fourth ||| line"]
    refs = ["first line", "second line", "third line", "fourth line"]
    tok_res, tok_ref = M.tokenize_pairs(responses, refs)
    assert tok_res == ["first line", "second line", "third line", "fourth line"]
    assert tok_ref == refs


# ----------------------------------------------------------------------------
# 2. Output files
# ----------------------------------------------------------------------------

def test_output_files(tmp_path, capsys, meteor):
    data = tmp_path / "runs"
    copy_fixtures(data, *CAPTION_FIXTURES)
    assert S.main(["--dir", str(data)]) == 0
    out = capsys.readouterr()

    rows = json.loads((data / "scores.json").read_text())
    assert [Path(r["file"]).name for r in rows] == ["dpo.jsonl", "mcm.jsonl", "sft.jsonl"]
    for row in rows:
        assert list(row) == list(S.ROW_KEYS)
        assert row["kind"] == "caption"
        for key in S.YESNO_KEYS:
            assert row[key] is None
    by = {Path(r["file"]).stem: r for r in rows}
    assert by["sft"]["n"] == 6 and by["sft"]["errors"] == 0
    assert by["mcm"]["n"] == 5 and by["mcm"]["errors"] == 1  # error row excluded, counted
    assert by["dpo"]["empty"] == pytest.approx(100 / 6)  # "" (the "..." is text)
    assert by["dpo"]["over_125_chars"] == pytest.approx(100 / 6)
    assert by["mcm"]["empty"] == pytest.approx(100 / 5)  # "   "
    assert by["mcm"]["coco_ROUGE_L"] > by["sft"]["coco_ROUGE_L"]
    assert by["mcm"]["published_ROUGE-L"] > by["sft"]["published_ROUGE-L"]

    # csv: same columns and values as json
    with open(data / "scores.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == list(S.ROW_KEYS)
    for line, row in zip(table[1:], rows):
        for key, cell in zip(table[0], line):
            value = row[key]
            if value is None:
                assert cell == ""
            elif isinstance(value, str):
                assert cell == value
            else:
                assert float(cell) == pytest.approx(value, rel=1e-12)

    # md: the printed tables, one titled section per metric set, numbers as json's with 2 decimals
    md = (data / "scores.md").read_text()
    assert md in out.out
    sections = md_tables(md)
    assert [title for title, _ in sections] == [S.SET_TITLES["coco"], S.SET_TITLES["published"]]
    coco_header, published_header = (lines[0] for _, lines in sections)
    assert coco_header[0] == "file" and "coco_CIDEr" in coco_header and "accuracy" not in coco_header
    assert "errors" in coco_header and "bad_lines" not in coco_header  # all-zero counts are left out
    assert not any(c.startswith("published_") for c in coco_header)
    assert published_header == ["file", "n"] + list(S.PUBLISHED_ROW_KEYS)
    for _, (header, *cells_of_rows) in sections:
        assert len(cells_of_rows) == len(rows)
        for cells, row in zip(cells_of_rows, rows):
            for key, cell in zip(header, cells):
                if key == "file":
                    assert cell == Path(row["file"]).stem
                elif isinstance(row[key], float):
                    assert cell == f"{row[key]:.2f}"
                else:
                    assert cell == str(row[key])

    # per-sample files: one line per input record, the record plus the sample keys
    for name in CAPTION_FIXTURES:
        src = read_jsonl(data / name)
        scored = read_jsonl(data / name.replace(".jsonl", "_score.jsonl"))
        assert len(scored) == len(src)
        for rec, sample in zip(src, scored):
            assert {k: sample[k] for k in rec} == rec
            assert set(sample) - set(rec) == set(S.SAMPLE_KEYS_CAPTION)
            if "error" in rec:
                assert all(sample[k] is None for k in S.SAMPLE_KEYS_CAPTION)
            else:
                assert isinstance(sample["coco_CIDEr"], float) and isinstance(sample["empty"], bool)
                assert isinstance(sample["published_CIDEr"], float)
    dpo = read_jsonl(data / "dpo_score.jsonl")
    assert dpo[2]["empty"] is True and dpo[2]["coco_ROUGE_L"] == 0.0 and dpo[2]["published_ROUGE-L"] == 0.0
    assert dpo[3]["over_125"] is True and dpo[3]["chars"] > 125
    # ROUGE-L and CIDEr of the file are the means of the per-sample values
    for key in ("coco_ROUGE_L", "coco_CIDEr"):
        assert by["dpo"][key] == pytest.approx(sum(s[key] for s in dpo) / len(dpo))
    for key in ("published_ROUGE-L", "published_CIDEr"):  # rounded to 5 digits before x100, as released
        assert by["dpo"][key] == pytest.approx(sum(s[key] for s in dpo) / len(dpo), abs=0.0005)

    # a second run over the same folder skips the *_score.jsonl it wrote; with --out_dir
    # every output, the per-sample files included, goes there and the inputs' folder is untouched
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    assert S.main(["--dir", str(data), "--out_dir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "scores.json").read_text())
    assert [r["file"] for r in again] == [r["file"] for r in rows]
    assert again == rows
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    for name in CAPTION_FIXTURES:
        per_sample = name.replace(".jsonl", "_score.jsonl")
        assert (tmp_path / "again" / per_sample).read_bytes() == before[per_sample]
    assert not list(data.glob("*_score_score.jsonl"))
    assert not list(data.glob(".*.tmp"))


# ----------------------------------------------------------------------------
# 3. Bad input
# ----------------------------------------------------------------------------

def test_unparseable_lines_reported_and_counted(tmp_path, capsys, meteor):
    (src,) = copy_fixtures(tmp_path, "bad_lines.jsonl")
    assert S.main(["--file", str(src)]) == 0
    err = capsys.readouterr().err
    assert f"{src}, line 3: skipped unparseable line: not valid JSON" in err
    assert f"{src}, line 4: skipped unparseable line: not a JSON object" in err
    assert "line 5" not in err  # a blank line is no bad line
    (row,) = json.loads((tmp_path / "scores.json").read_text())
    assert row["bad_lines"] == 2 and row["n"] == 3
    assert [r["idx"] for r in read_jsonl(tmp_path / "bad_lines_score.jsonl")] == [1, 2, 5]


@pytest.mark.parametrize(
    "name, line, field",
    [("missing_response.jsonl", 2, "response"), ("missing_chosen.jsonl", 3, "chosen")],
)
def test_missing_field_is_a_clear_error(tmp_path, name, line, field):
    (src,) = copy_fixtures(tmp_path, name)
    proc = run_cli("--file", str(src))
    assert proc.returncode == 2
    assert f"{src}, line {line}: missing field '{field}'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written


def test_duplicate_idx_reported(tmp_path, capsys, meteor):
    (src,) = copy_fixtures(tmp_path, "dup_idx.jsonl")
    assert S.main(["--file", str(src)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {src}: duplicate idx 7 on lines 2 and 4" in err
    (row,) = json.loads((tmp_path / "scores.json").read_text())
    assert row["duplicate_idx"] == 1 and row["n"] == 4  # both records are scored


def md_tables(md: str) -> list[tuple[str, list[list[str]]]]:
    """``(title, [header, row cells...])`` of each ``### title`` section of scores.md."""
    sections = []
    for line in md.splitlines():
        if line.startswith("### "):
            sections.append((line[4:], []))
        elif line.startswith("|") and not line.startswith("|---"):
            sections[-1][1].append([c.strip() for c in line.strip("|").split("|")])
    return sections


def test_yes_no_metrics(tmp_path):
    # yesno.jsonl: TP 2, FP 1, FN 2 (one without a yes/no word), TN 2, 2 unparsed, 1 error row
    (src,) = copy_fixtures(tmp_path, "yesno.jsonl")
    proc = run_cli("--file", str(src), "--out_dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert list(row) == list(S.ROW_KEYS)
    assert row["kind"] == "yesno" and row["n"] == 8 and row["errors"] == 1
    assert row["accuracy"] == pytest.approx(50.0)
    assert row["precision"] == pytest.approx(200 / 3)
    assert row["recall"] == pytest.approx(50.0)
    assert row["f1"] == pytest.approx(400 / 7)
    assert row["yes_ratio"] == pytest.approx(37.5)
    assert row["unparsed"] == 2
    for key in S.CAPTION_KEYS:
        assert row[key] is None
    assert row["mean_words"] is not None
    ((title, (header, _)),) = md_tables(proc.stdout)  # no caption metric: one table
    assert title == "Scores"
    assert "accuracy" in header and "f1" in header and not any(c in S.CAPTION_KEYS for c in header)
    assert not (tmp_path / "yesno_score.jsonl").exists()  # --out_dir given: the per-sample file goes there
    samples = read_jsonl(tmp_path / "out" / "yesno_score.jsonl")
    assert len(samples) == 9
    assert [s["pred"] for s in samples[:8]] == ["yes", "yes", "no", "no", "no", "yes", None, None]
    assert [s["correct"] for s in samples[:8]] == [True, True, False, True, True, False, False, False]
    assert samples[8]["pred"] is None and samples[8]["correct"] is None


def test_cli_arguments(tmp_path):
    proc = run_cli()
    assert proc.returncode == 2 and "--file" in proc.stderr
    proc = run_cli("--file", str(tmp_path / "nope.jsonl"))
    assert proc.returncode == 2 and "nope.jsonl: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("--dir", str(tmp_path))
    assert proc.returncode == 2 and "no *.jsonl files" in proc.stderr
    proc = run_cli("--file", str(FIX / "sft.jsonl"), "--metrics", "bleu")
    assert proc.returncode == 2 and "invalid choice: 'bleu'" in proc.stderr


def test_same_names_into_one_out_dir_is_an_error(tmp_path):
    a = copy_fixtures(tmp_path / "a", "yesno.jsonl")[0]
    b = copy_fixtures(tmp_path / "b", "yesno.jsonl")[0]
    proc = run_cli("--file", str(a), str(b), "--out_dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"{a} and {b} would both write {tmp_path / 'out' / 'yesno_score.jsonl'}" in proc.stderr
    assert not (tmp_path / "out").exists()
    # without --out_dir each per-sample file goes beside its input: no clash
    proc = run_cli("--file", str(a), str(b))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a" / "yesno_score.jsonl").is_file() and (tmp_path / "b" / "yesno_score.jsonl").is_file()


def test_scoring_another_file_into_the_same_place_is_refused(tmp_path, capsys, meteor):
    """get_score.py --file A, then --file B beside it: B's scores do not replace A's (issue 24, symptom 6)."""
    sft, dpo = copy_fixtures(tmp_path, "sft.jsonl", "dpo.jsonl")
    assert S.main(["--file", str(sft), "--metrics", "published"]) == 0
    assert f"wrote {tmp_path / 'scores.json'}, scores.csv and scores.md; per sample: {tmp_path / 'sft_score.jsonl'}" \
        in capsys.readouterr().err
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as e:
        S.main(["--file", str(dpo), "--metrics", "published"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0
    assert f"{tmp_path / 'scores.json'} holds the scores of {sft.resolve()}: not written over; use another " \
           "--output_dir, or --overwrite to replace them" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, not even dpo_score.jsonl
    assert S.main(["--file", str(sft), "--metrics", "published"]) == 0  # the same input again: rewritten
    assert S.main(["--file", str(dpo), "--metrics", "published", "--overwrite"]) == 0
    assert [r["file"] for r in json.loads((tmp_path / "scores.json").read_text())] == [str(dpo)]
