"""The ablation table of scripts/ablate.sh: one row per run name, key facts stated and CIDEr.

    python scripts/summarize_ablation.py outputs/ablate --md outputs/ablate/table.md
    python scripts/summarize_ablation.py outputs/ablate --best     # the row with the most key facts (seed 0)
    python scripts/summarize_ablation.py outputs/ablate --png outputs/ablate/ablation.png   # the figure

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


#: The figure's groups (name prefix of their rows), in the order the paper discusses them; a row in
#: none goes last.
GROUPS = [("reference", "dpo"), ("terms used", "terms"), ("one term alone", "only_"), ("corrupted image", "image_"),
          ("paradigm", "paradigm_")]


def group_of(name: str) -> int:
    return next((i for i, (_, prefix) in enumerate(GROUPS) if name.startswith(prefix)), len(GROUPS))


def figure(rows: dict[str, list[dict[str, float]]], path: Path) -> None:
    """Two panels of horizontal bars (key facts, CIDEr), one bar per row grouped as in ``GROUPS``, a
    row with several seeds drawn at its mean with its standard deviation; a dashed line marks DPO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(rows, key=lambda n: (group_of(n), n))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(10, 0.28 * len(names) + 1.2), sharey=True)
    for ax, (key, label) in zip(axes, COLUMNS.items()):
        values = [[r[key] for r in rows[n]] for n in names]
        means = [statistics.fmean(v) for v in values]
        errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        bars = [e if e > 0 else float("nan") for e in errors]  # no cap drawn for one seed
        ax.barh(range(len(names)), means, xerr=bars, color=[colours(group_of(n)) for n in names], capsize=2)
        if "dpo" in rows:
            ax.axvline(statistics.fmean(r[key] for r in rows["dpo"]), color="k", ls="--", lw=0.8)
        low = min(m - e for m, e in zip(means, errors))
        ax.set_xlim(max(0.0, low * 0.9), max(m + e for m, e in zip(means, errors)) * 1.02)
        ax.set_xlabel(label)
    axes[0].set_yticks(range(len(names)), [f"{n} (x{len(rows[n])})" if len(rows[n]) > 1 else n for n in names])
    axes[0].invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(i)) for i in range(len(GROUPS))]
    fig.legend(handles, [g for g, _ in GROUPS], loc="upper center", ncol=len(GROUPS), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--md", type=Path, help="write the Markdown table here")
    p.add_argument("--best", action="store_true", help="print only the name of the best row")
    p.add_argument("--png", type=Path, help="draw the figure here")
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
    if a.png:
        figure(rows, a.png)


if __name__ == "__main__":
    main()
