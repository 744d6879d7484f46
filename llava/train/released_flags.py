"""The released method flags, as aliases of ``--loss`` and ``--term_weights``: the one module that knows them.

``LVUGAI/MCM-DPO`` chooses its objective with ``--task LM|DPO`` and ``--use_cross_modal_loss``, turns
terms on with ``--use_cl_reward_num`` (response and image always; each other term above its count) and
weighs them with ``--para_r1..7``. Here a run reads only ``args.loss`` (``sft``, ``dpo``, ``mcm_dpo``) and
``args.term_weights`` (term name -> weight, ``llava.method.TERMS``); ``ReleasedFlags`` holds the released
fields so that the released command lines parse unchanged, and ``translate`` turns them into the new pair.

When both spellings are given: ``--task``/``--use_cross_modal_loss`` must name the same loss as ``--loss``,
and each ``--para_rN`` given must equal its term's weight in ``--term_weights`` (else one line names both);
``--use_cl_reward_num`` keeps its released meaning over ``--term_weights``: the terms above its count weigh 0
(so ``CL_REWARD_NUM=4 bash scripts/mcmdpo.sh`` still works over the YAML's weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Mapping

from llava.method import CHOSEN, TERM_BY_NAME, TERMS

Loss = Literal["sft", "dpo", "mcm_dpo"]
Task = Literal["LM", "DPO"]

# --para_rN -> the term it weighs (docs/method.md, "Released settings")
PARA_R: dict[str, str] = {"para_r1": "context", "para_r2": "image", "para_r3": "response",
                          "para_r4": "context_response", "para_r5": "image_response", "para_r6": "context_image",
                          "para_r7": "all"}
FLAG_OF: dict[str, str] = {term: flag for flag, term in PARA_R.items()}
# A term is on when --use_cl_reward_num is above its threshold (response and image: always).
THRESHOLD: dict[str, int] = {"response": 0, "image": 0, "context": 2, "context_response": 3, "image_response": 4,
                             "context_image": 5, "all": 6}
ALL_TERMS = len(TERMS)  # --use_cl_reward_num's default: every term on

# Released fields that change nothing in this toolkit, and why; accepted so that the released
# command lines run unchanged.
NO_EFFECT = {
    "lazy_preprocess": "records are always processed lazily (the released code never reads it either)",
    "is_multimodal": "every model here is multimodal (the released trainer sets it itself from --vision_tower)",
    "mm_patch_merge_type": "the architecture decides: LLaVA flat, LLaVA-NeXT unpadded tiles with a newline row",
    "mpt_attn_impl": "MPT language models are not supported",
    "cache_dir": "models load from local directories only: nothing is downloaded or cached",
    "lora_weight_path": "never read by the released code",
    "dpo_token_weighted": "never read by the released code",
    "dpo_token_weight": "never read by the released code",
    "use_cross_modal_gama": "never read by the released code",
    "tok_beta": "never read by the released code",
    "use_tdpo": "never read by the released code",
}


def _para_r(flag: str):
    term = TERM_BY_NAME[PARA_R[flag]]
    return field(default=term.default_weight, metadata={"help": f"released alias: weight of the {term.label} term "
                                                                f"(prefers {CHOSEN} to {term.loser}); --term_weights"})


def _idle(name: str, default):
    return field(default=default, metadata={"help": "accepted, no effect: " + NO_EFFECT[name]})


@dataclass
class ReleasedFlags:
    """The released training fields: aliases of --loss/--term_weights, and those with no effect."""

    task: Task = field(default="LM", metadata={"help": "released alias: LM = --loss sft; DPO = --loss dpo or mcm_dpo"})
    use_cross_modal_loss: bool = field(default=False, metadata={"help": "released alias: with --task DPO, True = "
                                                                "--loss mcm_dpo, False = --loss dpo"})
    use_cl_reward_num: int = field(default=ALL_TERMS, metadata={"help": "released alias: MCM-DPO terms on: response and "
                                   "image always; >2 context, >3 context+response, >4 image+response, >5 context+image, "
                                   ">6 all three (the others weigh 0)"})
    para_r1: float = _para_r("para_r1")
    para_r2: float = _para_r("para_r2")
    para_r3: float = _para_r("para_r3")
    para_r4: float = _para_r("para_r4")
    para_r5: float = _para_r("para_r5")
    para_r6: float = _para_r("para_r6")
    para_r7: float = _para_r("para_r7")
    cache_dir: str | None = _idle("cache_dir", None)
    mpt_attn_impl: str | None = _idle("mpt_attn_impl", "triton")
    lora_weight_path: str = _idle("lora_weight_path", "")
    dpo_token_weighted: bool = _idle("dpo_token_weighted", False)
    dpo_token_weight: float = _idle("dpo_token_weight", 1.1)
    use_cross_modal_gama: float = _idle("use_cross_modal_gama", 0.3)
    tok_beta: float = _idle("tok_beta", 0.1)
    use_tdpo: bool = _idle("use_tdpo", True)


RELEASED_METHOD_FLAGS = ("task", "use_cross_modal_loss", "use_cl_reward_num", *PARA_R)
_DEFAULTS = {f.name: f.default for f in fields(ReleasedFlags)}


def released_term_weights(use_cl_reward_num: int, para_r: Mapping[str, float]) -> dict[str, float]:
    """The seven terms' weights from ``--use_cl_reward_num`` and ``--para_r1..7`` (``para_r`` by flag name)."""
    _check_count(use_cl_reward_num)
    return {t.name: float(para_r[FLAG_OF[t.name]]) if use_cl_reward_num > THRESHOLD[t.name] else 0.0 for t in TERMS}


