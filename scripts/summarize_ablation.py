"""The ablation table of scripts/ablate.sh: one row per run name, key facts stated and CIDEr.

    python scripts/summarize_ablation.py outputs/ablate --md outputs/ablate/table.md
    python scripts/summarize_ablation.py outputs/ablate --best     # the row with the most key facts (seed 0)

Each ``OUT/ROW/seedN`` holds one run's ``scores.json`` and ``grounding.json`` (the demo's files);
a row with several seeds shows mean ± standard deviation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from summarize_runs import load_run  # noqa: E402

COLUMNS = {"key_fact": "key fact stated (%)", "coco_CIDEr": "CIDEr"}


def collect(out: Path) -> dict[str, list[dict[str, float]]]:
    """``{row: [metrics of each seed]}`` for every finished run under ``out``, rows in name order."""
    rows: dict[str, list[dict[str, float]]] = {}
    for run in sorted(out.glob("*/seed*/grounding.json")):
        metrics = next(m for m in load_run(run.parent).values() if m)
        rows.setdefault(run.parent.parent.name, []).append(metrics)
    if not rows:
        raise ValueError(f"{out}: no finished run (ROW/seedN/grounding.json)")
    return rows


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown(rows: dict[str, list[dict[str, float]]]) -> str:
    lines = [f"| row | seeds | {' | '.join(COLUMNS.values())} |", "|---|---:" + "|---:" * len(COLUMNS) + "|"]
    for name, runs in rows.items():
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cell([r[k] for r in runs]) for k in COLUMNS) + " |")
    return "\n".join(lines)


def best_row(rows: dict[str, list[dict[str, float]]]) -> str:
    return max(rows, key=lambda name: (rows[name][0]["key_fact"], rows[name][0]["coco_CIDEr"]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--md", type=Path, help="write the Markdown table here")
    p.add_argument("--best", action="store_true", help="print only the name of the best row")
    a = p.parse_args(argv)
    try:
        rows = collect(a.out)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if a.best:
        print(best_row(rows))
        return
    text = markdown(rows)
    print(text)
    if a.md:
        a.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
