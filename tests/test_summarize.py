import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from summarize_runs import summarize  # noqa: E402


def fake_run(path: Path, offset: float):
    path.mkdir(parents=True)
    scores, grounding = [], []
    for k, m in enumerate(("sft", "dpo", "mcmdpo")):
        v = 10 * (k + 1) + offset
        scores.append({"file": f"{path}/eval/{m}.jsonl", "coco_Bleu_4": v, "coco_METEOR": v, "coco_ROUGE_L": v, "coco_CIDEr": 10 * v})
        grounding.append({"file": f"{path}/eval/{m}.jsonl", "key_fact": v, "context": v, "n": 3})
    (path / "scores.json").write_text(json.dumps(scores))
    (path / "grounding.json").write_text(json.dumps(grounding))


def test_mean_and_spread_over_seeds(tmp_path):
    for i, off in enumerate((0.0, 2.0, 4.0)):
        fake_run(tmp_path / f"seed{i}", off)
    table = summarize([tmp_path / f"seed{i}" for i in range(3)])
    assert table["sft"]["coco_Bleu_4"] == pytest.approx((12.0, 2.0))
    assert table["mcmdpo"]["coco_CIDEr"] == pytest.approx((320.0, 20.0))
    out = subprocess.run([sys.executable, "scripts/summarize_runs.py", *[str(tmp_path / f"seed{i}") for i in range(3)],
                          "--md", str(tmp_path / "t.md"), "--png", str(tmp_path / "c.png")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| MCM-DPO | 32.00 ± 2.00 |" in (tmp_path / "t.md").read_text()
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_missing_run_file_is_named(tmp_path):
    (tmp_path / "seed0").mkdir()
    out = subprocess.run([sys.executable, "scripts/summarize_runs.py", str(tmp_path / "seed0")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "seed0/scores.json: missing" in out.stderr


def test_final_margins_average_the_last_three_logged_steps(tmp_path):
    from summarize_runs import TERMS, final_margins, margins_markdown

    run = tmp_path / "seed0"
    for method, keys in (("mcmdpo", [f"mcm/{t}/margin" for t in TERMS]), ("dpo", ["rewards/margins"])):
        (run / method).mkdir(parents=True)
        history = [{"step": s, "loss": 0.5, **{k: float(s + i) for i, k in enumerate(keys)}} for s in range(1, 6)]
        history.append({"step": 5, "train_runtime": 1.0})  # the Trainer's closing entry has no margins
        (run / method / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    m = final_margins(run)
    assert m["response"] == pytest.approx((3 + 4 + 5) / 3)  # steps 3, 4, 5; term index 0
    assert m["all"] == pytest.approx((3 + 4 + 5) / 3 + 6)
    assert m["dpo"] == pytest.approx(4.0)
    assert margins_markdown([run]).splitlines()[2] == "| seed0 | 4.000 | 5.000 | 6.000 | 7.000 | 8.000 | 9.000 | 10.000 | 4.000 |"
    (run / "dpo" / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "loss": 0.1}]}))
    with pytest.raises(ValueError, match="dpo/trainer_state.json: no logged 'rewards/margins'"):
        final_margins(run)


def test_ablation_table_rows_seeds_and_best(tmp_path):
    from summarize_ablation import best_row, collect, markdown

    def ablation_run(row, seed, key_fact, cider):
        d = tmp_path / row / f"seed{seed}"
        d.mkdir(parents=True)
        f = f"{d}/eval/mcmdpo.jsonl"
        (d / "scores.json").write_text(json.dumps([{"file": f, "coco_Bleu_4": 1.0, "coco_METEOR": 1.0, "coco_ROUGE_L": 1.0,
                                                     "coco_CIDEr": cider}]))
        (d / "grounding.json").write_text(json.dumps([{"file": f, "key_fact": key_fact, "context": 50.0, "n": 3}]))

    ablation_run("terms2", 0, 40.0, 100.0)
    ablation_run("terms7", 0, 60.0, 120.0)
    ablation_run("terms7", 1, 50.0, 110.0)
    rows = collect(tmp_path)
    assert best_row(rows) == "terms7"
    assert markdown(rows).splitlines()[2:] == ["| terms2 | 1 | 40.00 | 100.00 |", "| terms7 | 2 | 55.00 ± 7.07 | 115.00 ± 7.07 |"]
    with pytest.raises(ValueError, match="no finished run"):
        collect(tmp_path / "terms2" / "seed0")


def test_ablation_figure_groups_rows_as_the_paper(tmp_path):
    from PIL import Image
    from summarize_ablation import figure, group_of

    assert [group_of(n) for n in ["dpo", "terms2", "only_context", "image_rotate", "paradigm_c", "other"]] == [0, 1, 2, 3, 4, 5]
    metrics = {"key_fact": 50.0, "coco_CIDEr": 300.0}
    rows = {"dpo": [metrics], "terms7": [metrics, {"key_fact": 40.0, "coco_CIDEr": 250.0}], "image_black": [metrics]}
    figure(rows, tmp_path / "ablation.png")
    with Image.open(tmp_path / "ablation.png") as im:
        assert im.format == "PNG" and im.width > 500
