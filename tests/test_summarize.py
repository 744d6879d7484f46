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
