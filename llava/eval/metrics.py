"""Metric computation for alt-text evaluation: pure functions on lists of strings.

The COCO caption pipeline of ``pycocoevalcap`` (PTB tokenizer, ``Bleu(4)``, ``Meteor()``, ``Rouge()``,
``Cider()``), reported x100, corpus values as the scorers return them; empty responses score zero.
How empty text is handled and why, and CIDEr's file-level IDF: docs/scores.md.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager
from typing import Iterable, Sequence

#: Replaces a response that is empty after PTB tokenization (matches nothing).
EMPTY_RESPONSE_TOKEN = "xxemptyresponsexx"
#: Replaces a reference that is empty after PTB tokenization (matches nothing).
EMPTY_REFERENCE_TOKEN = "xxemptyreferencexx"

#: Screen-reader guidance: alt-text should stay within 125 characters.
ALT_TEXT_MAX_CHARS = 125

#: Caption metric keys in the order pycocoevalcap reports them.
COCO_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


class MetricError(RuntimeError):
    """A scorer (Java tokenizer or METEOR) failed; the message says why."""


# ----------------------------------------------------------------------------
# Text helpers
# ----------------------------------------------------------------------------

def clean_for_ptb(text: str) -> str:
    """Prepare one caption for the line-based Java tools.

    The PTB tokenizer runs with ``-preserveLines``: any line break (``\\n``, ``\\r``,
    ``\\x0b``, ``\\x0c``, ``\\u2028``...) would split one caption into two lines and
    misalign every later caption, so all of them become spaces. ``|||`` is METEOR's
    field separator and is removed as well.
    """
    text = " ".join(text.splitlines())
    return text.replace("|||", " ")


def words(text: str) -> list[str]:
    """Lower-cased whitespace tokens (used for edit distance and word counts)."""
    return text.lower().split()


def word_edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (unit costs)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, token_a in enumerate(a, start=1):
        current = [i] + [0] * len(b)
        for j, token_b in enumerate(b, start=1):
            current[j] = min(
                previous[j] + 1,  # deletion
                current[j - 1] + 1,  # insertion
                previous[j - 1] + (token_a != token_b),  # substitution
            )
        previous = current
    return previous[-1]


def length_stats(response: str) -> dict:
    """Per-sample length statistics of one response (stripped of outer whitespace)."""
    text = response.strip()
    return {
        "words": len(text.split()),
        "chars": len(text),
        "over_125": len(text) > ALT_TEXT_MAX_CHARS,
        "empty": not text,
    }


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return float(sum(values) / len(values)) if values else None


def length_summary(responses: Sequence[str]) -> dict:
    """File-level length statistics: means, and shares in percent (x100)."""
    stats = [length_stats(r) for r in responses]
    return {
        "mean_words": _mean(s["words"] for s in stats),
        "mean_chars": _mean(s["chars"] for s in stats),
        "over_125_chars": _mean(100.0 * s["over_125"] for s in stats),
        "empty": _mean(100.0 * s["empty"] for s in stats),
    }


# ----------------------------------------------------------------------------
# Java tools
# ----------------------------------------------------------------------------

@contextmanager
def _quiet_stderr():
    """Hide the Java tools' progress chatter on fd 2; replay it if the block fails."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:
                sink.seek(0)
                chatter = sink.read().decode("utf-8", "replace").strip()
                if chatter:
                    print(chatter, file=sys.stderr)


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """PTB-tokenize many captions with a single Java call (pycocoevalcap's PTBTokenizer).

    Returns the tokenized captions in input order (lower-cased, punctuation removed).
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not texts:
        return []
    payload = {i: [{"caption": clean_for_ptb(t)}] for i, t in enumerate(texts)}
    try:
        with _quiet_stderr():
            tokenized = PTBTokenizer().tokenize(payload)
    except FileNotFoundError as exc:
        raise MetricError(f"cannot run the PTB tokenizer (is Java installed?): {exc}") from exc
    except OSError as exc:
        raise MetricError(f"PTB tokenizer failed: {exc}") from exc
    if len(tokenized) != len(texts):
        raise MetricError(f"PTB tokenizer returned {len(tokenized)} lines for {len(texts)} captions")
    return [tokenized[i][0] for i in range(len(texts))]


_METEOR = None
_METEOR_LOCK = threading.Lock()


def get_meteor():
    """One METEOR jar process per Python process (starting it costs ~10 s of loading).

    ``Meteor()`` returns as soon as the JVM is spawned, so calling this early lets the
    jar load while other work runs.
    """
    global _METEOR
    with _METEOR_LOCK:
        if _METEOR is None or _METEOR.meteor_p.poll() is not None:
            from pycocoevalcap.meteor.meteor import Meteor

            try:
                _METEOR = Meteor()
            except FileNotFoundError as exc:
                raise MetricError(f"cannot start METEOR (is Java installed?): {exc}") from exc
        return _METEOR


# ----------------------------------------------------------------------------
# Caption metrics
# ----------------------------------------------------------------------------

def tokenize_pairs(responses: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[str]]:
    """PTB-tokenize responses and references together (one Java call) and apply the
    empty-text placeholders. Returns ``(tokenized_responses, tokenized_references)``."""
    if len(responses) != len(references):
        raise ValueError("responses and references differ in length")
    n = len(responses)
    # Blank texts never reach the tokenizer (it works line by line): they become the
    # placeholders up front; texts that tokenize to nothing (punctuation only) after.
    texts = [r if clean_for_ptb(r).strip() else EMPTY_RESPONSE_TOKEN for r in responses]
    texts += [r if clean_for_ptb(r).strip() else EMPTY_REFERENCE_TOKEN for r in references]
    tokens = ptb_tokenize(texts)
    tok_res = [t.strip() or EMPTY_RESPONSE_TOKEN for t in tokens[:n]]
    tok_ref = [t.strip() or EMPTY_REFERENCE_TOKEN for t in tokens[n:]]
    return tok_res, tok_ref


def coco_scores(tok_res: Sequence[str], tok_ref: Sequence[str], meteor=None) -> tuple[dict, list[dict]]:
    """Run Bleu(4), Meteor(), Rouge(), Cider() on already tokenized, non-empty pairs.

    Returns ``(corpus, per_sample)``; both hold the ``COCO_KEYS`` values x100.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    n = len(tok_res)
    if n == 0:
        return {k: None for k in COCO_KEYS}, []
    gts = {i: [tok_ref[i]] for i in range(n)}
    res = {i: [tok_res[i]] for i in range(n)}
    corpus: dict = {}
    per: dict = {}

    def keep(name: str, score, each) -> None:
        corpus[name] = float(score)
        per[name] = [float(v) for v in each]

    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        keep(f"Bleu_{k + 1}", bleu[k], bleu_each[k])
    if meteor is None:
        meteor = get_meteor()
    try:
        keep("METEOR", *meteor.compute_score(gts, res))
    except (ValueError, BrokenPipeError) as exc:  # the jar died: empty reads / closed pipe
        raise MetricError(f"METEOR failed: {exc}") from exc
    for name, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        keep(name, *scorer.compute_score(gts, res))

    corpus = {k: 100.0 * corpus[k] for k in COCO_KEYS}
    per_sample = [{k: 100.0 * per[k][i] for k in COCO_KEYS} for i in range(n)]
    return corpus, per_sample


