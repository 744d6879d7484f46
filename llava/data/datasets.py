"""Datasets: a record becomes token ids and processed images, ready for a collator.

``SFTDataset`` yields one conversation (labels on the answers only). ``PreferenceDataset`` yields,
per record, what the conditions (docs/method.md, "Conditions") need: the prompt prefix before the image, the images
``m_w`` (true) and ``m_l`` (corrupted), the question token ids of ``c_w`` (this record's) and
``c_l`` (another record's), and the responses ``y_w`` (chosen) and ``y_l`` (rejected).

Too long for ``--model_max_length``: image tokens are never cut; the question (instruction plus
context) is shortened word by word from its end until the longest branch fits. A record whose
answer alone does not fit is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava.conversation import Template, encode_conversation, image_question
from llava.data import negatives
from llava.data.images import ImageProcessor, ProcessedImage, open_image
from llava.data.records import DataError, DataProblem, Record
from llava.method import condition


def split_condition(ids: list[int], labels: list[int], image_token_id: int, record: Record) -> tuple[list[int], list[int], list[int]]:
    """``(prefix, question, response)`` of one condition's LLaVA sequence: before the image, after it up to
    the first trained token, and the trained tail (the answer and its ``</s>``)."""
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(positions) != 1:
        raise record.error("question", f"expected one {DEFAULT_IMAGE_TOKEN} in the prompt, found {len(positions)}")
    image, start = positions[0], next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    if start <= image or any(label == IGNORE_INDEX for label in labels[start:]):
        raise record.error("question", "the trained tokens are not one run after the image")
    return ids[:image], ids[image + 1:start], ids[start:]


def shorten_to_fit(fits: Callable[[str], bool], text: str, record: Record, field: str) -> str:
    """``text`` itself if it ``fits``, else its longest word prefix that does."""
    if fits(text):
        return text
    if not fits(""):
        raise record.error(field, f"does not fit in --model_max_length even with an empty {field}: the answer is too long")
    words = text.split(" ")
    lo, hi = 0, len(words) - 1  # words[:lo] fits, words[:hi + 1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(" ".join(words[:mid])):
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def check_image_fits(images: ImageProcessor, tokenizer, template: Template, max_length: int) -> None:
    """Refuse, before step 1, a ``--model_max_length`` that cannot hold the largest image with an empty
    question and answer (LLaVA-1.6's anyres tiling takes up to ~2,900 tokens): each record would
    otherwise fail on its own, blamed on its answer."""
    prompt, _ = encode_conversation(tokenizer, template, [(image_question(""), "x")], record="the prompt template")
    needed = images.most_tokens + len(prompt) - 1  # the <image> placeholder becomes the image's tokens
    if needed >= max_length:
        raise ValueError(
            f"--image_aspect_ratio {images.aspect_ratio}: one image can take {images.most_tokens} tokens, which with the "
            f"prompt leaves no room for text in --model_max_length {max_length}; set --model_max_length to at least "
            f"{needed} plus the longest question and answer (say {-(-(needed + 512) // 256) * 256}), or use "
            f"--image_aspect_ratio pad ({images.flat_tokens} tokens an image)")


# ---------------------------------------------------------------------------------------------
# SFT


@dataclass
class SFTExample:
    index: int
    input_ids: list[int]  # one image token where the image goes (expanded by the collator)
    labels: list[int]
    image: ProcessedImage | None


class SFTDataset(torch.utils.data.Dataset):
    """Conversations (LLaVA format) or alt-text records (trained on ``chosen``)."""

    def __init__(self, records: Sequence[Record], tokenizer, template: Template, images: ImageProcessor,
                 image_folder: str | None, max_length: int):
        self.records, self.tokenizer, self.template = records, tokenizer, template
        self.images, self.image_folder, self.max_length = images, image_folder, max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
        check_image_fits(images, tokenizer, template, max_length)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        """Rough lengths (words, plus 128 for an image), negative for text-only records."""
        out = []
        for r in self.records:
            words = sum(len(h.split()) + len(a.split()) for h, a in self.turns(r))
            out.append(words + 128 if r.image is not None else -words)
        return out

    def turns(self, r: Record) -> list[tuple[str, str]]:
        if r.turns is not None:
            turns = list(r.turns)
            if r.image is not None and DEFAULT_IMAGE_TOKEN not in turns[0][0]:
                turns[0] = (image_question(turns[0][0]), turns[0][1])
            return turns
        return [(image_question(r.question, r.image is not None), r.chosen)]

    def __getitem__(self, i: int) -> SFTExample:
        r = self.records[i]
        turns = self.turns(r)
        image = self.images(open_image(r, self.image_folder)) if r.image is not None else None
        extra = image.num_tokens - 1 if image is not None else 0
        where = f"{r.source}, record {r.number}"

        def encode(question: str) -> tuple[list[int], list[int]]:
            first = (image_question(question, image is not None), turns[0][1])
            return encode_conversation(self.tokenizer, self.template, [first, *turns[1:]], record=where)

        question = turns[0][0].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        fits = lambda q: len(encode(q)[0]) + extra <= self.max_length  # noqa: E731
        ids, labels = encode(shorten_to_fit(fits, question, r, "question"))
        return SFTExample(i, ids, labels, image)


# ---------------------------------------------------------------------------------------------
# Preference


@dataclass
class PreferenceExample:
    """What one record's conditions need; ``*_l`` entries are ``None`` where no condition uses them."""

    index: int
    prefix: list[int]  # prompt ids before the image
    image_w: ProcessedImage
    image_l: ProcessedImage | None
    question_w: list[int]  # ids after the image up to the assistant tag
    question_l: list[int] | None
    response_w: list[int]  # chosen answer ids + EOS
    response_l: list[int]  # rejected answer ids + EOS

    def image(self, which: str) -> ProcessedImage:
        return self.image_w if which == "w" else self.image_l

    def question(self, which: str) -> list[int]:
        return self.question_w if which == "w" else self.question_l

    def response(self, which: str) -> list[int]:
        return self.response_w if which == "w" else self.response_l


class PreferenceDataset(torch.utils.data.Dataset):
    def __init__(self, records: Sequence[Record], tokenizer, template: Template, images: ImageProcessor,
                 image_folder: str | None, max_length: int, conditions: Sequence[str], *,
                 image_type: str = "diffusion", diffusion_step: int = 700, seed: int = 42):
        self.records, self.tokenizer, self.template, self.images = records, tokenizer, template, images
        self.image_folder, self.max_length, self.conditions = image_folder, max_length, tuple(conditions)
        self.image_type, self.diffusion_step, self.seed = image_type, diffusion_step, seed
        self.image_token_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
        check_image_fits(images, tokenizer, template, max_length)
        factors = [condition(name) for name in self.conditions]
        self.needs_context_l = any(f.context == "l" for f in factors)
        self.needs_image_l = any(f.image == "l" for f in factors)
        negatives.alpha_bar(diffusion_step)  # validates the step
        needs_other = self.needs_context_l or (self.needs_image_l and image_type == "random")
        if needs_other and len(records) < 2:
            what = "context swapping" if self.needs_context_l else "--use_image_type random"
            src = records[0].source if records else "the data file"
            raise DataError(DataProblem(src, None, None, f"{what} needs at least two records; the file has {len(records)}"))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def modality_lengths(self) -> list[int]:
        return [len(r.question.split()) + len(r.chosen.split()) + len(r.rejected.split()) + 128 for r in self.records]

    def _segments(self, record: Record, question: str, answer: str) -> tuple[list[int], list[int], list[int]]:
        """``(prefix, question, response)`` ids of the condition (question, answer), as LLaVA tokenizes it."""
        where = f"{record.source}, record {record.number}"
        ids, labels = encode_conversation(self.tokenizer, self.template, [(image_question(question), answer)],
                                          record=where, image_token_id=self.image_token_id)
        return split_condition(ids, labels, self.image_token_id, record)

    def _question_and_responses(self, r: Record, question: str, budget: int) -> tuple[list[int], list[int], list[int]]:
        """Question ids (shortened to ``budget`` tokens if needed) and the two responses under it.

        Packing writes the question once for both responses, so its ids must not depend on the
        answer that follows; with a tokenizer that merges across the boundary, that is an error.
        """
        question = question.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        question = shorten_to_fit(lambda q: len(self._segments(r, q, r.chosen)[1]) <= budget, question, r, "question")
        _, question_w, response_w = self._segments(r, question, r.chosen)
        _, question_l, response_l = self._segments(r, question, r.rejected)
        if question_w != question_l:
            raise r.error("question", "the tokenizer joins the question and the answer into one token: the "
                                      "conditions cannot share the question")
        return question_w, response_w, response_l

    def __getitem__(self, i: int) -> PreferenceExample:
        r = self.records[i]
        image = open_image(r, self.image_folder)
        image_w = self.images(image)
        prefix, _, response_w = self._segments(r, r.question, r.chosen)
        _, _, response_l = self._segments(r, r.question, r.rejected)
        image_l = None
        if self.needs_image_l:
            image_l = negatives.corrupted_image(
                self.image_type, i, len(self.records), self.seed, image, image_w, self.images,
                lambda j: open_image(self.records[j], self.image_folder), self.diffusion_step,
            )
        n_img = max(image_w.num_tokens, image_l.num_tokens if image_l is not None else 0)
        budget = self.max_length - len(prefix) - n_img - max(len(response_w), len(response_l))
        question_w, response_w, response_l = self._question_and_responses(r, r.question, budget)
        question_l = None
        if self.needs_context_l:
            other = self.records[negatives.swapped_context_index(i, len(self.records), self.seed)]
            question_l, *responses = self._question_and_responses(r, other.question, budget)
            if responses != [response_w, response_l]:
                raise r.error("question", "the responses tokenize differently after the swapped context")
        return PreferenceExample(i, prefix, image_w, image_l, question_w, question_l, response_w, response_l)
