"""A step whose loss or gradient is not finite (``--nan_policy stop|skip``).

The Trainer's own ``logging_nan_inf_filter`` only keeps a NaN out of the logged loss: the update is
still applied, and one NaN weight ruins every later step. Here the optimizer step that meets a NaN
or an infinity, on any micro-batch of any rank, either

* ``stop`` (default): ends the run with one line naming the step, the records of the batch that
  gave it and the newest complete checkpoint to resume from, on every rank at the same step; or
* ``skip``: leaves the weights and the optimizer's state as they were, and counts the step in the
  logs (``nan_skipped``, the total so far).

Under DeepSpeed the optimizer steps inside the last micro-batch's backward, where DeepSpeed itself
skips an update whose gradients are not finite (fp16 loss scaling, and bf16/fp32 by the gradient
norm); the trainer reads that verdict. With fp16 an overflowing gradient is loss scaling's routine
business, not a fault: only a non-finite loss counts there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

NAN_POLICIES = ("stop", "skip")


class NonFiniteStep(RuntimeError):
    """The run stops: a step's loss or gradient is not finite (``--nan_policy stop``)."""


def is_finite(value: torch.Tensor | float) -> bool:
    if torch.is_tensor(value):
        return bool(torch.isfinite(value).all())
    return math.isfinite(value)


def gradients_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every gradient present is finite (parameters without one are passed over)."""
    checks = [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
    return bool(torch.stack(checks).all()) if checks else True  # one device sync, not one per parameter


@dataclass
class StepRecords:
    """The micro-batches of the optimizer step in progress: their records, and those whose loss was not finite."""

    seen: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)

    def add(self, records: Sequence[int], loss_finite: bool) -> None:
        self.seen += records
        if not loss_finite:
            self.nonfinite += records

    def blamed(self, loss_nonfinite_anywhere: bool | None = None) -> list[int]:
        """The records to name: those of the micro-batches with a non-finite loss, else (a gradient
        alone was non-finite) all of the step's. ``loss_nonfinite_anywhere``: whether any rank's loss
        was not finite (a rank whose losses were all finite then names none); default: this rank's."""
        if loss_nonfinite_anywhere is None:
            loss_nonfinite_anywhere = bool(self.nonfinite)
        return self.nonfinite if loss_nonfinite_anywhere else self.seen

    def clear(self) -> None:
        self.seen, self.nonfinite = [], []


def verdict(policy: str, finite: bool) -> str:
    """``update``, ``skip`` or ``stop``: what an optimizer step does, given ``--nan_policy`` and
    whether its loss and gradients were finite on every rank."""
    if policy not in NAN_POLICIES:
        raise ValueError(f"--nan_policy must be one of {NAN_POLICIES}, got {policy!r}")
    return "update" if finite else policy


def describe_records(indices: Iterable[int], records: Sequence | None = None) -> str:
    """``data.json records 3, 5`` (by their place in the data file when the dataset knows its records)."""
    indices = sorted(set(indices))
    if records is None:
        return "records " + ", ".join(map(str, indices)) if indices else "no records"
    by_source: dict[str, list[int]] = {}
    for i in indices:
        by_source.setdefault(records[i].source, []).append(records[i].number)
    return "; ".join(f"{src} record{'s' if len(nums) > 1 else ''} {', '.join(map(str, nums))}"
                     for src, nums in by_source.items())


def stop_message(step: int, what: str, records: str, checkpoint: str | None) -> str:
    """The one line a ``stop`` ends the run with."""
    resume = (f"the last good checkpoint is {checkpoint}" if checkpoint
              else "no checkpoint was saved before it")
    return (f"non-finite {what} at step {step} ({records}): {resume}; "
            "fix the data or lower the learning rate, or pass --nan_policy skip to leave such steps out")
