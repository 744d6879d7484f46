"""Training curves of SFT / DPO / MCM-DPO runs, read from the Trainer's ``trainer_state.json``.

    python -m llava.eval.curves --runs SFT=outputs/demo/sft DPO=outputs/demo/dpo \\
        MCM-DPO=outputs/demo/mcmdpo --out outputs/demo/curves.png [--smooth N]

Each run is a training output directory. Its state is ``<run>/trainer_state.json`` when that file
exists, else the one in its newest ``checkpoint-*/`` directory (a path to a ``trainer_state.json``
file is accepted too). Entries of ``log_history`` without ``loss`` (evaluation or the final
summary) are skipped. Panels, each drawn only for runs that logged its keys:

* language-model loss (runs without preference rewards: SFT) and preference loss (DPO, MCM-DPO);
* learning rate;
* ``rewards/chosen`` (solid) and ``rewards/rejected`` (dashed); ``rewards/margins``; ``rewards/accuracies``;
* ``mcm/<term>/margin`` and ``mcm/<term>/accuracy`` of the seven MCM-DPO terms, one colour per term.

``plot_runs(runs, out, smooth=1)`` is the function behind the command line. Only matplotlib's
object API and the Agg canvas are used, so importing this module changes no global backend.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from llava.flags import FlagParser
from llava.method import CHOSEN, TERM_NAMES
from llava.method import TERMS as METHOD_TERMS

STATE_FILE = "trainer_state.json"
# The seven MCM-DPO terms, their labels and losers (llava.method, docs/method.md "Terms").
TERMS = TERM_NAMES
TERM_LABELS = {t.name: t.label for t in METHOD_TERMS}
TERM_LOSERS = {t.name: t.loser for t in METHOD_TERMS}
# In the order of the terms: single-factor terms in strong colours, pairwise in lighter ones, all three in black.
TERM_COLORS = dict(zip(TERM_NAMES, ("#1f77b4", "#d62728", "#2ca02c", "#17becf", "#ff7f0e", "#9467bd", "#222222")))
RUN_COLORS = ("#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
              "#17becf", "#bcbd22")
RUN_STYLES = ("-", "--", ":", "-.")
DPI = 100
COL_WIDTH_IN = 4.6
ROW_HEIGHT_IN = 3.5
HEADER_IN = 1.15  # title and run legend
BOTTOM_IN = 0.55  # x label of the last row
FOOTER_IN = 0.55  # term legend, when a term panel is drawn


class CurvesError(Exception):
    """A run whose training state cannot be read; the message names the path and the reason."""


# -- reading ------------------------------------------------------------------------------------

def _checkpoint_step(path: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else -1


def find_state(run: Path) -> Path:
    """The ``trainer_state.json`` of a run directory (top level first, else the newest checkpoint's)."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.exists():
        raise CurvesError(f"{run}: run directory does not exist")
    if not run.is_dir():
        raise CurvesError(f"{run}: not a directory or a {STATE_FILE} file")
    top = run / STATE_FILE
    if top.is_file():
        return top
    checkpoints = sorted((p for p in run.glob("checkpoint-*") if (p / STATE_FILE).is_file()),
                         key=lambda p: (_checkpoint_step(p), p.name))
    if checkpoints:
        return checkpoints[-1] / STATE_FILE
    raise CurvesError(f"{top}: no {STATE_FILE} in the run directory nor in any checkpoint-*/ inside it")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_log(run: Path) -> list[dict]:
    """The training entries (those with ``loss``) of a run's ``log_history``, in step order."""
    path = find_state(run)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CurvesError(f"{path}: cannot be read ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CurvesError(f"{path}: not valid JSON ({e})") from e
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise CurvesError(f"{path}: has no 'log_history' list (not a transformers trainer state?)")
    entries = [e for e in history if isinstance(e, dict) and _number(e.get("loss")) is not None]
    if not entries:
        raise CurvesError(f"{path}: 'log_history' has no training entries (none with 'loss')")
    for i, e in enumerate(entries):
        if _number(e.get("step")) is None:
            raise CurvesError(f"{path}: log entry {i} with 'loss' has no numeric 'step'")
    return sorted(entries, key=lambda e: e["step"])


@dataclass
class Run:
    name: str
    path: Path
    entries: list[dict]
    color: str = "#333333"
    style: str = "-"
    _cache: dict = field(default_factory=dict, repr=False)

    def has(self, key: str) -> bool:
        return any(_number(e.get(key)) is not None for e in self.entries)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        if key not in self._cache:
            xs, ys = [], []
            for e in self.entries:
                y = _number(e.get(key))
                if y is not None:
                    xs.append(float(e["step"]))
                    ys.append(y)
            self._cache[key] = (xs, ys)
        return self._cache[key]

    @property
    def preference(self) -> bool:
        return self.has("rewards/chosen") or self.has("rewards/margins") or any(
            k.startswith("mcm/") for e in self.entries for k in e)


def smooth_values(ys: Sequence[float], n: int) -> list[float]:
    """Trailing moving average over ``n`` points (fewer at the start); ``n <= 1`` returns a copy."""
    if n <= 1:
        return list(ys)
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= n:
            total -= ys[i - n]
        out.append(total / min(i + 1, n))
    return out


# -- drawing ------------------------------------------------------------------------------------

@dataclass
class Line:
    run: Run
    key: str
    color: str
    style: str = "-"
    label: str | None = None


@dataclass
class Panel:
    title: str
    ylabel: str
    lines: list[Line]
    hline: float | None = None
    logy: bool = False
    ylim: tuple[float, float] | None = None
    key: list[tuple[str, str]] = field(default_factory=list)  # (label, line style) of a small in-panel legend


def _panels(runs: list[Run]) -> list[Panel]:
    panels: list[Panel] = []
    lm = [r for r in runs if not r.preference]
    pref = [r for r in runs if r.preference]
    if lm:
        panels.append(Panel("Language-model loss (SFT)", "loss", [Line(r, "loss", r.color, r.style) for r in lm]))
    if pref:
        panels.append(Panel("Preference loss", "loss", [Line(r, "loss", r.color, r.style) for r in pref],
                            hline=math.log(2), key=[("ln 2 (untrained)", ":")]))
    lr = [r for r in runs if r.has("learning_rate")]
    if any(v > 0 for r in lr for v in r.series("learning_rate")[1]):
        panels.append(Panel("Learning rate", "learning rate", [Line(r, "learning_rate", r.color, r.style) for r in lr],
                            logy=True))
    chosen = [r for r in runs if r.has("rewards/chosen") or r.has("rewards/rejected")]
    if chosen:
        lines = []
        for r in chosen:
            lines += [Line(r, "rewards/chosen", r.color, "-"), Line(r, "rewards/rejected", r.color, "--")]
        panels.append(Panel("Rewards: chosen vs rejected", "β·R  (R = log π − log π_ref)", lines, hline=0.0,
                            key=[("chosen", "-"), ("rejected", "--")]))
    margins = [r for r in runs if r.has("rewards/margins")]
    if margins:
        panels.append(Panel("Reward margin (chosen − rejected)", "β·(R_w − R_l)",
                            [Line(r, "rewards/margins", r.color, r.style) for r in margins], hline=0.0))
    acc = [r for r in runs if r.has("rewards/accuracies")]
    if acc:
        panels.append(Panel("Reward accuracy", "fraction with chosen > rejected",
                            [Line(r, "rewards/accuracies", r.color, r.style) for r in acc], hline=0.5,
                            ylim=(-0.03, 1.03)))
    for kind, title, ylabel, hline, ylim in (
            ("margin", "MCM-DPO term margins", f"β·M_k = β·(R({CHOSEN}) − R(loser_k))", 0.0, None),
            ("accuracy", "MCM-DPO term accuracies", "fraction with M_k > 0", 0.5, (-0.03, 1.03))):
        mcm = [r for r in runs if any(r.has(f"mcm/{t}/{kind}") for t in TERMS)]
        multi = len(mcm) > 1
        lines = [Line(r, f"mcm/{t}/{kind}", TERM_COLORS[t], RUN_STYLES[i % len(RUN_STYLES)] if multi else "-")
                 for i, r in enumerate(mcm) for t in TERMS if r.has(f"mcm/{t}/{kind}")]
        if lines:
            key = [(r.name, RUN_STYLES[i % len(RUN_STYLES)]) for i, r in enumerate(mcm)] if multi else []
            panels.append(Panel(title, ylabel, lines, hline=hline, ylim=ylim, key=key))
    return panels


def grid_shape(n_panels: int, ncols: int = 3) -> tuple[int, int]:
    """(rows, columns) of the panel grid."""
    cols = max(1, min(ncols, n_panels))
    return max(1, math.ceil(n_panels / cols)), cols


def _footer(n_panels: int, has_terms: bool, ncols: int = 3) -> bool:
    """Whether the term legend needs a row under the grid (it goes in an empty grid cell when there is one)."""
    rows, cols = grid_shape(n_panels, ncols)
    return has_terms and rows * cols == n_panels


def figure_size(n_panels: int, has_terms: bool, ncols: int = 3) -> tuple[int, int]:
    """Pixel size (width, height) of the PNG that ``plot_runs`` writes for this many panels."""
    rows, cols = grid_shape(n_panels, ncols)
    width = max(cols * COL_WIDTH_IN, 7.0)
    height = rows * ROW_HEIGHT_IN + HEADER_IN + BOTTOM_IN + (FOOTER_IN if _footer(n_panels, has_terms, ncols) else 0.0)
    return round(width * DPI), round(height * DPI)


def _draw_panel(ax, panel: Panel, smooth: int) -> None:
    peaks: list[float] = []
    for line in panel.lines:
        xs, ys = line.run.series(line.key)
        if panel.logy:  # zero learning rates (warmup start, schedule end) have no place on a log axis
            xs, ys = [x for x, y in zip(xs, ys) if y > 0], [y for y in ys if y > 0]
            if ys:
                peaks.append(max(ys))
        if not xs:
            continue
        if smooth > 1 and len(ys) > 1:
            ax.plot(xs, ys, color=line.color, linestyle=line.style, linewidth=0.8, alpha=0.25)
            ys = smooth_values(ys, smooth)
        marker = "o" if len(xs) <= 3 else None
        ax.plot(xs, ys, color=line.color, linestyle=line.style, linewidth=1.7, marker=marker, markersize=4)
    if panel.hline is not None:
        ax.axhline(panel.hline, color="#888888", linewidth=0.9, linestyle=":", zorder=0)
    if panel.logy:
        ax.set_yscale("log")
        if peaks:  # show each schedule down to 1/50 of the smallest peak, not the decay to ~0
            ax.set_ylim(bottom=min(peaks) / 50, top=max(peaks) * 2)
    if panel.ylim:
        ax.set_ylim(*panel.ylim)
    ax.set_title(panel.title, fontsize=12, fontweight="bold")
    ax.set_xlabel("step", fontsize=10)
    ax.set_ylabel(panel.ylabel, fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(True, color="#e5e5e5", linewidth=0.7)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if panel.key:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color="#555555", linestyle=style, linewidth=1.5, label=label)
                   for label, style in panel.key]
        ax.legend(handles=handles, loc="best", fontsize=9, framealpha=0.85, handlelength=2.2)


def plot_runs(runs: Mapping[str, Path | str], out: Path | str, smooth: int = 1, title: str | None = None) -> Path:
    """Draw the curves of ``runs`` (name -> run directory) into the PNG ``out``; returns ``out``.

    Raises ``CurvesError`` naming the file and the reason when a run's state is missing or unreadable.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not runs:
        raise CurvesError("no runs given")
    if smooth < 1:
        raise CurvesError(f"--smooth must be >= 1, got {smooth}")
    loaded = []
    for i, (name, path) in enumerate(runs.items()):
        loaded.append(Run(str(name), Path(path), read_log(Path(path)), color=RUN_COLORS[i % len(RUN_COLORS)],
                          style="-"))
    panels = _panels(loaded)
    has_terms = any(p.title.startswith("MCM-DPO") for p in panels)
    rows, cols = grid_shape(len(panels))
    width_px, height_px = figure_size(len(panels), has_terms)
    width_in, height_in = width_px / DPI, height_px / DPI
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    footer = FOOTER_IN if _footer(len(panels), has_terms) else 0.0
    grid = fig.add_gridspec(rows, cols, left=0.75 / width_in, right=1 - 0.2 / width_in,
                            top=1 - HEADER_IN / height_in, bottom=(footer + BOTTOM_IN) / height_in,
                            wspace=0.32, hspace=0.45)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        _draw_panel(ax, panel, smooth)
    heading = title or "Training curves"
    if smooth > 1:
        heading += f"  (moving average over {smooth} logging steps; raw values faint)"
    fig.text(0.5, 1 - 0.12 / height_in, heading, ha="center", va="top", fontsize=14, fontweight="bold")
    run_handles = [Line2D([], [], color=r.color, linewidth=2.5, label=f"{r.name}  ({len(r.entries)} logged steps)")
                   for r in loaded]
    fig.legend(handles=run_handles, loc="center", bbox_to_anchor=(0.5, 1 - 0.68 / height_in),
               ncols=min(len(run_handles), 4), fontsize=11, frameon=False, handlelength=2.5, columnspacing=2.5)
    if has_terms:
        term_handles = [Line2D([], [], color=TERM_COLORS[t], linewidth=2.5, label=TERM_LABELS[t]) for t in TERMS]
        if footer:
            fig.legend(handles=term_handles, loc="center", bbox_to_anchor=(0.5, 0.3 / height_in), ncols=7,
                       fontsize=10.5, frameon=False, title="MCM-DPO terms (colour)", title_fontsize=10.5,
                       columnspacing=1.6)
        else:  # the first empty cell of the grid
            i = len(panels)
            cell = fig.add_subplot(grid[i // cols, i % cols])
            cell.axis("off")
            for h, t in zip(term_handles, TERMS):
                h.set_label(f"{TERM_LABELS[t]:<17} {TERM_LOSERS[t]}")
            cell.legend(handles=term_handles, loc="center", frameon=False, handlelength=2.5, labelspacing=0.7,
                        prop={"family": "DejaVu Sans Mono", "size": 11},
                        title=f"MCM-DPO terms (colour):\n{CHOSEN} preferred to the loser", title_fontsize=11.5)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png", metadata={"Software": None})
    return out


# -- command line -------------------------------------------------------------------------------

def parse_run(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` (or a bare ``PATH``, named after its directory)."""
    if "=" in spec:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise argparse.ArgumentTypeError(f"run {spec!r}: expected NAME=PATH")
        return name, Path(path)
    path = Path(spec)
    return path.name or str(path), path


def main(argv: Sequence[str] | None = None) -> int:
    parser = FlagParser(prog="python -m llava.eval.curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, type=parse_run, metavar="NAME=DIR",
                        help="runs to draw: NAME=run directory (or its trainer_state.json)")
    parser.add_argument("--output", "--out", dest="out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in logging steps (default 1: raw)")
    parser.add_argument("--title", default=None, help="figure title (default 'Training curves')")
    args = parser.parse_args(argv)
    runs: dict[str, Path] = {}
    for name, path in args.runs:
        if name in runs:
            parser.error(f"run name {name!r} given twice")
        runs[name] = path
    try:
        out = plot_runs(runs, args.out, smooth=args.smooth, title=args.title)
    except CurvesError as e:
        print(f"curves: error: {e}", file=sys.stderr)
        return 2
    print(f"curves: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
