"""Draw the README's explanatory figures with matplotlib, deterministically.

    python scripts/draw_figures.py [--out images] [--demo-dir outputs/demo] [--synthetic]

Writes, under ``--out``:

    mcm_conditions.png            the eight conditions of one preference record as the 2x2x2 cube
                                  and the seven MCM-DPO terms (arrows from the all-winning condition to each loser)
    paradigms.png                 the four training paradigms (PARADIGM=a|b|c|d): which of ViT,
                                  projector and language model train in SFT and in alignment
    training_curves_example.png   llava.eval.curves on the runs under --demo-dir (sft, dpo, mcmdpo)
                                  when any exists; otherwise (or with --synthetic) on a synthetic,
                                  realistic log, titled as an illustration

Sizes are fixed, nothing random is unseeded, fonts are matplotlib's bundled DejaVu, and the PNGs
carry no software or time stamp, so two runs on one machine write byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib import rc_context, rcdefaults, rcParams
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llava.eval.curves import TERM_COLORS, TERM_LABELS, CurvesError, find_state, plot_runs  # noqa: E402
from llava.method import CHOSEN, REJECTED, Condition  # noqa: E402
from llava.method import TERMS as METHOD_TERMS  # noqa: E402
from llava.train.released_flags import FLAG_OF  # noqa: E402

RC = {"font.family": "DejaVu Sans", "mathtext.fontset": "dejavusans"}
PNG_META = {"Software": None}

# term -> (loser condition, default weight, module, published flag), from llava.method and
# llava.train.released_flags (docs/method.md "Terms")
TERMS = {t.name: (t.loser, t.default_weight, t.module, FLAG_OF[t.name]) for t in METHOD_TERMS}
MODULES = {
    "single": ("Single module", "one factor lost: a cube edge", "-"),
    "pairwise": ("Pairwise module", "two factors lost: a face diagonal", (0, (6, 3))),
    "multi": ("Multi module", "all three lost: the space diagonal", (0, (2, 2))),
}
WINNER = CHOSEN
RESPONSE = next(t.name for t in METHOD_TERMS if t.loser == REJECTED)  # plain DPO's term
WIN_COLOR = "#1a7f37"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi, metadata=PNG_META)
    return path


# -- the eight conditions and seven terms ---------------------------------------------------------

def _condition(x: int, y: int, z: int) -> str:
    """Cube corner -> condition name: x = response lost, y = image lost, z = context lost."""
    lost = lambda flag: "l" if flag else "w"  # noqa: E731
    return Condition(context=lost(z), image=lost(y), response=lost(x)).name


def _node_label(ax, xy, name, term_text, color, align, offset, winner=False):
    """A framed two-line label (condition name, then term and weight) next to a cube corner."""
    from matplotlib.offsetbox import AnnotationBbox, TextArea, VPacker

    name_area = TextArea(name, textprops=dict(family="DejaVu Sans Mono", fontweight="bold", fontsize=12.5,
                                              color=color if winner else "#1e1e1e"))
    term_area = TextArea(term_text, textprops=dict(fontweight="bold", fontsize=11, color=color))
    pack = VPacker(children=[name_area, term_area], align="center", pad=0, sep=3)
    box = AnnotationBbox(pack, xy, xybox=offset, xycoords="data", boxcoords="offset points",
                         box_alignment=align, frameon=True, pad=0.35, zorder=7,
                         bboxprops=dict(boxstyle="round,pad=0.35", facecolor="#eaf6ec" if winner else "white",
                                        edgecolor=color, linewidth=1.7))
    ax.add_artist(box)
    return box


def draw_mcm_conditions(path: Path) -> Path:
    # Oblique projection of the cube. The winner sits at the hidden back-bottom-left corner, so that
    # six of its seven arrows run out to the silhouette; "context lost" points towards the viewer.
    W, H, DX, DY = 5.2, 4.6, 3.0, 1.6

    def pos(x, y, z):  # z = 1: context lost (front), z = 0: context kept (back)
        return np.array([x * W + (1 - z) * DX, y * H + (1 - z) * DY])

    corners = {(x, y, z): pos(x, y, z) for x in (0, 1) for y in (0, 1) for z in (0, 1)}
    fig = Figure(figsize=(13.0, 7.4), dpi=110)
    ax = fig.add_axes((0.0, 0.165, 0.605, 0.77))
    ax.set_xlim(-3.0, 12.1)
    ax.set_ylim(-1.75, 9.05)
    ax.set_aspect("equal")
    ax.axis("off")
    # lattice edges: corners differing in one factor
    for a, pa in corners.items():
        for b, pb in corners.items():
            if a < b and sum(i != j for i, j in zip(a, b)) == 1:
                ax.plot(*zip(pa, pb), color="#c8c8c8", linewidth=1.3, zorder=1, solid_capstyle="round")
    origin = corners[(0, 0, 0)]
    # label of each corner: box alignment (fraction of the box at the offset point) and offset in points
    place = {
        (1, 0, 0): ((0.0, 0.5), (10, 0)),       # response lost: right
        (0, 1, 0): ((0.5, 0.0), (0, 9)),        # image lost: above
        (0, 0, 1): ((0.5, 1.0), (0, -9)),       # context lost: below
        (1, 0, 1): ((0.5, 1.0), (0, -9)),       # context and response lost: below
        (1, 1, 0): ((0.5, 0.0), (0, 9)),        # image and response lost: above
        (0, 1, 1): ((0.5, 0.0), (0, 9)),        # context and image lost: above
        (1, 1, 1): ((0.5, 0.0), (-2, 9)),      # all lost: above (on the top face)
    }
    for (x, y, z), p in corners.items():
        name = _condition(x, y, z)
        if name == WINNER:
            continue
        term = next(t for t, v in TERMS.items() if v[0] == name)
        _, weight, module, _ = TERMS[term]
        color = TERM_COLORS[term]
        ax.plot(*p, "o", color=color, markersize=8, zorder=6)
        align, offset = place[(x, y, z)]
        _node_label(ax, p, name, f"{TERM_LABELS[term]}  w={weight:.1f}", color, align, offset)
        arrow = FancyArrowPatch(origin, p, arrowstyle="-|>,head_length=7,head_width=4", mutation_scale=1.6,
                                color=color, linewidth=2.6 if module == "single" else 2.2,
                                linestyle=MODULES[module][2], shrinkA=9, shrinkB=5, zorder=4)
        ax.add_patch(arrow)
    # the winner: a large dot, its label to its left (between the context and context+image arrows)
    ax.plot(*origin, "o", color=WIN_COLOR, markersize=15, zorder=6, markeredgecolor="white", markeredgewidth=1.5)
    _node_label(ax, origin, WINNER, "all winning", WIN_COLOR, (1.0, 0.5), (-13, 5), winner=True)
    # key, top left: the direction in which each factor flips from winning to losing
    ax.text(-2.85, 8.75, "factor flips, winning → losing:", fontsize=11, color="#444444", fontweight="bold",
            va="center")
    depth = -np.array([DX, DY]) / math.hypot(DX, DY)
    for row, (vec, text) in enumerate(((np.array([1.0, 0.0]), r"response  $y_w \to y_l$"),
                                       (np.array([0.0, 1.0]), r"image  $m_w \to m_l$"),
                                       (depth, r"context  $c_w \to c_l$"))):
        y0 = 8.1 - 0.55 * row
        mid = np.array([-2.45, y0])
        ax.annotate("", xy=mid + 0.27 * vec, xytext=mid - 0.27 * vec,
                    arrowprops=dict(arrowstyle="-|>", color="#555555", lw=1.4, shrinkA=0, shrinkB=0,
                                    mutation_scale=11))
        ax.text(-2.0, y0, text, fontsize=11, color="#444444", va="center", ha="left")

    # right: the seven terms grouped by module
    fig.text(0.015, 0.965, "MCM-DPO: eight conditions of one preference record, seven preference terms",
             fontsize=15, fontweight="bold", va="top")
    tx = fig.add_axes((0.60, 0.17, 0.395, 0.76))
    tx.axis("off")
    tx.set_xlim(0, 1)
    tx.set_ylim(0, 1)
    y = 0.985
    tx.text(0.0, y, "term", fontsize=11, color="#666666", va="top")
    tx.text(0.50, y, "weight", fontsize=11, color="#666666", va="top", ha="center")
    tx.text(0.63, y, f"loser (vs {WINNER})", fontsize=11, color="#666666", va="top")
    y -= 0.07
    for module, (title, sub, style) in MODULES.items():
        tx.add_patch(FancyBboxPatch((0.0, y - 0.048), 1.0, 0.05, boxstyle="round,pad=0.004",
                                    facecolor="#f1f1f1", edgecolor="none"))
        tx.text(0.01, y - 0.023, title, fontsize=12, fontweight="bold", va="center")
        tx.text(0.99, y - 0.023, sub, fontsize=10, color="#555555", va="center", ha="right", style="italic")
        y -= 0.085
        for term, (loser, weight, mod, flag) in TERMS.items():
            if mod != module:
                continue
            color = TERM_COLORS[term]
            tx.plot([0.01, 0.09], [y, y], color=color, linewidth=2.6, linestyle=style)
            tx.text(0.11, y, TERM_LABELS[term], fontsize=12, color=color, fontweight="bold", va="center")
            tx.text(0.50, y, f"{weight:.1f}", fontsize=12, va="center", ha="center")
            tx.text(0.63, y, loser, fontsize=12, va="center", family="DejaVu Sans Mono")
            tx.text(0.99, y, flag, fontsize=10.5, va="center", ha="right", color="#777777",
                    family="DejaVu Sans Mono")
            y -= 0.066
        y -= 0.015
    tx.text(0.0, y - 0.01,
            "c = context:  c_w the record's question, c_l another record's\n"
            "m = image:  m_w the record's image, m_l a corrupted copy\n"
            "y = response:  y_w the chosen alt-text, y_l the rejected one",
            fontsize=11, color="#444444", va="top", linespacing=1.5)

    # bottom: the objective
    box = fig.add_axes((0.012, 0.015, 0.976, 0.135))
    box.axis("off")
    box.add_patch(FancyBboxPatch((0.0, 0.0), 1.0, 1.0, boxstyle="round,pad=0.0,rounding_size=0.04",
                                 transform=box.transAxes, facecolor="#f7f7fb", edgecolor="#9a9ab0", linewidth=1.2))
    box.text(0.015, 0.70,
             r"$R(\mathrm{cond}) = \log\,\pi(y\,|\,c,m) - \log\,\pi_{\mathrm{ref}}(y\,|\,c,m)$"
             r"$\qquad M_k = R(\mathtt{cw\_mw\_yw}) - R(\mathrm{loser}_k)$",
             fontsize=14, va="center")
    box.text(0.015, 0.27,
             r"$\mathrm{loss} = -\log\,\sigma\!\left(\beta \sum_k \frac{w_k}{2.8}\, M_k\right)$",
             fontsize=16, va="center")
    box.text(0.44, 0.27, "β = 0.1;  2.8 = para_norm = sum of the default weights;\n"
             "one Bradley–Terry sigmoid over the weighted margins (released objective)",
             fontsize=10.5, va="center", color="#444444", linespacing=1.4)
    return _save(fig, path)


# -- the four paradigms -------------------------------------------------------------------------

PARADIGMS = {  # letter -> (ViT in SFT, ViT in alignment)
    "a": (False, False),
    "b": (False, True),
    "c": (True, False),
    "d": (True, True),
}
TRAIN_FACE, TRAIN_EDGE = "#fde2c8", "#d9731a"
FROZEN_FACE, FROZEN_EDGE = "#dceaf7", "#4a7fb5"


def _component(ax, x, y, w, h, name, trains):
    face, edge = (TRAIN_FACE, TRAIN_EDGE) if trains else (FROZEN_FACE, FROZEN_EDGE)
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.0,rounding_size=0.08",
                                facecolor=face, edgecolor=edge, linewidth=1.8,
                                hatch=None if trains else "///"))
    ax.text(x, y + 0.11, name, ha="center", va="center", fontsize=12, fontweight="bold",
            bbox=dict(boxstyle="round,pad=0.12", facecolor=face, edgecolor="none"))
    ax.text(x, y - 0.17, "trained" if trains else "frozen", ha="center", va="center", fontsize=10.5,
            color=edge, fontweight="bold", style="normal" if trains else "italic",
            bbox=dict(boxstyle="round,pad=0.1", facecolor=face, edgecolor="none"))


def draw_paradigms(path: Path) -> Path:
    fig = Figure(figsize=(13.0, 5.6), dpi=110)
    fig.text(0.012, 0.975, "Four training paradigms: when does the vision encoder (ViT) train?", fontsize=15,
             fontweight="bold", va="top")
    fig.text(0.012, 0.905, "The language model (LM) and the projector train in both stages. "
             "Choose with PARADIGM=a|b|c|d in scripts/sft.sh, dpo.sh, mcmdpo.sh (default d).",
             fontsize=11.5, va="top", color="#333333")
    width, gap, left = 0.232, 0.012, 0.012
    for i, (letter, (vit_sft, vit_align)) in enumerate(PARADIGMS.items()):
        best = letter == "d"
        ax = fig.add_axes((left + i * (width + gap), 0.10, width, 0.72))
        ax.set_xlim(0, 4)
        ax.set_ylim(-0.05, 5.0)
        ax.axis("off")
        ax.add_patch(FancyBboxPatch((0.02, 0.0), 3.96, 4.95, boxstyle="round,pad=0.0,rounding_size=0.12",
                                    facecolor="#fffbe6" if best else "white",
                                    edgecolor="#c9a400" if best else "#bbbbbb", linewidth=2.6 if best else 1.2))
        for sx, stage, vit in ((1.0, "SFT", vit_sft), (3.0, "alignment", vit_align)):
            ax.text(sx, 4.62, stage, ha="center", va="center", fontsize=12, fontweight="bold", color="#333333")
            ax.text(sx, 0.32, "image", ha="center", va="center", fontsize=10, color="#666666")
            for y0, y1 in ((0.5, 0.97), (1.73, 2.07), (2.83, 3.17)):
                ax.add_patch(FancyArrowPatch((sx, y0), (sx, y1), arrowstyle="-|>", mutation_scale=12,
                                             color="#777777", linewidth=1.3))
            _component(ax, sx, 1.35, 1.6, 0.72, "ViT", vit)
            _component(ax, sx, 2.45, 1.6, 0.72, "projector", True)
            _component(ax, sx, 3.6, 1.6, 0.78, "LM", True)
        ax.add_patch(FancyArrowPatch((1.4, 4.62), (2.3, 4.62), arrowstyle="-|>", mutation_scale=14,
                                     color="#999999", linewidth=1.6))
        desc = f"({letter}) ViT {'trained' if vit_sft else 'frozen'} → {'trained' if vit_align else 'frozen'}"
        fig.text(left + i * (width + gap) + width / 2, 0.067, desc, ha="center", va="center", fontsize=12.5,
                 fontweight="bold")
        fig.text(left + i * (width + gap) + width / 2, 0.025,
                 "paper's best · shipped default" if best else f"PARADIGM={letter}",
                 ha="center", va="center", fontsize=11, color="#8a6d00" if best else "#555555",
                 fontweight="bold" if best else "normal")
        if best:
            ax.text(2.0, 4.2, "★ PARADIGM=d", ha="center", va="center", fontsize=10.5, color="#8a6d00",
                    fontweight="bold")
    # legend
    lg = fig.add_axes((0.74, 0.92, 0.25, 0.065))
    lg.axis("off")
    lg.set_xlim(0, 10)
    lg.set_ylim(0, 1)
    for x, face, edge, hatch, text in ((0.2, TRAIN_FACE, TRAIN_EDGE, None, "trained"),
                                       (5.0, FROZEN_FACE, FROZEN_EDGE, "///", "frozen")):
        lg.add_patch(FancyBboxPatch((x, 0.2), 1.1, 0.6, boxstyle="round,pad=0.0,rounding_size=0.1",
                                    facecolor=face, edgecolor=edge, linewidth=1.6, hatch=hatch))
        lg.text(x + 1.4, 0.5, text, va="center", fontsize=11.5)
    return _save(fig, path)


# -- training curves ------------------------------------------------------------------------------

def _cosine_lr(step: int, total: int, peak: float, warmup_ratio: float = 0.03) -> float:
    warm = max(1, math.ceil(total * warmup_ratio))
    if step < warm:
        return peak * step / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _state(entries: list[dict], total: int, epochs: int, logging_steps: int) -> dict:
    return {"best_global_step": None, "best_metric": None, "best_model_checkpoint": None,
            "epoch": float(epochs), "eval_steps": 500, "global_step": total, "is_hyper_param_search": False,
            "is_local_process_zero": True, "is_world_process_zero": True, "log_history": entries,
            "logging_steps": logging_steps, "max_steps": total, "num_input_tokens_seen": 0,
            "num_train_epochs": epochs, "save_steps": 500, "total_flos": 0.0, "train_batch_size": 1,
            "trial_name": None, "trial_params": None}


def synthetic_logs(seed: int = 0) -> dict[str, dict]:
    """Realistic-looking trainer states for SFT, DPO and MCM-DPO (an illustration, not a run).

    Shapes follow the released settings (docs/method.md): SFT lr 2e-5 (cosine, 3% warmup) with a decaying token loss;
    DPO (1 epoch) and MCM-DPO (2 epochs) at lr 5e-7 on 8k records, 64 per optimizer step, logging
    means over the step's examples of per-example rewards drawn around slowly growing margins.
    """
    rng = np.random.default_rng(seed)
    beta_norm = {t: w / 2.8 for t, (_, w, _, _) in TERMS.items()}
    states = {}
    # SFT: 202k samples / 64 per step ~ 3150 steps, logged every 10
    total, entries = 3150, []
    for step in range(10, total + 1, 10):
        frac = step / total
        loss = 1.08 + 1.05 * math.exp(-step / 260) + 0.12 * (1 - frac) + rng.normal(0, 0.045)
        entries.append({"epoch": round(frac, 4), "grad_norm": float(abs(rng.normal(1.6, 0.4))),
                        "learning_rate": _cosine_lr(step, total, 2e-5), "loss": round(float(loss), 4), "step": step})
    entries.append({"epoch": 1.0, "step": total, "total_flos": 1.0e18, "train_loss": 1.31, "train_runtime": 36000.0,
                    "train_samples_per_second": 5.6, "train_steps_per_second": 0.09})
    states["SFT"] = _state(entries, total, 1, 10)
    # preference runs: 8000 records / 64 = 125 steps per epoch
    per_step = 64
    # asymptotic mean beta-margins of each term and how fast they grow (corrupted image: easiest)
    final = dict(zip(TERMS, (0.42, 0.95, 0.55, 0.9, 1.3, 1.2, 1.6)))  # in the order of the terms
    for name, epochs, mcm in (("DPO", 1, False), ("MCM-DPO", 2, True)):
        total, entries = 125 * epochs, []
        for step in range(1, total + 1):
            grow = 1 - math.exp(-step / (55 if mcm else 70))
            spread = 1 - math.exp(-step / 4)  # the per-example spread opens faster than the margins grow
            mean_m = {t: final[t] * grow * (1.0 if mcm else 0.55) for t in TERMS}
            n = per_step  # the policy starts as the reference: every reward is 0 at first, then spreads
            chosen = rng.normal(-0.05 * grow, 0.25 * spread, n)
            margins = {t: rng.normal(mean_m[t], 0.6 * spread, n) for t in TERMS}
            if mcm:  # one Bradley-Terry sigmoid over the weighted margins
                z = sum(beta_norm[t] * margins[t] for t in TERMS)
            else:
                z = margins[RESPONSE]
            losses = np.logaddexp(0.0, -z)  # -log sigmoid(z), the margins being beta-scaled already
            rejected = chosen - margins[RESPONSE]
            e = {"epoch": round(step / 125, 4), "grad_norm": float(abs(rng.normal(9.0, 3.0))),
                 "learning_rate": _cosine_lr(step, total, 5e-7), "loss": round(float(losses.mean()), 4),
                 "rewards/accuracies": float((margins[RESPONSE] > 0).mean()),
                 "rewards/chosen": float(chosen.mean()), "rewards/margins": float(margins[RESPONSE].mean()),
                 "rewards/rejected": float(rejected.mean()), "step": step}
            if mcm:
                for t in TERMS:
                    e[f"mcm/{t}/accuracy"] = float((margins[t] > 0).mean())
                    e[f"mcm/{t}/margin"] = float(margins[t].mean())
                e[f"mcm/reward/{WINNER}"] = float(chosen.mean())
                for t, (loser, *_rest) in TERMS.items():
                    e[f"mcm/reward/{loser}"] = float((chosen - margins[t]).mean())
            entries.append(e)
        entries.append({"epoch": float(epochs), "step": total, "total_flos": 0.0,
                        "train_loss": float(np.mean([x["loss"] for x in entries])), "train_runtime": 5400.0 * epochs})
        states[name] = _state(entries, total, epochs, 1)
    return states


def draw_training_curves(path: Path, demo_dir: Path | None, synthetic: bool = False) -> tuple[Path, str]:
    """The example curves: real runs under ``demo_dir`` when any has a state, else a synthetic log."""
    if not synthetic and demo_dir is not None:
        runs = {}
        for name, sub in (("SFT", "sft"), ("DPO", "dpo"), ("MCM-DPO", "mcmdpo")):
            try:
                find_state(demo_dir / sub)
            except CurvesError:
                continue
            runs[name] = demo_dir / sub
        if runs:
            plot_runs(runs, path, smooth=5, title=f"Training curves of the runs in {demo_dir}")
            return path, f"runs in {demo_dir}"
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, state in synthetic_logs().items():
            run = Path(tmp) / name
            run.mkdir()
            (run / "trainer_state.json").write_text(json.dumps(state, indent=1))
            runs[name] = run
        plot_runs(runs, path, smooth=5, title="Training curves — illustration, synthetic log (not a real run)")
    return path, "synthetic log"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "images", help="folder for the PNGs (default images/)")
    parser.add_argument("--demo-dir", type=Path, default=REPO / "outputs" / "demo",
                        help="where real runs sft/ dpo/ mcmdpo/ are looked for (default outputs/demo)")
    parser.add_argument("--synthetic", action="store_true",
                        help="draw the example curves from the synthetic log even when real runs exist")
    args = parser.parse_args(argv)
    with rc_context():
        rcdefaults()  # the same drawing whatever style the caller has set (restored on exit)
        rcParams.update(RC)
        for p in (draw_mcm_conditions(args.out / "mcm_conditions.png"), draw_paradigms(args.out / "paradigms.png")):
            print(f"draw_figures: wrote {p}")
        p, source = draw_training_curves(args.out / "training_curves_example.png", args.demo_dir, args.synthetic)
        print(f"draw_figures: wrote {p} (from the {source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
