"""Batched generation for LLaVA: prompts built as the released inference script builds them, left-padded.

A prompt is the open first turn of a :mod:`llava.conversation` template (``encode_prompt`` on
``inference_question(question)``: ``<image>\n{question}\n`` by default, LLaVA's tokenization) with its
single ``<image>`` id expanded to the image's token count. A batch is left-padded with the
tokenizer's pad id, embedded with :func:`llava.model.forward.embed` (image features written over
the image tokens; LLaVA-NeXT's single padded view and its multi-crop both work) and handed to
``model.generate(inputs_embeds=...)``.

Position ids: with left padding every row must count positions from its first real token.
``generate`` in transformers 5.24 derives them from the attention mask (``cumsum - 1``) for
``inputs_embeds`` too, and extends them by one per step; we pass the same ids explicitly so
that the result does not depend on that inference (the batch-size-equivalence tests check
greedy and beam search against batch size 1).

Beam search: ``generate`` copies each prompt ``num_beams`` times *before* its first forward, so the
prompt (~600-1000 tokens with the image, all beams identical) would be run ``num_beams`` times,
and its default cache copies the whole prompt's keys and values twice per new token (to append,
and to reorder the beams). We run the prompt once per record instead (``prompt_cache``: every
position but the last, through the language model without its head) and hand ``generate`` that
cache repeated for each beam, in a layer (``SharedPromptLayer``) that appends in place and reorders
only the generated positions; ``generate`` then runs the last prompt position and the new tokens.
Each beam's copy of the prompt is the same numbers, so the beams and outputs do not change:
tests/test_inference.py checks them against ``generate``'s own prefill and cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import Template, encode_prompt, inference_question
from llava.data.collate import stack_images
from llava.data.images import ProcessedImage
from llava.model.forward import embed, unwrap

_ASSISTANT_PREFIX = re.compile(r"^\s*(?:assistant|ASSISTANT|Assistant)\s*:\s*")


def strip_response(text: str) -> str:
    """The answer without surrounding whitespace and a leading ``ASSISTANT:`` / ``Assistant:`` tag."""
    text = text.strip()
    while True:
        stripped = _ASSISTANT_PREFIX.sub("", text, count=1)
        if stripped == text:
            return text.strip()
        text = stripped


@dataclass(frozen=True)
class Prompt:
    """Token ids of one prompt with its image tokens expanded, and the processed image."""

    input_ids: list[int]
    image: ProcessedImage | None


def prompt_ids(tokenizer, template: Template, question: str, trailing_newline: bool = True) -> list[int]:
    """The open first turn (with BOS and one ``<image>`` id), tokenized as the released inference does."""
    return encode_prompt(tokenizer, template, inference_question(question, True, trailing_newline))


def build_prompt(tokenizer, template: Template, question: str, image: ProcessedImage | None,
                 trailing_newline: bool = True) -> Prompt:
    """A ``Prompt`` for ``question`` about ``image``: the ``<image>`` id repeated ``num_tokens`` times."""
    if image is None:
        return Prompt(encode_prompt(tokenizer, template, inference_question(question, False, trailing_newline)), None)
    image_token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    ids = prompt_ids(tokenizer, template, question, trailing_newline)
    slots = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(slots) != 1:
        raise ValueError(f"expected one {DEFAULT_IMAGE_TOKEN} token in the prompt, found {len(slots)}")
    k = slots[0]
    return Prompt(ids[:k] + [image_token_id] * image.num_tokens + ids[k + 1:], image)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` of left-padded rows; positions start at 0 per row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


class SharedPromptLayer(DynamicLayer):
    """One layer's keys and values during beam search, the first ``shared`` positions being the prompt,
    the same in every beam of a record.

    ``DynamicLayer`` (what ``generate`` uses by default) concatenates the whole cache at every new token
    and copies it again to reorder the beams: per step, two copies of ``rows x prompt length`` keys
    and values, which on a CPU cost more than the model's own arithmetic. Here the cache lives in a
    buffer with room for the new tokens (written in place) and a reorder moves only the positions
    after the prompt: a beam's prompt is its record's prompt, whichever beam it descends from.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int, beams: int = 1):
        """``keys``, ``values``: ``[records, heads, prompt, dim]``, each record's written once into each of
        its ``beams`` rows (``repeat_interleave``'s order, the one ``generate`` gives a batch's beams)
        straight into the buffer: no repeated copy is made first."""
        super().__init__()
        self.device, self.shared, self.length = keys.device, keys.shape[-2], keys.shape[-2]
        self._keys = self._buffer(keys, beams, room)
        self._values = self._buffer(values, beams, room)
        self.is_initialized = True
        self._expose()

    def _buffer(self, prompt: torch.Tensor, beams: int, room: int) -> torch.Tensor:
        records, heads, _, dim = prompt.shape
        buffer = prompt.new_empty(records * beams, heads, self.shared + room, dim)
        buffer.view(records, beams, heads, -1, dim)[:, :, :, :self.shared] = prompt.unsqueeze(1)
        return buffer

    def _expose(self) -> None:
        self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # more tokens than planned for: grow (not reached by generate_ids)
            self._keys, self._values = _grown(self._keys, end + 64), _grown(self._values, end + 64)
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length > self.shared:
            idx, new = beam_idx.to(self.device), slice(self.shared, self.length)
            self._keys[:, :, new] = self._keys[:, :, new].index_select(0, idx)
            self._values[:, :, new] = self._values[:, :, new].index_select(0, idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SharedPromptLayer serves beam search only")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("SharedPromptLayer serves beam search only")


def _grown(buffer: torch.Tensor, length: int) -> torch.Tensor:
    """``buffer`` with room for ``length`` positions (dimension -2), its contents kept."""
    more = buffer.new_empty(*buffer.shape[:2], length - buffer.shape[-2], buffer.shape[-1])
    return torch.cat([buffer, more], dim=-2)


def prompt_cache(model, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, beams: int,
                 room: int) -> Cache:
    """The language model's key/value cache of every prompt position but the last, computed once per
    record and repeated for its ``beams`` beams (``repeat_interleave``: the row order ``generate``
    gives a batch's beams), with ``room`` positions to spare for the tokens to come."""
    llava = unwrap(model)
    computed = DynamicCache(config=llava.config.get_text_config())
    llava.model.language_model(inputs_embeds=embeds[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                               cache=computed, use_cache=True)
    return Cache(layers=[SharedPromptLayer(layer.keys, layer.values, room, beams) for layer in computed.layers])


def model_device(model) -> torch.device:
    return unwrap(model).get_input_embeddings().weight.device


@torch.inference_mode()
def generate_ids(model, prompts: Sequence[Prompt], *, pad_token_id: int, eos_token_id: int | Sequence[int] | None,
                 num_beams: int = 3, temperature: float = 0.0, top_p: float | None = None,
                 max_new_tokens: int = 256, shared_prompt: bool = True) -> list[list[int]]:
    """The new token ids of each prompt (prompt ids excluded, trailing padding removed).

    ``shared_prompt``: with beams, run each prompt once and share its cache between the beams
    (``prompt_cache``); False leaves the prompt to ``generate``, which runs it once per beam.
    """
    if not prompts:
        return []
    device = model_device(model)
    ids, mask, positions = left_pad([p.input_ids for p in prompts], pad_token_id)
    images = [p.image for p in prompts if p.image is not None]
    tensors = stack_images(images)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    image_id = unwrap(model).config.image_token_id
    embeds = embed(model, ids, tensors["pixel_values"].to(device) if tensors else None,
                   tensors["image_sizes"].to(device) if "image_sizes" in tensors else None,
                   image_tokens=sum(p.input_ids.count(image_id) for p in prompts))  # counted here, not on the device
    kwargs = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, use_cache=True)
    if shared_prompt and num_beams > 1 and ids.shape[1] > 1:
        kwargs["cache"] = prompt_cache(model, embeds, mask, positions, num_beams, max_new_tokens + 1)
    if eos_token_id is not None:
        kwargs["eos_token_id"] = eos_token_id
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature)
        if top_p is not None:
            kwargs["top_p"] = top_p
    else:
        # greedy / beam search; neutralise sampling settings a checkpoint's generation_config may carry
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = unwrap(model).generate(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs)
    # With inputs_embeds only, generate returns the new tokens only; be safe if a version prepends the prompt.
    if out.shape[1] > max_new_tokens:
        out = out[:, -max_new_tokens:]
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    result = []
    for row in out.tolist():
        new = []
        for t in row:
            if t in eos:
                break
            new.append(t)
        while new and new[-1] == pad_token_id:
            new.pop()
        result.append(new)
    return result


def generate(model, tokenizer, prompts: Sequence[Prompt], *, num_beams: int = 3, temperature: float = 0.0,
             top_p: float | None = None, max_new_tokens: int = 256) -> list[str]:
    """Responses (decoded, special tokens skipped, ``ASSISTANT:`` stripped) to ``prompts``, in order."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    eos = unwrap(model).generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    new = generate_ids(model, prompts, pad_token_id=pad, eos_token_id=eos, num_beams=num_beams,
                       temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    return [strip_response(tokenizer.decode(t, skip_special_tokens=True)) for t in new]
