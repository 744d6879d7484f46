"""Conversation templates (``--version`` / ``--conv_mode``) and LLaVA's way of turning them into tokens.

Templates carry LLaVA's names and meanings (``llava/conversation.py`` of LLaVA 1.5/1.6):

* ``vicuna_v1`` (alias ``v1``, the training default: the released scripts pass ``--version v1``)::

      A chat between a curious user ... the user's questions. USER: <image>\\n{question} ASSISTANT: {answer}</s>

* ``llava_v1``: the same turns under the "human" wording ("a curious human ... the human's
  questions"); the released inference script prompts with it.
* ``plain`` (projector pre-training): ``<image>{caption}\\n``, no system prompt, no end token.
* ``llava_llama_2`` and ``mistral_instruct``: ``[INST] ... [/INST] {answer} </s>``.

Tokens are made the way LLaVA makes them, so that a Llama/Vicuna SentencePiece tokenizer gives the
released run's ids exactly (see docs/method.md, "Tokens"): the whole conversation is rendered as one
string, split at ``<image>``, each piece tokenized on its own (so the text after the image starts
with the word-boundary piece), and the labels are masked by LLaVA's round arithmetic (the lengths of
separately tokenized rounds, shifted by one in later rounds for non-``legacy`` tokenizers).
``Conversation`` and ``conv_templates`` keep LLaVA's interface so its scripts port unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Sequence

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX

logger = logging.getLogger(__name__)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
# LLaVA's end-of-round separator (``sep2``) for every template that closes answers.
END_OF_ANSWER = "</s>"

STYLES = ("two", "llama_2", "plain")  # LLaVA's SeparatorStyle: how rounds are written and masked


@dataclass(frozen=True)
class Template:
    """How one turn is written.

    A human turn is ``first_human`` (first turn, with the system prompt) or ``human`` (later turns),
    formatted with ``{system}`` and ``{message}``; an answer is ``answer`` formatted with ``{message}``,
    followed by ``</s>`` when ``answer_ends_with_eos``. ``style`` and ``answer_sep`` are what LLaVA's
    label masking splits a round with (``preprocess_v1`` / ``preprocess_llama_2`` / ``preprocess_plain``).
    """

    name: str
    system: str
    roles: tuple[str, str]
    first_human: str
    human: str
    answer: str
    answer_ends_with_eos: bool = True
    # `plain` (projector pre-training) keeps only the image of the human turn.
    image_only_prompt: bool = False
    style: str = "two"
    answer_sep: str = " ASSISTANT: "

    def human_text(self, message: str, first: bool) -> str:
        if self.image_only_prompt:
            message = DEFAULT_IMAGE_TOKEN if DEFAULT_IMAGE_TOKEN in message else ""
        fmt = self.first_human if first else self.human
        return fmt.format(system=self.system, message=message)

    def answer_text(self, message: str) -> str:
        return self.answer.format(message=message) + (END_OF_ANSWER if self.answer_ends_with_eos else "")

    def render(self, turns: Sequence[tuple[str, str | None]]) -> str:
        """The conversation as one string (LLaVA's ``get_prompt``); a ``None`` last answer leaves it open."""
        text = ""
        for i, (human, answer) in enumerate(turns):
            text += self.human_text(human, first=i == 0)
            if answer is not None:
                text += self.answer_text(answer)
        return text


def _vicuna(name: str, system: str) -> Template:
    return Template(name, system, ("USER", "ASSISTANT"), "{system} USER: {message} ASSISTANT:",
                    "USER: {message} ASSISTANT:", " {message}")


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        _vicuna("vicuna_v1", VICUNA_SYSTEM),
        _vicuna("llava_v1", LLAVA_V1_SYSTEM),
        Template("plain", "", ("", ""), "{message}", "{message}", "{message}\n",
                 answer_ends_with_eos=False, image_only_prompt=True, style="plain", answer_sep=""),
        # LLaVA writes later human turns after its `sep`: "<s>" for llava_llama_2, "" for mistral_instruct.
        Template("llava_llama_2", LLAMA_2_SYSTEM, ("USER", "ASSISTANT"),
                 "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{message} [/INST]", "<s>[INST] {message} [/INST]", " {message} ",
                 style="llama_2", answer_sep="[/INST] "),
        Template("mistral_instruct", "", ("USER", "ASSISTANT"), "[INST] {message} [/INST]", "[INST] {message} [/INST]",
                 " {message} ", style="llama_2", answer_sep="[/INST] "),
    )
}
ALIASES = {"v1": "vicuna_v1"}
TEMPLATE_NAMES = (*TEMPLATES, *ALIASES)


def get_template(name: str) -> Template:
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATE_NAMES)}")
    return TEMPLATES[key]


def image_question(question: str, has_image: bool = True) -> str:
    """The human message of a training turn: LLaVA's ``preprocess_multimodal`` (image first, question stripped)."""
    question = question.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    return f"{DEFAULT_IMAGE_TOKEN}\n{question}" if has_image else question


