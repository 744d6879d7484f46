"""scripts/make_sample_data.py: deterministic, in the published formats, and the task needs image AND context."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from llava.eval.grounding import reflects_context, states_key_facts

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--n_pretrain", "8", "--n_sft", "40", "--n_pref", "20", "--n_test", "10"]


def _load():
    spec = importlib.util.spec_from_file_location("make_sample_data", ROOT / "scripts" / "make_sample_data.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_sample_data"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


msd = _load()


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A mid-sized corpus (enough records for the statistical claims)."""
    out = tmp_path_factory.mktemp("sample")
    assert msd.main(["--out", str(out), "--seed", "0", "--n_pretrain", "40", "--n_sft", "400", "--n_pref", "200", "--n_test", "120"]) == 0
    sft = json.loads((out / "sft.json").read_text())
    pref = json.loads((out / "preference.json").read_text())
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    return out, sft, pref, test


def test_same_seed_same_bytes_other_seed_other_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    msd.main(["--out", str(a), "--seed", "0", *SMALL])
    msd.main(["--out", str(b), "--seed", "0", *SMALL])
    msd.main(["--out", str(c), "--seed", "1", *SMALL])
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 4 + 8 + 40 + 20 + 10
    assert set(fa) == set(fb)
    for name in fa:
        assert fa[name] == fb[name], name
    assert set(fc) == set(fa)
    for name in ("pretrain.json", "sft.json", "preference.json", "test.jsonl", "sft/sft_00000.png"):
        assert fc[name] != fa[name], name
    # a rerun with fewer records leaves no stale images behind
    msd.main(["--out", str(a), "--seed", "0", "--n_pretrain", "2", "--n_sft", "5", "--n_pref", "3", "--n_test", "2"])
    assert len(_files(a)) == 4 + 2 + 5 + 3 + 2


def test_splits_are_disjoint_draws():
    seeds = {split: [ex.seed for ex in msd.build_split(split, 50, 0)[0]] for split in ("pretrain", "sft", "pref", "test")}
    assert not set(seeds["pretrain"]) & (set(seeds["sft"]) | set(seeds["pref"]) | set(seeds["test"]))
    assert not set(seeds["sft"]) & set(seeds["pref"])
    assert not set(seeds["sft"]) & set(seeds["test"])
    assert not set(seeds["pref"]) & set(seeds["test"])


def test_formats(corpus):
    out, sft, pref, test = corpus
    q = "Given an image and context, generate alt-text for the image.\nContext:\n"
    assert len(sft) == 400 and len(pref) == 200 and len(test) == 120
    for i, r in enumerate(sft):
        assert r["id"] == f"sft_{i:05d}" and r["image"] == f"sft/sft_{i:05d}.png"
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n" + q) and len(human["value"]) > len(q) + 8
        assert gpt["value"].strip()
    for i, r in enumerate(pref):
        assert r["ds_name"] == "sample_alt_text" and r["origin_dataset"] == "SampleAltText" and r["origin_split"] == "{}"
        assert r["idx"] == i and r["image"] == {"path": f"pref/pref_{i:05d}.png"} and r["image_path"] == r["image"]["path"]
        assert isinstance(r["text"], str)
        t = json.loads(r["text"])
        assert set(t) == {"question", "chosen", "rejected"}
        assert t["question"].startswith(q) and "<image>" not in t["question"]
        assert t["chosen"] != t["rejected"]
        assert r["rejected_kind"] in ("generic", "wrong_detail", "context_blind", "verbose")
    for i, r in enumerate(test):
        assert set(r) == {"image_path", "question", "chosen", "idx", "key_facts", "context_terms"}
        assert r["idx"] == i and r["image_path"] == f"test/test_{i:05d}.png" and r["question"].startswith(q)
        assert r["key_facts"] and r["context_terms"]
        assert states_key_facts(r["chosen"], r["key_facts"]) and reflects_context(r["chosen"], r["context_terms"])
    paths = [r["image"] for r in sft] + [r["image_path"] for r in pref] + [r["image_path"] for r in test]
    for p in paths:
        with Image.open(out / p) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (112, 112)


def test_image_size_flag(tmp_path):
    msd.main(["--out", str(tmp_path), "--image_size", "56", "--n_pretrain", "3", "--n_sft", "3", "--n_pref", "3", "--n_test", "3"])
    for p in sorted(tmp_path.rglob("*.png")):
        with Image.open(p) as im:
            assert im.size == (56, 56) and im.mode == "RGB"


def test_figure(tmp_path):
    fig = tmp_path / "fig" / "records.png"
    msd.main(["--out", str(tmp_path / "data"), *SMALL, "--figure", str(fig)])
    with Image.open(fig) as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_preference_kinds_even_and_of_the_stated_kind(corpus):
    _, _, pref, _ = corpus
    counts = Counter(r["rejected_kind"] for r in pref)
    assert set(counts.values()) == {50}
    examples, kinds = msd.build_split("pref", 200, 0)
    for r, ex, kind in zip(pref, examples, kinds):
        t = json.loads(r["text"])
        assert (t["chosen"], t["rejected"], r["rejected_kind"]) == (ex.correct, ex.texts[kind], kind)
        assert len(t["chosen"].split()) <= 14  # concise
        if kind == "verbose":
            assert len(t["rejected"].split()) >= 2 * len(t["chosen"].split())


