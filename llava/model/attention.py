"""Which attention kernel a model runs with (``--attn_implementation``).

Flash-attention 2 is the fastest kernel on a GPU, but it takes only a padding mask (one row per
sequence, 1 for tokens, 0 for padding). The tree-packed preference rows (``--preference_forward
packed``) attend through a tree mask (each branch sees its own segment and its ancestors), which
``sdpa_tree`` (``llava.model.tree_attention``: one SDPA call per chain of segments, the masked-out
pairs never computed), ``sdpa`` and ``eager`` (the dense 4-D mask, every pair computed: the
reference) take. ``auto`` chooses ``sdpa_tree`` for them. Everything else here uses ordinary masks:
SFT, the naive preference forward (one padded row per condition) and generation, where
``sdpa_tree`` is plain sdpa.

``choose_attention`` is pure: what is installed and present is passed in (``flash_attn_installed``,
``cuda_available``), so every case is testable on any machine.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from llava.model.tree_attention import TREE_SDPA

AttnImplementation = Literal["auto", "sdpa_tree", "sdpa", "eager", "flash_attention_2"]
FLASH = "flash_attention_2"


class AttentionError(ValueError):
    """A kernel that cannot run here or cannot take this run's masks: one line saying why."""


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def choose_attention(requested: str, *, ordinary_masks: bool, half_precision: bool, flash_installed: bool,
                     cuda: bool) -> str:
    """The ``attn_implementation`` to load the model with.

    ``auto``: flash-attention 2 when the ``flash_attn`` package is installed, CUDA is present, the
    weights are bf16/fp16 (the kernel has no fp32 path) and the masks are ordinary; otherwise
    ``sdpa_tree`` for tree-packed rows and sdpa for ordinary masks. An explicit ``flash_attention_2``
    that cannot run raises ``AttentionError`` naming the reason. ``sdpa_tree``, ``sdpa`` and
    ``eager`` are returned as given (all take any mask).
    """
    if requested in (TREE_SDPA, "sdpa", "eager"):
        return requested
    if requested not in ("auto", FLASH):
        raise AttentionError(f"--attn_implementation {requested}: choose auto, {TREE_SDPA}, sdpa, eager or {FLASH}")
    blockers = [why for ok, why in (
        (ordinary_masks, f"the tree-packed preference rows (--preference_forward packed) need a tree mask, which only "
                         f"{TREE_SDPA}, sdpa and eager take: use --preference_forward naive, or {TREE_SDPA}"),
        (flash_installed, "the flash_attn package is not installed (pip install flash-attn --no-build-isolation)"),
        (cuda, "no CUDA device is visible"),
        (half_precision, "flash-attention 2 runs in bf16 or fp16 only: add --bf16 True (or --fp16 True)"),
    ) if not ok]
    if requested == "auto":
        return FLASH if not blockers else "sdpa" if ordinary_masks else TREE_SDPA
    if blockers:
        raise AttentionError(f"--attn_implementation {FLASH}: {blockers[0]}")
    return FLASH


def attention_here(requested: str, *, ordinary_masks: bool, dtype: torch.dtype | None, cuda: bool | None = None) -> str:
    """``choose_attention`` with what this machine has: the flash_attn package, CUDA (``cuda``: the
    device the model will run on is a CUDA one; default: whether any is visible)."""
    return choose_attention(requested, ordinary_masks=ordinary_masks, half_precision=dtype in (torch.bfloat16, torch.float16),
                            flash_installed=flash_attn_installed(), cuda=cuda_available() if cuda is None else cuda)


def use_attention(model, attn: str) -> None:
    """Switch a loaded model to ``attn`` (transformers' ``set_attn_implementation``, which checks it can
    run). Models built from configs or converted from the original layout start on the default kernel."""
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