def inference_question(question: str, has_image: bool = True, trailing_newline: bool = True) -> str:
    """The human message the released inference script sends: ``<image>\\n{question}\\n``, the question as is."""
    message = f"{question}\n" if trailing_newline else question
    return f"{DEFAULT_IMAGE_TOKEN}\n{message}" if has_image else message


class LabelMaskError(ValueError):
    """A record whose labels are all masked, or whose tokens LLaVA's round arithmetic does not cover."""


def image_token_id_of(tokenizer) -> int:
    """The id that stands for one image in this package's sequences (the tokenizer's ``<image>``)."""
    return tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)


def tokenize_with_images(tokenizer, text: str, image_token_id: int) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: ``text`` split at ``<image>``, each piece tokenized on its own.

    Every piece is tokenized as a fresh string (so a Llama tokenizer starts it with a word-boundary
    piece), one ``image_token_id`` stands between pieces, and when the tokenizer opens the first piece
    with BOS the first id of every later piece is dropped (its BOS).
    """
    pieces = [tokenizer(piece).input_ids for piece in text.split(DEFAULT_IMAGE_TOKEN)]
    opens_with_bos = bool(pieces[0]) and pieces[0][0] == tokenizer.bos_token_id
    ids = list(pieces[0])
    for piece in pieces[1:]:
        ids.append(image_token_id)
        ids.extend(piece[1:] if opens_with_bos else piece)
    return ids


def is_legacy(tokenizer) -> bool:
    """The Llama tokenizer's ``legacy`` setting: does text after a special token get a word-boundary piece?

    Read from the tokenizer where it has the attribute (as LLaVA reads it); otherwise observed.
    """
    legacy = getattr(tokenizer, "legacy", None)
    if legacy is not None:
        return bool(legacy)
    eos = tokenizer.eos_token or END_OF_ANSWER
    after = tokenizer.convert_ids_to_tokens(tokenizer(f"a{eos}b", add_special_tokens=False).input_ids)[-1]
    return after.startswith("\u2581")


def keep_legacy_on_save(tokenizer) -> None:
    """Make ``save_pretrained`` write the tokenizer's ``legacy`` setting.

    transformers 5 saves a Llama tokenizer with ``"legacy": null`` and rebuilds it on load as
    non-legacy, whatever its ``tokenizer.json`` says: a legacy Vicuna tokenizer would change its
    tokens after the first checkpoint. Recording the value keeps it across saves.
    """
    legacy = getattr(tokenizer, "legacy", None)
    if legacy is not None:
        tokenizer.init_kwargs["legacy"] = bool(legacy)


def mask_labels(tokenizer, template: Template, text: str, ids: list[int], image_token_id: int) -> list[int] | None:
    """Labels of ``ids`` (the tokens of ``text``) masked as LLaVA's ``preprocess_*`` masks them.

    LLaVA does not locate the answers in the token sequence: it splits the text into rounds at
    ``</s>`` and each round at the assistant tag, tokenizes those pieces on their own and masks by
    their lengths (minus 2 for the BOS and the word-boundary piece a trailing space becomes; minus 1
    more in later rounds for non-``legacy`` tokenizers, which is right for Vicuna's vocabulary).
    ``None`` where the lengths do not add up to the sequence ("tokenization mismatch": LLaVA then
    trains on nothing).
    """
    count = lambda s: len(tokenize_with_images(tokenizer, s, image_token_id))  # noqa: E731
    labels = list(ids)
    if template.style == "plain":
        cut = count(DEFAULT_IMAGE_TOKEN)
        labels[:cut] = [IGNORE_INDEX] * min(cut, len(labels))
        return labels
    shift_later_rounds = template.style == "two" and not is_legacy(tokenizer)
    cur = 1
    labels[:1] = [IGNORE_INDEX]
    for i, round_text in enumerate(text.split(END_OF_ANSWER)):
        if round_text == "":
            break
        parts = round_text.split(template.answer_sep)
        if len(parts) != 2:
            break
        round_len = count(round_text)
        instruction_len = count(parts[0] + template.answer_sep) - 2
        if i != 0 and shift_later_rounds:
            round_len -= 1
            instruction_len -= 1
        end = min(cur + instruction_len, len(labels))
        labels[cur:end] = [IGNORE_INDEX] * max(end - cur, 0)
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * max(len(labels) - cur, 0)
    return labels if cur == len(ids) else None


def mask_by_prefixes(tokenizer, template: Template, turns: Sequence[tuple[str, str]], ids: list[int],
                     image_token_id: int, record: str) -> list[int]:
    """Labels of ``ids`` found from the tokens of each turn's own prefix of the text (exact boundaries).

    Answer ``k`` spans from the length of the tokens of "turns before it + its open prompt" to the
    length of the tokens of "turns up to it"; each must be a prefix of ``ids``.
    """
    labels = [IGNORE_INDEX] * len(ids)
    for k in range(len(turns)):
        start = len(tokenize_with_images(tokenizer, template.render([*turns[:k], (turns[k][0], None)]), image_token_id))
        upto = tokenize_with_images(tokenizer, template.render(turns[:k + 1]), image_token_id)
        if ids[:len(upto)] != upto or start > len(upto):
            raise LabelMaskError(f"{record}: the tokens of turn {k + 1} depend on what follows it: its answer cannot be located")
        labels[start:len(upto)] = upto[start:]
    return labels


def encode_conversation(
    tokenizer, template: Template, turns: Sequence[tuple[str, str]], record: str = "record",
    image_token_id: int | None = None,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of ``(human, assistant)`` turns, as LLaVA's ``preprocess`` builds them.

    ``<image>`` becomes one ``image_token_id`` (default: the tokenizer's ``<image>`` id); labels are
    ``IGNORE_INDEX`` outside the answers and their closing ``</s>``. Raises ``LabelMaskError`` naming
    ``record`` when an answer is empty or cannot be located.
    """
    if image_token_id is None:
        image_token_id = image_token_id_of(tokenizer)
    if any(not answer.strip() for _, answer in turns):
        raise LabelMaskError(f"{record}: every label is masked (empty answer?): it would train on nothing")
    text = template.render(turns)
    ids = tokenize_with_images(tokenizer, text, image_token_id)
    labels = mask_labels(tokenizer, template, text, ids, image_token_id)
    if labels is None:
        # LLaVA's arithmetic assumes Vicuna's vocabulary; with another one it can miss by a token,
        # and LLaVA then silently trains on nothing. Locate the answers exactly instead, and say so.
        _warn_mismatch_once(record)
        labels = mask_by_prefixes(tokenizer, template, turns, ids, image_token_id, record)
    if all(x == IGNORE_INDEX for x in labels):
        raise LabelMaskError(f"{record}: every label is masked (empty answer?): it would train on nothing")
    return ids, labels


_warned_mismatch = False


def _warn_mismatch_once(record: str) -> None:
    global _warned_mismatch
    if not _warned_mismatch:
        _warned_mismatch = True
        logger.warning("%s: LLaVA's label arithmetic does not fit this tokenizer (\"tokenization mismatch\": LLaVA "
                       "would train on nothing); masking by exact answer boundaries instead (said once)", record)


def encode_prompt(tokenizer, template: Template, message: str, image_token_id: int | None = None) -> list[int]:
    """Token ids of an open first turn (the assistant tag last), as the inference script tokenizes it."""
    if image_token_id is None:
        image_token_id = image_token_id_of(tokenizer)
    return tokenize_with_images(tokenizer, template.render([(message, None)]), image_token_id)


VICUNA_V1_CHAT_TEMPLATE = (
    "{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}"
    "{{- system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set images = 0 -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' + ('<image>\n' * images) + text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + text + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------
# LLaVA-compatible interface: ``conv_templates[name].copy()``, ``append_message``, ``get_prompt``.


class SeparatorStyle:
    """Names kept for scripts that compare ``conv.sep_style``; rendering is done by ``Template``."""

    SINGLE, TWO, MPT, PLAIN, LLAMA_2 = range(5)


_SEP_STYLE = {"two": SeparatorStyle.TWO, "plain": SeparatorStyle.PLAIN, "llama_2": SeparatorStyle.LLAMA_2}
_SEP = {"vicuna_v1": " ", "llava_v1": " ", "plain": "\n", "llava_llama_2": "<s>", "mistral_instruct": ""}
_VERSION = {"vicuna_v1": "v1", "llava_v1": "v1", "llava_llama_2": "llama_v2", "mistral_instruct": "llama_v2"}


@dataclass
class Conversation:
    template: Template
    messages: list[list] = field(default_factory=list)

    @property
    def system(self) -> str:
        return self.template.system

    @property
    def roles(self) -> tuple[str, str]:
        return self.template.roles

    @property
    def version(self) -> str:
        return _VERSION.get(self.template.name, self.template.name)

    @property
    def sep_style(self) -> int:
        return _SEP_STYLE[self.template.style]

    @property
    def sep(self) -> str:
        return _SEP[self.template.name]

    @property
    def sep2(self) -> str:
        return "\n" if self.template.style == "plain" else END_OF_ANSWER

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return Conversation(self.template, copy.deepcopy(self.messages))

    def get_prompt(self) -> str:
        """The text of the conversation; a trailing ``None`` message leaves the assistant tag open."""
        texts = [m[0] if isinstance(m, tuple) else m for _, m in self.messages]  # LLaVA's gradio passes tuples
        turns = [(texts[i], texts[i + 1] if i + 1 < len(texts) else None) for i in range(0, len(texts), 2)]
        return self.template.render(turns)

    def dict(self) -> dict:
        return {"template": dataclasses.asdict(self.template), "messages": self.messages}


conv_templates: dict[str, Conversation] = {name: Conversation(get_template(name)) for name in TEMPLATE_NAMES}
conv_templates["default"] = conv_templates["vicuna_v1"]
default_conversation = conv_templates["vicuna_v1"]
