"""Helpers that LLaVA's own scripts import (``from llava.utils import disable_torch_init``)."""

import torch


def disable_torch_init() -> None:
    """Skip the default random initialisation of Linear and LayerNorm layers (weights come from a checkpoint)."""
    setattr(torch.nn.Linear, "reset_parameters", lambda self: None)
    setattr(torch.nn.LayerNorm, "reset_parameters", lambda self: None)
