"""``--group_by_modality_length``: batches of similar length, records with and without images apart.

Lengths are positive for records with an image and negative for text-only ones (as LLaVA's
datasets report them). Indices are shuffled, split into megabatches of ``batch_size * world``,
each sorted by length, so a step's batches hold similar lengths of one modality. As in the released
trainer, a megabatch is then dealt into ``world`` batches of equal total length (``even_batches``),
one per device: without that the longest batch of every step went to device 0 and the others waited
for it (15-35% of two CPU processes idle in the demo's SFT).
The order is a function of ``(seed, epoch)``: a resumed run replays it exactly.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def even_batches(longest_first: list[int], lengths: list[int], batches: int) -> list[int]:
    """``longest_first`` dealt into ``batches`` equal-sized batches of about equal total length, then
    concatenated: each index goes to the open batch with the smallest total so far, and a batch takes
    no more once full. When the indices do not divide evenly, every ``batches``-th index instead."""
    if len(longest_first) % batches:
        dealt = [longest_first[k::batches] for k in range(batches)]
    else:
        size = len(longest_first) // batches
        dealt, totals = [[] for _ in range(batches)], [0.0] * batches
        for i in longest_first:
            k = totals.index(min(totals))
            dealt[k].append(i)
            totals[k] = float("inf") if len(dealt[k]) == size else totals[k] + abs(lengths[i])
    return [i for batch in dealt for i in batch]


def modality_grouped_indices(lengths: list[int], batch_size: int, batches: int, generator: torch.Generator) -> list[int]:
    """The epoch's order: megabatches of ``batches`` batches of ``batch_size``, one modality each."""
    megabatch = batch_size * batches
    image = [i for i, n in enumerate(lengths) if n > 0]
    text = [i for i, n in enumerate(lengths) if n <= 0]

    def megabatches(indices: list[int]) -> list[list[int]]:
        order = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
        chunks = [order[k:k + megabatch] for k in range(0, len(order), megabatch)]
        return [even_batches(sorted(c, key=lambda i: abs(lengths[i]), reverse=True), lengths, batches) for c in chunks]

    groups = megabatches(image) + megabatches(text)
    full = [g for g in groups if len(g) == megabatch]
    partial = [g for g in groups if len(g) != megabatch]  # at most one per modality: keep them last
    order = [full[j] for j in torch.randperm(len(full), generator=generator).tolist()]
    return [i for g in order + partial for i in g]


class ModalityLengthGroupedSampler(Sampler[int]):
    def __init__(self, lengths: list[int], batch_size: int, world_size: int, seed: int = 0):
        """``world_size``: the batches of one optimizer step (processes x gradient accumulation steps)."""
        self.lengths, self.batch_size, self.batches = list(lengths), batch_size, world_size
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_grouped_indices(self.lengths, self.batch_size, self.batches, g))