def _check_count(n: int) -> None:
    if not 1 <= n <= ALL_TERMS:
        raise ValueError(f"--use_cl_reward_num must be in 1..{ALL_TERMS}, got {n}")


def full_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """``--term_weights`` as all seven terms (those left out weigh 0); an unknown name stops."""
    unknown = [name for name in weights if name not in TERM_BY_NAME]
    if unknown:
        raise ValueError(f"--term_weights: unknown term {unknown[0]!r}; the terms are {', '.join(TERM_BY_NAME)}")
    return {t.name: float(weights.get(t.name, 0.0)) for t in TERMS}


def _released_loss(args) -> Loss:
    if args.task == "LM":
        return "sft"
    return "mcm_dpo" if args.use_cross_modal_loss else "dpo"


def _given(args, name: str) -> bool:
    """A released field counts as given when it differs from its default (a YAML or command line set it)."""
    return getattr(args, name) != _DEFAULTS[name]


def translate(args) -> None:
    """Set ``args.loss`` and ``args.term_weights`` (a dict of all seven terms) from the new flags, the
    released ones, or both where they agree; called by ``TrainingArguments.__post_init__``."""
    released = _released_loss(args)
    if args.loss is None:
        args.loss = released
    elif (_given(args, "task") or _given(args, "use_cross_modal_loss")) and released != args.loss:
        raise ValueError(f"--loss {args.loss} disagrees with --task {args.task} --use_cross_modal_loss "
                         f"{args.use_cross_modal_loss} (which mean --loss {released}): give one of them")
    _check_count(args.use_cl_reward_num)
    if args.term_weights is None:
        args.term_weights = released_term_weights(args.use_cl_reward_num, {f: getattr(args, f) for f in PARA_R})
        return
    weights = full_weights(args.term_weights)
    for flag, term in PARA_R.items():
        if _given(args, flag) and getattr(args, flag) != weights[term]:
            raise ValueError(f"--{flag} {getattr(args, flag):g} disagrees with --term_weights {term}: "
                             f"{weights[term]:g}: give one of them")
    args.term_weights = {name: w if args.use_cl_reward_num > THRESHOLD[name] else 0.0 for name, w in weights.items()}
