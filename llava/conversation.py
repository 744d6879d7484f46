"""Conversation templates (``--version`` / ``--conv_mode``) and the tokens they produce.

One ``Template`` describes how a turn is written; ``encode_conversation`` turns turns into
``input_ids`` and ``labels`` where only the answers and their closing end token are trained on.
``Conversation`` and ``conv_templates`` keep the interface of LLaVA's ``llava.conversation`` so
scripts written for LLaVA port unchanged; they render text through the same ``Template``.

The Vicuna v1 form (the default) of a single image turn::

    {system} USER: <image>\\n{question} ASSISTANT: {answer}</s>
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)


@dataclass(frozen=True)
class Template:
    """How one turn is written.

    A human turn is ``first_human`` (first turn, with the system prompt) or ``human`` (later turns),
    formatted with ``{system}`` and ``{message}``; an answer is ``answer`` formatted with ``{message}``,
    followed by the end-of-sequence token when ``answer_ends_with_eos``.
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

    def human_text(self, message: str, first: bool) -> str:
        if self.image_only_prompt:
            message = DEFAULT_IMAGE_TOKEN if DEFAULT_IMAGE_TOKEN in message else ""
        fmt = self.first_human if first else self.human
        return fmt.format(system=self.system, message=message)

    def answer_text(self, message: str) -> str:
        return self.answer.format(message=message)


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("v1", VICUNA_SYSTEM, ("USER", "ASSISTANT"), "{system} USER: {message} ASSISTANT:",
                 "USER: {message} ASSISTANT:", " {message}"),
        Template("plain", "", ("", ""), "{message}", "{message}", "{message}\n",
                 answer_ends_with_eos=False, image_only_prompt=True),
        Template("llava_llama_2", LLAMA_2_SYSTEM, ("USER", "ASSISTANT"),
                 "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{message} [/INST]", "[INST] {message} [/INST]", " {message} "),
        Template("mistral_instruct", "", ("USER", "ASSISTANT"), "[INST] {message} [/INST]", "[INST] {message} [/INST]",
                 " {message}"),
    )
}
ALIASES = {"vicuna_v1": "v1", "llava_v1": "v1", "llama_2": "llava_llama_2", "mistral": "mistral_instruct"}


def get_template(name: str) -> Template:
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES) + sorted(ALIASES)}")
    return TEMPLATES[key]


def image_question(question: str, has_image: bool = True) -> str:
    """The human message of an alt-text turn: the image first, as LLaVA places it."""
    question = question.replace(DEFAULT_IMAGE_TOKEN, "").strip()
    return f"{DEFAULT_IMAGE_TOKEN}\n{question}" if has_image else question


class LabelMaskError(ValueError):
    """A record whose labels are all masked: it would train on nothing."""


def encode_prompt(tokenizer, template: Template, message: str, first: bool = True) -> list[int]:
    """Token ids of one human turn (with BOS on the first), ``<image>`` kept as one token."""
    return tokenizer(template.human_text(message, first), add_special_tokens=first).input_ids


def encode_answer(tokenizer, template: Template, answer: str) -> list[int]:
    """Token ids of one answer, ending with the EOS id when the template closes answers with it."""
    ids = tokenizer(template.answer_text(answer), add_special_tokens=False).input_ids
    return ids + [tokenizer.eos_token_id] if template.answer_ends_with_eos else ids


def encode_conversation(
    tokenizer, template: Template, turns: Sequence[tuple[str, str]], record: str = "record"
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of ``(human, assistant)`` turns; labels are IGNORE_INDEX outside answers.

    Each piece is tokenized on its own, so the prompt of a turn has exactly the ids that inference
    builds for it. Raises ``LabelMaskError`` naming ``record`` when no answer token is left.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (human, assistant) in enumerate(turns):
        prompt = encode_prompt(tokenizer, template, human, first=i == 0)
        answer = encode_answer(tokenizer, template, assistant) if assistant.strip() else []
        input_ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
    if all(x == IGNORE_INDEX for x in labels):
        raise LabelMaskError(f"{record}: every label is masked (empty answer?): it would train on nothing")
    return input_ids, labels


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


_SEP_STYLE = {"v1": SeparatorStyle.TWO, "plain": SeparatorStyle.PLAIN, "llava_llama_2": SeparatorStyle.LLAMA_2,
              "mistral_instruct": SeparatorStyle.LLAMA_2}


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
        return self.template.name

    @property
    def sep_style(self) -> int:
        return _SEP_STYLE[self.template.name]

    @property
    def sep(self) -> str:
        return " " if self.template.name == "v1" else ""

    @property
    def sep2(self) -> str:
        return "</s>"

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return Conversation(self.template, copy.deepcopy(self.messages))

    def get_prompt(self) -> str:
        """The text of the conversation; a trailing ``None`` message leaves the assistant tag open."""
        text, first = "", True
        for i, (_, message) in enumerate(self.messages):
            if i % 2 == 0:
                if isinstance(message, tuple):  # LLaVA passes (text, image, mode) for gradio
                    message = message[0]
                text += self.template.human_text(message, first)
                first = False
            elif message is not None:
                text += self.template.answer_text(message) + ("</s>" if self.template.answer_ends_with_eos else "")
        return text

    def dict(self) -> dict:
        return {"template": dataclasses.asdict(self.template), "messages": self.messages}


conv_templates: dict[str, Conversation] = {name: Conversation(get_template(name)) for name in (*TEMPLATES, *ALIASES)}
conv_templates["default"] = conv_templates["v1"]
default_conversation = conv_templates["v1"]
