import json

import pytest

from llava.eval.grounding import grounding, main, reflects_context, states_key_facts


def test_key_facts_and_context_terms():
    assert states_key_facts("Three Blue squares on the right.", ["three blue squares"])
    assert not states_key_facts("Two blue squares on the right.", ["three blue squares"])
    assert not states_key_facts("Chart with three bars.", ["three bars", "tallest bar is green"])
    assert not states_key_facts("anything", [])
    assert reflects_context("A sign reading SOLD.", ["sign", "sold"])
    assert not reflects_context("Signage everywhere.", ["sign"])  # whole words only


def test_file_scores(tmp_path, capsys):
    rows = [{"response": "Three blue squares on the left.", "key_facts": ["three blue squares"], "context_terms": ["left"]},
            {"response": "An image.", "key_facts": ["three blue squares"], "context_terms": ["left"]},
            {"response": "Two red circles on the left.", "key_facts": ["one red circle"], "context_terms": ["left"]},
            {"response": "no fields"}]
    path = tmp_path / "out.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    g = grounding(path)
    assert g == {"key_fact": pytest.approx(100 / 3), "context": pytest.approx(200 / 3), "n": 3}
    main([str(path)])
    assert "| out.jsonl | 33.33 | 66.67 | 3 |" in capsys.readouterr().out


def test_file_without_the_fields(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"response": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ValueError, match="plain.jsonl: no record has response, key_facts and context_terms"):
        grounding(path)
