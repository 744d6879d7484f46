"""What the Trainer trains: a LLaVA model called on a collated batch.

``ResponseLogps`` wraps the LLaVA model (plain or peft) so that one call, through the DeepSpeed
engine's own forward (which ZeRO's backward bookkeeping hooks into), runs the whole step's
forward: images, language model, head on the scored positions. It returns the summed response
log-probabilities of each record and condition, a plain ``[B, C]`` tensor (ZeRO-3's hooks see module
outputs, and only tensors and their tuples and dicts are hooked); ``policy_logps`` labels its columns
with the batch's ``conditions`` as ``ConditionLogps`` (``C = 1``, ``sft``, for SFT).
"""

from __future__ import annotations

import torch

from llava.method import ConditionLogps
from llava.model.forward import response_logps, response_logps_naive


class ResponseLogps(torch.nn.Module):
    def __init__(self, llava, naive: bool = False):
        super().__init__()
        self.llava = llava
        self.naive = naive

    @property
    def config(self):
        return self.llava.config

    def forward(self, conditions: tuple[str, ...], **batch) -> torch.Tensor:
        """``[B, C]`` summed response log-probabilities, columns in ``conditions`` order."""
        return response_logps_naive(self.llava, batch) if self.naive else response_logps(self.llava, batch)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        # Non-reentrant checkpointing needs no inputs that require grad (frozen embeddings, LoRA).
        kwargs = activation_checkpointing_kwargs or {"use_reentrant": False}
        self.llava.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers,
                                                   offload=offload)


def policy_logps(model: torch.nn.Module, batch: dict) -> ConditionLogps:
    """``model`` (a ``ResponseLogps``, or the engine wrapping it) on ``batch``, its columns named."""
    return ConditionLogps(model(**batch), tuple(batch["conditions"]))
