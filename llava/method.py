"""The method's vocabulary, in one place: the eight conditions, the seven terms, and what a run needs.

A preference record yields eight conditions, each a choice of context ``c`` (the record's question,
or another record's), image ``m`` (the record's image, or a corrupted one) and response ``y``
(chosen or rejected), named ``c{w|l}_m{w|l}_y{w|l}``. Each MCM-DPO term prefers ``cw_mw_yw`` to one
loser (docs/method.md, "Conditions" and "Terms"). Nothing else in the package spells a condition or
term name: the dataset, collator, forward, reference cache, objectives, curves and figures read them
from here, and log-probabilities travel as ``ConditionLogps``, labelled by condition, never by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Mapping

if TYPE_CHECKING:  # the vocabulary itself needs no torch (the curves CLI imports it)
    import torch

Factor = Literal["w", "l"]


@dataclass(frozen=True)
class Condition:
    """One of the eight conditions: which context, image and response it uses (``w`` or ``l``)."""

    context: Factor
    image: Factor
    response: Factor

    @property
    def name(self) -> str:
        return f"c{self.context}_m{self.image}_y{self.response}"


# Context outermost, response innermost: the order of every stacked tensor and of the reference cache.
CONDITIONS: tuple[Condition, ...] = tuple(Condition(c, m, y) for c in "wl" for m in "wl" for y in "wl")
CONDITION_NAMES: tuple[str, ...] = tuple(c.name for c in CONDITIONS)
BY_NAME: dict[str, Condition] = {c.name: c for c in CONDITIONS}
CHOSEN = "cw_mw_yw"  # every factor winning: the condition each term prefers
REJECTED = "cw_mw_yl"  # plain DPO's loser
DPO_CONDITIONS = (CHOSEN, REJECTED)
SFT_CONDITION = "sft"  # the single "condition" of an SFT batch: the conversation's answers


def condition(name: str) -> Condition:
    if name not in BY_NAME:
        raise ValueError(f"unknown condition {name!r}; the conditions are {CONDITION_NAMES}")
    return BY_NAME[name]


@dataclass(frozen=True)
class Term:
    """One MCM-DPO term: the condition it prefers ``cw_mw_yw`` to and its default weight."""

    name: str
    loser: str
    default_weight: float
    label: str
    module: str  # the paper's grouping: single, pairwise or multi factor


TERMS: tuple[Term, ...] = (
    Term("response", "cw_mw_yl", 1.0, "response", "single"),
    Term("image", "cw_ml_yw", 0.5, "image", "single"),
    Term("context", "cl_mw_yw", 0.5, "context", "single"),
    Term("context_response", "cl_mw_yl", 0.2, "context+response", "pairwise"),
    Term("image_response", "cw_ml_yl", 0.2, "image+response", "pairwise"),
    Term("context_image", "cl_ml_yw", 0.2, "context+image", "pairwise"),
    Term("all", "cl_ml_yl", 0.2, "all three", "multi"),
)
TERM_NAMES: tuple[str, ...] = tuple(t.name for t in TERMS)
TERM_BY_NAME: dict[str, Term] = {t.name: t for t in TERMS}
DEFAULT_NORM = sum(t.default_weight for t in TERMS)  # 2.8, --para_norm's default
DEFAULT_WEIGHTS: dict[str, float] = {t.name: t.default_weight for t in TERMS}


def needed_conditions(weights: Mapping[str, float]) -> tuple[str, ...]:
    """The conditions a loss with these weights reads, in ``CONDITIONS`` order: the chosen and rejected
    ones (logged always) and each active term's loser."""
    used = set(DPO_CONDITIONS) | {TERM_BY_NAME[t].loser for t, w in weights.items() if w != 0}
    return tuple(name for name in CONDITION_NAMES if name in used)


def metric_names(kind: str, conditions: tuple[str, ...] = (), weights: Mapping[str, float] | None = None) -> list[str]:
    """The names a run of ``kind`` (``sft``, ``dpo``, ``mcm``) logs each step besides ``loss``."""
    if kind == "sft":
        return []
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
    if kind == "mcm":
        for t in TERMS:
            if (weights or {}).get(t.name, 0) != 0:
                names += [f"mcm/{t.name}/margin", f"mcm/{t.name}/accuracy"]
        names += [f"mcm/reward/{c}" for c in conditions]
    return names


@dataclass(frozen=True)
class ConditionLogps:
    """Summed response log-probabilities ``[B, C]`` with the name of each column.

    ``logps["cw_ml_yl"]`` is that condition's ``[B]`` column; the forward, the reference cache and
    the objectives pass these, so a column is always found by its name.
    """

    values: torch.Tensor
    names: tuple[str, ...]

    def __post_init__(self):
        if self.values.dim() != 2 or self.values.shape[1] != len(self.names):
            raise ValueError(f"log-probs of shape {tuple(self.values.shape)} for conditions {self.names}")

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.values[:, self.names.index(name)]
        except ValueError:
            raise KeyError(f"no log-probs for condition {name!r}; these are {self.names}") from None

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: self[name] for name in self.names}
