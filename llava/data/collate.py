"""Collators: examples become one model batch with a gather plan for response log-probabilities.

Every collator returns a dict with the same keys, so one forward function serves SFT, DPO and
MCM-DPO, packed or naive (``B`` records, ``R`` rows, ``L`` positions, ``C`` conditions, ``T``
scored tokens per condition, ``S`` scored tokens in all, ``N`` images)::

    input_ids      [R, L]        long   image tokens expanded in place
    attention_mask [R, L]        bool   padding (naive and SFT only: packed rows have ``tree``)
    tree           TreeLayout           packed only: each row's chains (``llava.model.tree_attention``),
                                        host-side integers; no [L, L] mask is built
    position_ids   [R, L]        long   (packed only; absent means 0..L-1)
    pixel_values   [N, 3, S, S] or [N, P, 3, S, S] (anyres)   images in the order they occur
    image_sizes    [N, 2]        long   (height, width), anyres only
    image_tokens   int                  image token ids in ``input_ids`` (checked against the features without
                                        reading the device)
    logp_index     [B, C, T]     long   flat index into the R*L hidden states that predicts ...
    logp_target    [B, C, T]     long   ... this token
    logp_mask      [B, C, T]     bool   which of the T slots are real
    scored_index   [S]           long   logp_index of the real slots only, in order ...
    scored_target  [S]           long   ... their targets ...
    scored_slot    [S]           long   ... and where each goes in the flattened [B * C * T]
    index          [B]           long   dataset index of each record (reference-cache key)
    conditions     C names       tuple  the condition of each of the C columns (``llava.method``)

``logp_index`` points at the position *before* each scored token: a response's first token is
predicted at the last position of its parent segment, wherever packing placed that segment. The
``scored_*`` tensors are the same plan without the padded slots, so the forward gathers them with
no boolean indexing (which would wait for the device to count the selected elements).

A packed preference record is one row per distinct image, holding that image's tree of segments,
each written once::

    prefix | image m_w | question c_w | y_w | y_l | question c_l | y_w | y_l      (row of m_w)
    prefix | image m_l | question c_w | y_w | y_l | question c_l | y_w | y_l      (row of m_l)

Each segment attends to itself (causally) and to its ancestors only; its position ids continue
from its parent's end, so every branch sees exactly the positions of its own full sequence. The
two images share only the short text prefix, which each row repeats: two rows of half the length
halve the attention cost (quadratic in the row) of one row holding both.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from llava.constants import IGNORE_INDEX
from llava.data.datasets import PreferenceExample, SFTExample
from llava.data.images import ProcessedImage
from llava.method import SFT_CONDITION, Condition, condition
from llava.model.parts import stack_tiles
from llava.model.tree_attention import TreeLayout, row_chains


@dataclass(frozen=True)
class _Placed:
    """Where a segment landed in its row."""

    segment: int
    start: int  # index of its first token in the row
    last: int  # index of its last token
    next_position: int  # position id its children start from


@dataclass
class _Row:
    """One row under construction: token ids, position ids, each segment's span and parent, images."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[tuple[int, int, int | None]] = field(default_factory=list)  # (start, end, parent segment)
    images: list[ProcessedImage] = field(default_factory=list)

    def add(self, ids: list[int], parent: _Placed | None) -> _Placed:
        """Append a segment after everything already in the row, as a child of ``parent``."""
        seg = len(self.segments)
        first_position = parent.next_position if parent else 0
        start = len(self.ids)
        self.ids += ids
        self.positions += range(first_position, first_position + len(ids))
        self.segments.append((start, len(self.ids), parent.segment if parent else None))
        return _Placed(seg, start, start + len(ids) - 1, first_position + len(ids))

    def add_image(self, image: ProcessedImage, image_token_id: int, parent: _Placed | None) -> _Placed:
        self.images.append(image)
        return self.add([image_token_id] * image.num_tokens, parent)


def stack_images(images: Sequence[ProcessedImage]) -> dict[str, torch.Tensor]:
    """``pixel_values`` ``[N, 3, S, S]``, or ``[N, P, 3, S, S]`` with ``image_sizes`` for multi-crop."""
    if not images:
        return {}
    pix = [im.pixel_values for im in images]
    if pix[0].dim() == 4:  # anyres: [patches, 3, S, S]
        sizes = torch.tensor([im.image_size for im in images], dtype=torch.long)
        return {"pixel_values": stack_tiles(pix), "image_sizes": sizes}
    return {"pixel_values": torch.stack(pix)}


def _gather_plan(scored: list[list[list[tuple[int, int]]]]) -> dict[str, torch.Tensor]:
    """``scored[b][c]`` = [(flat index, target token), ...] -> padded ``[B, C, T]`` tensors and the ``[S]`` real slots."""
    b, c = len(scored), len(scored[0])
    t = max(len(s) for per in scored for s in per)
    index = torch.zeros(b, c, t, dtype=torch.long)
    target = torch.zeros(b, c, t, dtype=torch.long)
    mask = torch.zeros(b, c, t, dtype=torch.bool)
    for i, per in enumerate(scored):
        for j, pairs in enumerate(per):
            if pairs:
                idx, tgt = zip(*pairs)
                index[i, j, : len(idx)] = torch.tensor(idx)
                target[i, j, : len(tgt)] = torch.tensor(tgt)
                mask[i, j, : len(idx)] = True
    slot = torch.arange(mask.numel()).view(mask.shape)[mask]
    return {"logp_index": index, "logp_target": target, "logp_mask": mask,
            "scored_index": index.flatten()[slot], "scored_target": target.flatten()[slot], "scored_slot": slot}


