"""Helpers that LLaVA's own scripts import (``from llava.utils import disable_torch_init``)."""


def disable_torch_init() -> None:
    """Kept so LLaVA scripts run: a no-op here.

    LLaVA patched ``torch.nn.Linear``/``LayerNorm`` to skip their random initialisation before
    loading weights; transformers' ``from_pretrained`` already skips it, so nothing is patched.
    """
