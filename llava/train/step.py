"""One training step of every stage (SFT, DPO, MCM-DPO), top to bottom::

    batch (llava.data.collate)
      -> policy_logps(model, batch)            the policy's summed response log-probs, a ConditionLogps [B, C]
                                               (ScoringModel -> llava.model.forward.response_logps)
      -> reference.logps(batch)                the reference's, when the objective compares against one
      -> objective(policy, reference, batch)   loss and per-record metrics (llava.train.losses)

``LlavaTrainer.compute_loss`` calls ``step_loss`` and keeps the metrics for the next log; evaluation
calls it too, without gradients.

Three names for the three log-prob things: ``ScoringModel``, the module the Trainer holds (a batch
in, a ``[B, C]`` tensor out); ``response_logps``, the forward function it runs; ``ConditionLogps``,
that tensor with its columns named by condition.

A reference is anything with ``logps(batch)``. The three here (``--reference_mode``) are prepared
once before step 1 (``llava.train.reference``: the cached pass, the frozen copy under DeepSpeed)
and need nothing from the trainer afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from llava.method import ConditionLogps
from llava.model.forward import response_logps, response_logps_naive
from llava.train.losses import Metrics
from llava.train.reference import ReferenceSetup, cache_path, cached_table, frozen_copy


class ScoringModel(torch.nn.Module):
    """The LLaVA model (``llava``) called on a collated batch: ``[B, C]`` summed response log-probs.

    One call runs the whole step's forward (images, language model, head on the scored positions)
    through the DeepSpeed engine's own forward, which ZeRO's backward bookkeeping hooks into. It
    returns a plain tensor: ZeRO-3 hooks module outputs, and only tensors and their tuples and dicts.

    It holds the LLaVA model's parts under their own names (``model``, ``lm_head``), so its weights are
    named as the LLaVA model's are: a saved model loads into it as it is, and LoRA wraps it as it would
    wrap the LLaVA model (``llava.train.params.apply_lora``), the Trainer then holding a peft model whose
    adapters its own resume reloads.
    """

    def __init__(self, llava, naive: bool = False):
        super().__init__()
        for name, part in llava.named_children():
            self.add_module(name, part)
        object.__setattr__(self, "llava", llava)  # not a submodule: its parts are this module's
        self.naive = naive  # --preference_forward naive: the published full-sequence computation

    @property
    def config(self):
        return self.llava.config

    # What peft reads of the model it wraps: the LLaVA model's.
    @property
    def base_model_prefix(self) -> str:
        return self.llava.base_model_prefix

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.llava.is_activation_checkpointing

    def train(self, mode: bool = True):
        self.llava.training = mode
        return super().train(mode)

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
    """``model`` (a ``ScoringModel``, or the engine wrapping it) on ``batch``, its columns named."""
    return ConditionLogps(model(**batch), tuple(batch["conditions"]))


class Objective(Protocol):
    conditions: tuple[str, ...]
    needs_reference: bool

    def __call__(self, policy: ConditionLogps, reference: ConditionLogps | None,
                 batch: dict) -> tuple[torch.Tensor, Metrics]: ...


class Reference(Protocol):
    def prepare(self, setup: ReferenceSetup) -> None:
        """Once, before step 1 (and before an evaluation at step 0), with the policy at its starting weights."""

    def logps(self, batch: dict) -> ConditionLogps:
        """The reference model's summed response log-probs of ``batch``, columns named as the policy's."""


def step_loss(model: torch.nn.Module, batch: dict, objective: Objective,
         reference: Reference | None) -> tuple[torch.Tensor, ConditionLogps, Metrics]:
    """The loss of ``batch``, the policy's log-probs and the per-record metrics."""
    policy = policy_logps(model, batch)
    ref = reference.logps(batch) if objective.needs_reference else None
    loss, metrics = objective(policy, ref, batch)
    return loss, policy, metrics


# -- the references (--reference_mode) ---------------------------------------------------------------


class CachedReference:
    """``cached``: the starting policy's log-probs of every record, computed once and kept on disk
    (``llava.train.reference.cached_table``); a step looks its records' rows up by index.

    ``split`` is the dataset the table covers, ``train`` or ``eval``; each has its own cache file."""

    def __init__(self, cache_dir: str | Path, key: dict, split: str = "train"):
        self.cache_dir, self.split = Path(cache_dir), split
        self.key = key if split == "train" else {**key, "split": split}
        self.path = cache_path(cache_dir, self.key)
        self.table: torch.Tensor | None = None
        self.reused = False

    def for_split(self, split: str) -> "CachedReference":
        return CachedReference(self.cache_dir, self.key, split)

    def prepare(self, setup: ReferenceSetup) -> None:
        self.table, self.reused = cached_table(self.path, self.key, setup, setup.datasets[self.split])

    def logps(self, batch: dict) -> ConditionLogps:
        values = self.table[batch["index"].cpu()].to(batch["input_ids"].device)
        return ConditionLogps(values, tuple(self.key["conditions"]))


class LiveReference:
    """``live``: a frozen copy of the starting model, run on every batch (sharded too under ZeRO-3)."""

    def __init__(self, model: ScoringModel):
        self.model = model.eval().requires_grad_(False)

    def prepare(self, setup: ReferenceSetup) -> None:
        self.model = frozen_copy(self.model, setup)

    @torch.no_grad()
    def logps(self, batch: dict) -> ConditionLogps:
        return policy_logps(self.model, batch)


class AdaptersOffReference:
    """``adapters_off``: the LoRA policy itself with its adapters disabled: no second copy of the weights.

    ``peft_model`` is the policy's peft model; the call goes through the policy as wrapped (``prepare``)
    so that ZeRO-3 gathers the parameters as it does for the policy's own forward."""

    def __init__(self, peft_model):
        self.peft_model = peft_model
        self.policy: torch.nn.Module | None = None

    def prepare(self, setup: ReferenceSetup) -> None:
        self.policy = setup.policy

    @torch.no_grad()
    def logps(self, batch: dict) -> ConditionLogps:
        with self.peft_model.disable_adapter():
            return policy_logps(self.policy, batch)
