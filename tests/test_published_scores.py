"""The published metric set of get_score.py (llava.eval.published_metrics) against nltk's and
rouge's functions called directly here, pycocoevalcap's CIDEr scorer, and a CIDEr by hand.

The direct computation follows the released scorer's steps (docs/method.md#scores):
nltk ``word_tokenize``, ``sentence_bleu`` with one-hot weights, ``meteor_score``, the
``rouge`` package's ROUGE-L F, CIDEr-D on whitespace tokens, the token edit distance;
per-sample values summed, averaged, then ``round(mean, 5) * 100`` (edit distance:
``round(mean, 3)``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from llava.eval import metrics as M
from llava.eval import nltk_data as D
from llava.eval import published_metrics as P
from llava.eval import score as S
from tests.conftest import SHARED

REPO = Path(__file__).resolve().parents[1]
SEED_TRAIN = sorted(SHARED.glob("seed-data/*/*_train.json"))


def _nltk_data_problem() -> str | None:
    try:
        P.check_nltk_data()
    except M.MetricError as exc:
        return str(exc)
    return None


needs_nltk_data = pytest.mark.skipif(_nltk_data_problem() is not None, reason=str(_nltk_data_problem()))


# ----------------------------------------------------------------------------
# The released computation, straight from nltk, rouge and pycocoevalcap
# ----------------------------------------------------------------------------

def direct_published(responses: list[str], references: list[str]) -> tuple[dict, list[dict]]:
    """``(file_values, per_sample)``: per-sample values in [0, 1] (edit distance in tokens)."""
    from nltk import word_tokenize
    from nltk.metrics.distance import edit_distance
    from nltk.translate.bleu_score import sentence_bleu
    from nltk.translate.meteor_score import meteor_score
    from pycocoevalcap.cider.cider_scorer import CiderScorer
    from rouge import Rouge

    cider = CiderScorer(n=4, sigma=6.0)
    per_sample = []
    for response, reference in zip(responses, references, strict=True):
        if response.startswith("Assistant:"):
            response = response[len("Assistant:") :]
        response = response.strip()
        ref, hyp = word_tokenize(reference), word_tokenize(response)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bleu = [sentence_bleu([ref], hyp, weights=w) for w in ((1, 0, 0, 0), (0, 0, 0, 1), (0.25,) * 4)]
        try:
            rouge = Rouge().get_scores(response, reference, avg=True)["rouge-l"]["f"] if response else 0.0
        except ValueError:
            rouge = 0.0
        per_sample.append(
            {
                "bleu_1": bleu[0],
                "bleu_4": bleu[1],
                "cumulative_bleu_4": bleu[2],
                "METEOR": meteor_score([ref], hyp),
                "ROUGE-L": rouge,
                "edit_distance": edit_distance(ref, hyp),
            }
        )
        cider += (response, [reference])
    _, cider_each = cider.compute_score()
    for sample, value in zip(per_sample, cider_each, strict=True):
        sample["CIDEr"] = float(value)
    n = len(per_sample)
    values = {k: round(sum(s[k] for s in per_sample) / n, 5) * 100 for k in P.SCALED_KEYS if k != "CIDEr"}
    values["CIDEr"] = float(np.round(np.mean(cider_each), 5)) * 100
    values["edit_distance"] = round(sum(s["edit_distance"] for s in per_sample) / n, 3)
    return values, per_sample


def assert_matches_direct(row: dict, samples: list[dict], responses: list[str], references: list[str]) -> None:
    values, each = direct_published(responses, references)
    for key in P.PUBLISHED_KEYS:
        assert row[f"published_{key}"] == pytest.approx(values[key], rel=0, abs=1e-9), key
        for i, (sample, direct) in enumerate(zip(samples, each, strict=True)):
            scale = 100.0 if key in P.SCALED_KEYS else 1.0
            assert sample[f"published_{key}"] == pytest.approx(scale * direct[key], rel=0, abs=1e-9), (key, i)


def seed_pairs() -> list[dict]:
    """The published training records as scorer input: rejected alt-text as the
    response, chosen as the reference (``text`` is a JSON string)."""
    records = []
    for path in SEED_TRAIN:
        for record in json.loads(path.read_text(encoding="utf-8")):
            text = json.loads(record["text"])
            records.append({"idx": f"{path.stem}/{record['idx']}", "response": text["rejected"], "chosen": text["chosen"]})
    return records


# ----------------------------------------------------------------------------
# Acceptance: the published samples, through the command line
# ----------------------------------------------------------------------------

@needs_nltk_data
@pytest.mark.skipif(not SEED_TRAIN, reason=f"{SHARED}/seed-data/*/*_train.json absent (the repository's sibling shared/)")
def test_published_training_records_match_direct_nltk_and_rouge(tmp_path):
    records = seed_pairs()
    assert len(records) == 20
    # a leading "Assistant:" (as some outputs have) is removed, as released
    records[0]["response"] = "Assistant: " + records[0]["response"]
    src = tmp_path / "published_train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"}  # found without it
    proc = subprocess.run(
        [sys.executable, str(REPO / "get_score.py"), "--file", str(src), "--metrics", "published",
         "--out_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads((tmp_path / "out" / "scores.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "out" / "published_train_score.jsonl").read_text().splitlines()]
    assert row["n"] == 20 and len(samples) == 20
    assert all(row[k] is None for k in S.COCO_ROW_KEYS)  # --metrics published: the COCO set is not computed
    assert_matches_direct(row, samples, [r["response"] for r in records], [r["chosen"] for r in records])
    assert 0 < row["published_bleu_4"] < row["published_bleu_1"] < 100
    # the printed table is the published section (plus counts and lengths), titled as such
    assert S.SET_TITLES["published"] in proc.stdout and S.SET_TITLES["coco"] not in proc.stdout


# ----------------------------------------------------------------------------
# The released details, one by one
# ----------------------------------------------------------------------------

@needs_nltk_data
def test_edge_cases_match_direct():
    responses = [
        "Assistant: A Golden Retriever puppy sniffs red tulips. It is sunny!",  # case kept, two sentences
        "  Assistant: leading blanks keep the prefix",  # ^Assistant: only at position 0
        "Assistant: Assistant: only the first one goes",
        "",  # empty: ROUGE-L 0 without calling rouge
        "...",  # rouge refuses (no sentence): 0, still counted
        "Dr. Smith's cat, e.g. a tabby, sleeps on the sofa.",
    ]
    references = [
        "A golden retriever puppy sniffing red tulips in a sunny garden.",
        "leading blanks keep the prefix",
        "only the first one goes",
        "two cats sleeping on a sofa",
        "a lighthouse on a rocky coast",
        "Dr. Smith's tabby cat sleeping on a sofa.",
    ]
    from rouge import Rouge

    with pytest.raises(ValueError):  # what makes the "..." case a case
        Rouge().get_scores("...", references[4], avg=True)
    values, each = P.published_scores(responses, references)
    row = {f"published_{k}": v for k, v in values.items()}
    samples = [{f"published_{k}": v for k, v in s.items()} for s in each]
    assert_matches_direct(row, samples, responses, references)
    assert P.clean_response(responses[1]) == responses[1].strip()
    assert P.clean_response(responses[2]) == "Assistant: only the first one goes"
    assert P.tokenize(responses[0])[:3] == ["Assistant", ":", "A"]  # word_tokenize keeps case
    assert P.tokenize(P.clean_response(responses[0]))[:3] == ["A", "Golden", "Retriever"]
    for key in P.SCALED_KEYS:
        assert each[3][key] == 0.0 and each[4][key] == 0.0, key


def test_cider_by_hand():
    # references "a b", "a c"; candidates "a b", "c". Two references: IDF = ln 2 - ln df, so
    # "a" (in both) weighs 0, "b", "c", "a b", "a c" weigh ln 2. The length is the bigram count.
    # 1: unigram and bigram cosines 1, no 3/4-grams, equal lengths: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # 2: unigram cosine 1 ("c" against "a c"), no bigram, lengths 0 and 1: 10 * exp(-1/72) / 4.
    got = P.cider_d(["a b", "c"], ["a b", "a c"])
    assert got == pytest.approx([5.0, 2.5 * math.exp(-1 / 72)], rel=0, abs=1e-12)
    # case is kept and tokens are whitespace-split: "A" is not "a", "b." is not "b"
    assert P.cider_d(["A b.", "c"], ["a b", "a c"])[0] == 0.0
    # one reference only: every IDF is log(1) - log(1) = 0
    assert P.cider_d(["a b"], ["a b"]) == [0.0]
    # the file value: numpy's mean, rounded to 5 digits, x100
    assert P.file_values([{k: 0 for k in P.PUBLISHED_KEYS}] * 2, got)["CIDEr"] == round(
        (5.0 + 2.5 * math.exp(-1 / 72)) / 2, 5
    ) * 100


def test_cider_equals_pycocoevalcap_scorer_on_whitespace_tokens():
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    candidates = ["A dog runs on the beach", "two cats on a sofa", "a red bike", "Red bike leaning on a wall", ""]
    references = ["A dog running on a beach", "Two cats sleeping on a sofa", "a red bike by a wall",
                  "a red bike leaning against a brick wall", "an empty room"]
    scorer = CiderScorer(n=4, sigma=6.0)
    for c, r in zip(candidates, references, strict=True):
        scorer += (c, [r])
    _, expected = scorer.compute_score()
    assert P.cider_d(candidates, references) == pytest.approx(list(expected), rel=0, abs=1e-12)


def test_rounding_as_released():
    # round(mean, 5) * 100 keeps the float noise of the multiplication, as released
    raw = [dict.fromkeys(P.PUBLISHED_KEYS, 0.0) for _ in range(3)]
    for sample, v in zip(raw, (0.1, 0.2, 0.123456), strict=True):
        sample["bleu_1"] = v
        sample["edit_distance"] = 3 * v
    values = P.file_values(raw, [0.0, 0.0, 0.0])
    assert values["bleu_1"] == round((0.1 + 0.2 + 0.123456) / 3, 5) * 100
    assert values["edit_distance"] == round((0.3 + 0.6 + 0.370368) / 3, 3)
    assert P.file_values([], []) == dict.fromkeys(P.PUBLISHED_KEYS)


# ----------------------------------------------------------------------------
# nltk data: built from packages, a clear message when missing
# ----------------------------------------------------------------------------

def test_missing_nltk_data_is_one_line(tmp_path, monkeypatch, capsys):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(M.MetricError) as err:
        P.check_nltk_data()
    assert "tokenizers/punkt_tab/english/" in str(err.value) and "make setup" in str(err.value)
    src = tmp_path / "run.jsonl"
    src.write_text(json.dumps({"response": "a dog", "chosen": "a dog"}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        S.main(["--file", str(src), "--metrics", "published"])
    assert exit_.value.code == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: the published metrics need")
    assert not (tmp_path / "scores.json").exists()


@pytest.mark.skipif(not D.LEXNAMES_MAN_PAGE.is_file(), reason=f"{D.LEXNAMES_MAN_PAGE} absent (Debian wordnet-base)")
@pytest.mark.filterwarnings("ignore:The multilingual functions")  # a reader built without Open Multilingual Wordnet
def test_nltk_data_built_from_packages(tmp_path, monkeypatch):
    import gzip

    import nltk
    import punkt
    from nltk.corpus.reader.wordnet import WordNetCorpusReader
    from nltk.tokenize.punkt import PunktTokenizer

    dest = tmp_path / "nltk_data"
    assert D.build(dest) is True
    assert D.build(dest) is False  # complete and current: left alone
    man = gzip.decompress(D.LEXNAMES_MAN_PAGE.read_bytes()).decode()
    rows = D.lexnames_rows(man)
    lexnames = (dest / "corpora" / "wordnet" / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45 and lexnames[0] == "00\tadj.all\t3" and lexnames[44] == f"44\t{rows[44][1]}\t3"
    assert "05\tnoun.animal\t1" in lexnames and "29\tverb.body\t2" in lexnames
    monkeypatch.setattr(nltk.data, "path", [str(dest)])  # nltk reads data only under its data path
    wordnet = WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)
    assert wordnet.synsets("dog")[0].lexname() == "noun.animal"
    # nltk's own loader reads back exactly the packaged Punkt English parameters
    tokenizer = PunktTokenizer("english")
    params = tokenizer._params
    packaged = punkt.load_model("english")
    assert params.abbrev_types == packaged.abbrev_types and len(params.abbrev_types) == 156
    assert params.sent_starters == packaged.sent_starters
    assert params.collocations == packaged.collocations
    assert dict(params.ortho_context) == packaged.ortho_context
    assert tokenizer.tokenize("Dr. Smith went home. He was tired.") == [
        "Dr. Smith went home.",
        "He was tired.",
    ]
    with pytest.raises(D.DataError, match="45 rows"):
        D.lexnames_rows("00\tadj.all\tall adjective clusters\n")