def _count(ids: torch.Tensor, token: int) -> int:
    """Occurrences of ``token`` in ``ids``, counted here on the host so the forward need not read the device."""
    return int((ids == token).sum())


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _response_pairs(parent: _Placed, response: _Placed, ids: Sequence[int]) -> list[tuple[int, int]]:
    """(row position, token) scored for a response: token 0 is predicted at the parent's last position."""
    before = [parent.last] + list(range(response.start, response.last))
    return list(zip(before, ids))


_WINNER_FIRST = {"w": 0, "l": 1}


class PreferenceCollator:
    """Batches ``PreferenceExample``s for ``conditions``, packed as trees (default) or naive."""

    def __init__(self, conditions: Sequence[str], pad_token_id: int, image_token_id: int, packed: bool = True):
        self.conditions, self.packed = tuple(conditions), packed
        self.pad_token_id, self.image_token_id = pad_token_id, image_token_id

    def __call__(self, examples: list[PreferenceExample]) -> dict[str, torch.Tensor]:
        rows, scored = self._packed_rows(examples) if self.packed else self._naive_rows(examples)
        batch = {"input_ids": _pad([r.ids for r in rows], self.pad_token_id)}
        width = batch["input_ids"].shape[1]
        if self.packed:
            batch["position_ids"] = _pad([r.positions for r in rows], 0)
            batch["tree"] = TreeLayout.of_rows([row_chains(r.segments, width) for r in rows], width)
        else:
            batch["attention_mask"] = _pad([[1] * len(r.ids) for r in rows], 0).bool()
        batch.update(stack_images([im for r in rows for im in r.images]))
        batch["image_tokens"] = _count(batch["input_ids"], self.image_token_id)
        # scored positions are row-local: make them flat indices into the [R * L] hidden states
        batch.update(_gather_plan([[[(row * width + p, t) for p, t in pairs] for row, pairs in per] for per in scored]))
        batch["index"] = torch.tensor([e.index for e in examples], dtype=torch.long)
        batch["conditions"] = self.conditions
        return batch

    def _packed_rows(self, examples: list[PreferenceExample]):
        rows, scored = [], []
        for e in examples:
            pairs = {}
            # Depth first over image, context, response (winners first): parents precede children.
            keys = sorted({(k.image, k.context, k.response) for k in map(condition, self.conditions)},
                          key=lambda k: [_WINNER_FIRST[x] for x in k])
            for image, under_this_image in itertools.groupby(keys, key=lambda k: k[0]):  # one row per image
                row = _Row()
                under_image = row.add_image(e.image(image), self.image_token_id, row.add(e.prefix, None))
                questions = {}
                for m, c, y in under_this_image:
                    if c not in questions:
                        questions[c] = row.add(e.question(c), under_image)
                    response = row.add(e.response(y), questions[c])
                    pairs[Condition(c, m, y).name] = (len(rows), _response_pairs(questions[c], response, e.response(y)))
                rows.append(row)
            scored.append([pairs[name] for name in self.conditions])
        return rows, scored

    def _naive_rows(self, examples: list[PreferenceExample]):
        """One full sequence per condition, each with its own copy of the image (the published way)."""
        rows, scored = [], []
        for e in examples:
            per = []
            for k in map(condition, self.conditions):
                row = _Row()
                # Plain sequences: every segment is the child of the one before it.
                image = row.add_image(e.image(k.image), self.image_token_id, row.add(e.prefix, None))
                question = row.add(e.question(k.context), image)
                response = row.add(e.response(k.response), question)
                per.append((len(rows), _response_pairs(question, response, e.response(k.response))))
                rows.append(row)
            scored.append(per)
        return rows, scored


class SFTCollator:
    """Right-padded conversations; scored tokens are the label positions (answers and their EOS)."""

    def __init__(self, pad_token_id: int, image_token_id: int):
        self.pad_token_id, self.image_token_id = pad_token_id, image_token_id

    def __call__(self, examples: list[SFTExample]) -> dict[str, torch.Tensor]:
        rows, labels, images = [], [], []
        for e in examples:
            ids, lab = [], []
            for t, l in zip(e.input_ids, e.labels):
                if t == self.image_token_id and e.image is not None:
                    ids += [t] * e.image.num_tokens
                    lab += [IGNORE_INDEX] * e.image.num_tokens
                else:
                    ids.append(t)
                    lab.append(l)
            if e.image is not None:
                images.append(e.image)
            rows.append(ids)
            labels.append(lab)
        batch = {"input_ids": _pad(rows, self.pad_token_id)}
        width = batch["input_ids"].shape[1]
        batch["attention_mask"] = _pad([[1] * len(r) for r in rows], 0).bool()
        batch.update(stack_images(images))
        batch["image_tokens"] = _count(batch["input_ids"], self.image_token_id)
        scored = [[[(b * width + p - 1, t) for p, t in enumerate(lab) if t != IGNORE_INDEX and p > 0]]
                  for b, lab in enumerate(labels)]
        batch.update(_gather_plan(scored))
        batch["index"] = torch.tensor([e.index for e in examples], dtype=torch.long)
        batch["conditions"] = (SFT_CONDITION,)
        return batch
