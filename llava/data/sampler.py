"""``--group_by_modality_length``: batches of similar length, records with and without images apart.

Lengths are positive for records with an image and negative for text-only ones (as LLaVA's
datasets report them). Indices are shuffled, split into megabatches of ``batch_size * world``,
each sorted by length, so a step's per-device batches hold similar lengths of one modality.
The order is a function of ``(seed, epoch)``: a resumed run replays it exactly.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def modality_grouped_indices(lengths: list[int], megabatch: int, generator: torch.Generator) -> list[int]:
    image = [i for i, n in enumerate(lengths) if n > 0]
    text = [i for i, n in enumerate(lengths) if n <= 0]

    def megabatches(indices: list[int]) -> list[list[int]]:
        order = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
        chunks = [order[k:k + megabatch] for k in range(0, len(order), megabatch)]
        return [sorted(c, key=lambda i: abs(lengths[i]), reverse=True) for c in chunks]

    groups = megabatches(image) + megabatches(text)
    full = [g for g in groups if len(g) == megabatch]
    partial = [g for g in groups if len(g) != megabatch]  # at most one per modality: keep them last
    order = [full[j] for j in torch.randperm(len(full), generator=generator).tolist()]
    return [i for g in order + partial for i in g]


class ModalityLengthGroupedSampler(Sampler[int]):
    def __init__(self, lengths: list[int], batch_size: int, world_size: int, seed: int = 0):
        self.lengths, self.megabatch, self.seed, self.epoch = list(lengths), batch_size * world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_grouped_indices(self.lengths, self.megabatch, g))