def caption_scores(responses: Sequence[str], references: Sequence[str], meteor=None) -> tuple[dict, list[dict]]:
    """All caption metrics for one file.

    Returns ``(summary, per_sample)``. ``summary`` holds ``COCO_KEYS``,
    ``edit_distance``, ``mean_words``, ``mean_chars``, ``over_125_chars`` and ``empty``
    (the last two in percent); ``per_sample`` holds, per pair, ``COCO_KEYS``,
    ``edit_distance``, ``words``, ``chars``, ``over_125`` and ``empty``.
    """
    if len(responses) != len(references):
        raise ValueError("responses and references differ in length")
    if responses:
        tok_res, tok_ref = tokenize_pairs(responses, references)
        corpus, coco_each = coco_scores(tok_res, tok_ref, meteor=meteor)
    else:
        corpus, coco_each = {k: None for k in COCO_KEYS}, []
    per_sample = []
    for i, (response, reference) in enumerate(zip(responses, references)):
        sample = dict(coco_each[i])
        sample["edit_distance"] = word_edit_distance(words(response), words(reference))
        sample.update(length_stats(response))
        per_sample.append(sample)
    summary = dict(corpus)
    summary["edit_distance"] = _mean(s["edit_distance"] for s in per_sample)
    summary.update(length_summary(responses))
    return summary, per_sample


# ----------------------------------------------------------------------------
# Yes/no (POPE-style) metrics
# ----------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+")


def parse_yes_no(response: str) -> str | None:
    """The first word of the response that is ``yes`` or ``no`` (case-insensitive,
    punctuation ignored); ``None`` when there is none."""
    for word in _WORD.findall(response.lower()):
        if word in ("yes", "no"):
            return word
    return None


def yes_no_scores(responses: Sequence[str], labels: Sequence[str]) -> tuple[dict, list[dict]]:
    """POPE-style metrics, "yes" being the positive class, all x100.

    A response with no yes/no word (``pred`` None) is wrong for accuracy and counts
    as neither a yes nor a no prediction (it lowers recall, not precision); it is
    counted in ``unparsed``. Precision, recall or F1 with a zero denominator are 0.
    Labels must already be normalised to "yes"/"no".
    """
    if len(responses) != len(labels):
        raise ValueError("responses and labels differ in length")
    per_sample = []
    tp = fp = fn = correct = yes = unparsed = 0
    for response, label in zip(responses, labels):
        pred = parse_yes_no(response)
        per_sample.append({"pred": pred, "correct": pred == label})
        correct += pred == label
        yes += pred == "yes"
        unparsed += pred is None
        tp += pred == "yes" and label == "yes"
        fp += pred == "yes" and label == "no"
        fn += pred != "yes" and label == "yes"
    n = len(labels)
    if n == 0:
        summary = dict.fromkeys(("accuracy", "precision", "recall", "f1", "yes_ratio"))
        summary["unparsed"] = 0
        return summary, per_sample
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    summary = {
        "accuracy": 100.0 * correct / n,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * yes / n,
        "unparsed": unparsed,
    }
    return summary, per_sample
