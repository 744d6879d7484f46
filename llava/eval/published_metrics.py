"""The caption metrics as the authors' released scorer computes them (the paper's numbers).

Per record: nltk ``word_tokenize`` (case kept), ``sentence_bleu`` with one-hot weights, nltk METEOR,
ROUGE-L F of the ``rouge`` package, the token edit distance, and CIDEr-D on whitespace-split text
(:func:`cider_d`); file values averaged and rounded as released. Every step, with why, is in
docs/scores.md.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from typing import Sequence

import numpy as np

from llava.eval.metrics import MetricError, word_edit_distance

#: File-level keys, named as the released scorer names them.
PUBLISHED_KEYS = ("bleu_1", "bleu_4", "cumulative_bleu_4", "METEOR", "ROUGE-L", "CIDEr", "edit_distance")
#: Keys reported x100 (the edit distance is a count of tokens).
SCALED_KEYS = PUBLISHED_KEYS[:-1]

NLTK_RESOURCES = (
    ("tokenizers/punkt_tab/english/", "the Punkt English model"),
    ("corpora/wordnet", "WordNet"),
)
HOW_TO_GET_NLTK_DATA = "run `make setup` (or `python -m llava.eval.nltk_data`), or score with --metrics coco"

_LEADING_ASSISTANT = re.compile(r"^Assistant:")


def check_nltk_data() -> None:
    """Raise :class:`MetricError` (one line) when nltk cannot find its data."""
    import nltk

    for resource, what in NLTK_RESOURCES:
        try:
            nltk.data.find(resource)
        except LookupError:
            raise MetricError(
                f"the published metrics need {what} for nltk ({resource}), not found in nltk's data path: "
                f"{HOW_TO_GET_NLTK_DATA}"
            ) from None


def clean_response(response: str) -> str:
    """The response as the released scorer scores it: a leading ``Assistant:`` removed
    (only at position 0), then outer whitespace stripped."""
    return _LEADING_ASSISTANT.sub("", response).strip()


def tokenize(text: str) -> list[str]:
    """nltk's ``word_tokenize`` (English Punkt sentences, then words; case kept)."""
    from nltk.tokenize import word_tokenize

    return word_tokenize(text)