def test_image_dependence(corpus):
    """The same post goes with different alt-text depending on the image: a context-only writer fails."""
    _, _, pref, test = corpus
    by_post = defaultdict(list)
    for r in pref:
        t = json.loads(r["text"])
        by_post[t["question"]].append(t["chosen"])
    for r in test:
        by_post[r["question"]].append(r["chosen"])
    repeated = {q: c for q, c in by_post.items() if len(c) >= 2}
    assert len(repeated) >= 20
    assert sum(len(set(c)) > 1 for c in repeated.values()) >= 0.9 * len(repeated)
    # best a context-only writer can do: answer each post with its most common alt-text
    hits = sum(Counter(c).most_common(1)[0][1] for c in repeated.values())
    assert hits / sum(len(c) for c in repeated.values()) < 0.6
    # and the key facts never leak into the post
    for r in test:
        assert not any(f.lower() in r["question"].lower() for f in r["key_facts"])


def test_context_dependence():
    """The same image with a post about its other thing needs another alt-text: an image-only writer fails."""
    kinds = Counter()
    for seed in range(120):
        ex = msd.make_example(seed)
        a, b = msd.FOCI[ex.scene.kind]
        ea, eb = msd.make_example(seed, focus=a), msd.make_example(seed, focus=b)
        assert msd.png_bytes(ea.image()) == msd.png_bytes(eb.image())
        assert ea.post != eb.post and ea.correct != eb.correct
        assert not states_key_facts(ea.correct, eb.key_facts) and not states_key_facts(eb.correct, ea.key_facts)
        assert not reflects_context(ea.correct, eb.context_terms)
        kinds[ex.scene.kind] += 1
        assert ex.focus in (a, b)
    assert set(kinds) == set(msd.SCENE_KINDS)
    with pytest.raises(ValueError):
        msd.make_example(0, focus="nowhere")


def test_grounding_measures_separate_the_kinds():
    """key_facts / context_terms accept the correct alt-text and reject the bad kinds they target."""
    for seed in range(150):
        ex = msd.make_example(seed)
        t = ex.texts
        assert states_key_facts(t["correct"], ex.key_facts) and reflects_context(t["correct"], ex.context_terms)
        for kind in ("generic", "wrong_detail", "context_blind"):
            assert not states_key_facts(t[kind], ex.key_facts), (kind, t[kind], ex.key_facts)
        assert not reflects_context(t["context_blind"], ex.context_terms)
        assert states_key_facts(t["verbose"], ex.key_facts)  # long but not wrong
        assert len(set(t.values())) == len(t)


def test_sft_targets_are_noisy_in_the_intended_share(corpus):
    _, sft, _, _ = corpus
    examples, kinds = msd.build_split("sft", 400, 0)
    for r, ex, kind in zip(sft, examples, kinds):
        assert r["conversations"][1]["value"] == ex.texts[kind]
        assert r["conversations"][0]["value"].endswith(ex.post)
    share = Counter(kinds)
    noisy = 1 - share["correct"] / len(kinds)
    assert 0.40 <= noisy <= 0.50
    for kind in ("generic", "wrong_detail", "context_blind", "verbose"):
        assert 0.08 <= share[kind] / len(kinds) <= 0.16, kind
    # measured on the texts themselves: targets that state the key facts AND reflect the context
    good = sum(states_key_facts(r["conversations"][1]["value"], ex.key_facts)
               and reflects_context(r["conversations"][1]["value"], ex.context_terms)
               and len(r["conversations"][1]["value"].split()) <= 14
               for r, ex in zip(sft, examples))
    assert 0.50 <= good / len(sft) <= 0.62


def test_generated_data_passes_the_check(corpus):
    from llava.data.check import main as check

    out = corpus[0]
    for name, task in (("sft.json", "sft"), ("preference.json", "preference"), ("test.jsonl", "test")):
        assert check([str(out / name), "--image_folder", str(out), "--task", task]) == 0, name


def test_committed_sample_is_the_generators_output(tmp_path):
    """data/sample is exactly what `make_sample_data.py --out data/sample --seed 0` writes."""
    assert msd.main(["--out", str(tmp_path / "s"), "--seed", "0"]) == 0
    assert _files(tmp_path / "s") == _files(ROOT / "data" / "sample")


def test_captions_state_every_fact_of_both_things(corpus):
    """Stage 1's captions: LLaVA's pre-training format, and each states the key facts of both things."""
    out = corpus[0]
    records = json.loads((out / "pretrain.json").read_text())
    examples, _ = msd.build_split("pretrain", len(records), 0)
    assert len(records) == 40
    for rec, ex in zip(records, examples):
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert (out / rec["image"]).is_file()
        for name in msd.FOCI[ex.scene.kind]:
            assert states_key_facts(gpt["value"], msd.key_facts(ex.scene, name)), (gpt["value"], name)
