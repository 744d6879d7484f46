"""Mean and spread of SFT, DPO and MCM-DPO over several demo runs (seeds), as a table and a bar chart.

    python scripts/summarize_runs.py outputs/repro/seed0 outputs/repro/seed1 outputs/repro/seed2 \
        --md outputs/repro/table.md --png images/reproduction.png

Each run directory is one `scripts/demo.sh` output: `scores.json` (get_score.py) and
`grounding.json` (llava.eval.grounding), with rows for eval/sft.jsonl, eval/dpo.jsonl and
eval/mcmdpo.jsonl. With ``--margins_md``, also the per-term margins at the end of MCM-DPO (mean of
the last three logged steps of ``mcmdpo/trainer_state.json``) and DPO's, one row per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from llava.method import TERMS as METHOD_TERMS

METHODS = {"sft": "SFT", "dpo": "DPO", "mcmdpo": "MCM-DPO"}
METRICS = {"coco_Bleu_4": "BLEU-4", "coco_METEOR": "METEOR", "coco_ROUGE_L": "ROUGE-L", "coco_CIDEr": "CIDEr",
           "key_fact": "key fact stated (%)", "context": "context reflected (%)"}


TERMS = {t.name: t.label for t in METHOD_TERMS}  # the seven terms and their labels (llava.method)
LAST_STEPS = 3


def final_margins(run: Path) -> dict[str, float]:
    """Each MCM-DPO term's margin, and DPO's margin, averaged over the last ``LAST_STEPS`` logged steps."""
    def last(history: list[dict], key: str, path: Path) -> float:
        values = [h[key] for h in history if key in h]
        if not values:
            raise ValueError(f"{path}: no logged {key!r}")
        return statistics.fmean(values[-LAST_STEPS:])

    out = {}
    for method, keys in (("mcmdpo", {t: f"mcm/{t}/margin" for t in TERMS}), ("dpo", {"dpo": "rewards/margins"})):
        path = run / method / "trainer_state.json"
        if not path.is_file():
            raise ValueError(f"{path}: missing (run scripts/demo.sh with OUT={run} first)")
        history = json.loads(path.read_text())["log_history"]
        out.update({name: last(history, key, path) for name, key in keys.items()})
    return out


def margins_markdown(runs: list[Path]) -> str:
    lines = [f"| run | {' | '.join(TERMS.values())} | DPO's margin |", "|---" + "|---:" * (len(TERMS) + 1) + "|"]
    for run in runs:
        m = final_margins(run)
        lines.append(f"| {run.name} | " + " | ".join(f"{m[t]:.3f}" for t in (*TERMS, "dpo")) + " |")
    return "\n".join(lines)


def method_of(file: str) -> str:
    stem = Path(file).stem
    if stem not in METHODS:
        raise ValueError(f"{file}: expected one of {', '.join(f'{m}.jsonl' for m in METHODS)}")
    return stem


def load_run(run: Path) -> dict[str, dict[str, float]]:
    """``{method: {metric: value}}`` of one run."""
    out: dict[str, dict[str, float]] = {m: {} for m in METHODS}
    for name in ("scores.json", "grounding.json"):
        path = run / name
        if not path.is_file():
            raise ValueError(f"{path}: missing (run scripts/demo.sh with OUT={run} first)")
        for row in json.loads(path.read_text()):
            out[method_of(row["file"])].update({k: row[k] for k in METRICS if row.get(k) is not None})
    return out


def summarize(runs: list[Path]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{method: {metric: (mean, standard deviation)}}`` over the runs."""
    loaded = [load_run(r) for r in runs]
    table = {}
    for m in METHODS:
        table[m] = {}
        for k in METRICS:
            values = [run[m][k] for run in loaded if k in run[m]]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                table[m][k] = (statistics.fmean(values), spread)
    return table


def markdown(table, n_runs: int) -> str:
    lines = [f"| method | {' | '.join(METRICS.values())} |", "|---" * (len(METRICS) + 1) + "|"]
    for m, label in METHODS.items():
        cells = [f"{table[m][k][0]:.2f} ± {table[m][k][1]:.2f}" if k in table[m] else "n/a" for k in METRICS]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines.append(f"\nmean ± standard deviation over {n_runs} seeds")
    return "\n".join(lines)


def bar_chart(table, out: Path, n_runs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(METRICS)
    fig, axes = plt.subplots(1, len(keys), figsize=(2.3 * len(keys), 3.2))
    colors = ["#9e9e9e", "#5c8fd6", "#d9622b"]
    for ax, k in zip(axes, keys):
        means = [table[m].get(k, (0, 0))[0] for m in METHODS]
        spreads = [table[m].get(k, (0, 0))[1] for m in METHODS]
        ax.bar(range(3), means, yerr=spreads, color=colors, capsize=4)
        ax.set_xticks(range(3), list(METHODS.values()), rotation=30, fontsize=8)
        ax.set_title(METRICS[k], fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"Small-scale reproduction on the sample data (mean ± sd over {n_runs} seeds)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--md", type=Path, help="write the Markdown table here")
    p.add_argument("--png", type=Path, help="write the bar chart here")
    p.add_argument("--margins_md", type=Path, help="write the per-term margins at the end of MCM-DPO here")
    a = p.parse_args(argv)
    try:
        table = summarize(a.runs)
        margins = margins_markdown(a.runs) if a.margins_md else None
    except ValueError as e:
        sys.exit(f"error: {e}")
    text = markdown(table, len(a.runs))
    print(text)
    if a.md:
        a.md.parent.mkdir(parents=True, exist_ok=True)
        a.md.write_text(text + "\n")
    if a.png:
        bar_chart(table, a.png, len(a.runs))
    if margins is not None:
        print("\n" + margins)
        a.margins_md.parent.mkdir(parents=True, exist_ok=True)
        a.margins_md.write_text(margins + "\n")


if __name__ == "__main__":
    main()