@contextmanager
def _recursion_limit(at_least: int):
    """The rouge package reconstructs LCS recursively (depth ~ the two sentence lengths);
    the released scorer raised Python's limit to 10**5 so long texts do not fail."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, at_least))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def rouge_l_f(candidate: str, reference: str) -> float:
    """ROUGE-L F of the ``rouge`` package; 0 for an empty candidate or a text it refuses."""
    from rouge import Rouge

    if not candidate:
        return 0.0
    try:
        with _recursion_limit(10**5):
            return float(Rouge().get_scores(candidate, reference, avg=True)["rouge-l"]["f"])
    except ValueError:  # "Collections must contain at least 1 sentence": e.g. "..." or an empty reference
        return 0.0


def sample_scores(response: str, reference: str) -> dict:
    """The released per-sample values of an already cleaned response: BLEU, METEOR and
    ROUGE-L in [0, 1], the edit distance in tokens."""
    from nltk.translate.bleu_score import sentence_bleu
    from nltk.translate.meteor_score import meteor_score

    ref_tokens = tokenize(reference)
    hyp_tokens = tokenize(response)
    with warnings.catch_warnings():
        # nltk warns for every hypothesis without some n-gram overlap; the value (0 or
        # the float minimum's contribution) is what the released scorer got too.
        warnings.simplefilter("ignore", UserWarning)
        bleu_1 = sentence_bleu([ref_tokens], hyp_tokens, weights=(1, 0, 0, 0))
        bleu_4 = sentence_bleu([ref_tokens], hyp_tokens, weights=(0, 0, 0, 1))
        cumulative = sentence_bleu([ref_tokens], hyp_tokens, weights=(0.25, 0.25, 0.25, 0.25))
    return {
        "bleu_1": float(bleu_1),
        "bleu_4": float(bleu_4),
        "cumulative_bleu_4": float(cumulative),
        "METEOR": float(meteor_score([ref_tokens], hyp_tokens)),
        "ROUGE-L": rouge_l_f(response, reference),
        "edit_distance": word_edit_distance(ref_tokens, hyp_tokens),
    }


# ----------------------------------------------------------------------------
# CIDEr-D on whitespace tokens
# ----------------------------------------------------------------------------

def ngram_counts(text: str, max_n: int = 4) -> Counter:
    """Counts of every 1..max_n-gram of the whitespace-split (case-kept) text."""
    words = text.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, max_n + 1) for i in range(len(words) - k + 1))


def _tfidf(counts: Counter, doc_freq: Counter, log_n_refs: float, max_n: int):
    """Per n-gram order: the tf-idf vector and its norm; plus the text's "length",
    which the reference CIDEr-D code takes as its number of *bigrams*."""
    vectors: list[dict] = [{} for _ in range(max_n)]
    for ngram, tf in counts.items():
        vectors[len(ngram) - 1][ngram] = tf * (log_n_refs - math.log(max(1.0, doc_freq[ngram])))
    norms = [math.sqrt(sum(w * w for w in vec.values())) for vec in vectors]
    length = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)
    return vectors, norms, length


def cider_d(candidates: Sequence[str], references: Sequence[str], max_n: int = 4, sigma: float = 6.0) -> list[float]:
    """Per-sample CIDEr-D of each candidate against its single reference.

    IDF: log(number of references) - log(max(1, number of references holding the
    n-gram)). Per order: the cosine of the clipped tf-idf vectors
    (sum of min(hyp, ref) * ref over the norms), times exp(-delta^2 / (2 sigma^2))
    with delta the difference of the two lengths; the score is 10 x the mean over
    the orders.
    """
    if len(candidates) != len(references):
        raise ValueError("candidates and references differ in length")
    ref_counts = [ngram_counts(r, max_n) for r in references]
    doc_freq: Counter = Counter(ngram for counts in ref_counts for ngram in counts)
    log_n_refs = math.log(len(references)) if references else 0.0
    scores = []
    for candidate, ref in zip(candidates, ref_counts):
        hyp_vec, hyp_norm, hyp_len = _tfidf(ngram_counts(candidate, max_n), doc_freq, log_n_refs, max_n)
        ref_vec, ref_norm, ref_len = _tfidf(ref, doc_freq, log_n_refs, max_n)
        penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2))
        per_order = []
        for k in range(max_n):
            overlap = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, w in hyp_vec[k].items())
            if hyp_norm[k] and ref_norm[k]:
                overlap /= hyp_norm[k] * ref_norm[k]
            per_order.append(overlap * penalty)
        scores.append(10.0 * sum(per_order) / max_n)
    return scores


# ----------------------------------------------------------------------------
# One file
# ----------------------------------------------------------------------------

def file_values(per_sample_raw: Sequence[dict], cider: Sequence[float]) -> dict:
    """The released file-level numbers from raw per-sample values (see module doc)."""
    n = len(per_sample_raw)
    if n == 0:
        return dict.fromkeys(PUBLISHED_KEYS)
    out = {}
    for key in ("bleu_1", "bleu_4", "cumulative_bleu_4", "METEOR", "ROUGE-L", "edit_distance"):
        total = 0.0
        for sample in per_sample_raw:  # summed in file order, like the released loop
            total += sample[key]
        mean = total / n
        out[key] = round(mean, 3) if key == "edit_distance" else round(mean, 5) * 100
    # the released CIDEr mean is numpy's, and so is its rounding (round() of a numpy float)
    out["CIDEr"] = float(np.round(np.mean(np.asarray(cider, dtype=float)), 5)) * 100
    return {key: out[key] for key in PUBLISHED_KEYS}


def published_scores(responses: Sequence[str], references: Sequence[str]) -> tuple[dict, list[dict]]:
    """``(file_values, per_sample)`` for one file, both keyed by ``PUBLISHED_KEYS``.

    ``responses`` are raw model outputs (the leading ``Assistant:`` is removed here).
    """
    if len(responses) != len(references):
        raise ValueError("responses and references differ in length")
    cleaned = [clean_response(r) for r in responses]
    raw = [sample_scores(c, ref) for c, ref in zip(cleaned, references)]
    cider = cider_d(cleaned, references)
    for sample, value in zip(raw, cider):
        sample["CIDEr"] = value
    per_sample = [
        {key: 100.0 * s[key] if key in SCALED_KEYS else s[key] for key in PUBLISHED_KEYS} for s in raw
    ]
    return file_values(raw, cider), per_sample
