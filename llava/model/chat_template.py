"""The Jinja chat template of a conversation ``Template``: ``apply_chat_template`` writes the training prompt.

A saved checkpoint carries the template of the ``--version`` that trained it, so plain transformers
(``processor.apply_chat_template(messages, add_generation_prompt=True)``) builds the same text the
toolkit's encoder trained on (``Template.human_text(image_question(q), first=True)``), and a
conversation with answers the same text as ``encode_conversation`` (answers closed by ``eos_token``
when the template closes them so).

The Jinja is generated from the ``Template``'s fields, never written by hand per template:

* a user message is ``first_human`` (first user turn, with the system prompt) or ``human``, its
  ``{message}`` being the image placeholders (``<image>\\n`` per image part, first, as LLaVA places
  them) followed by the text; a ``system`` message replaces the template's system prompt;
* when a human format ends with the assistant's role tag (``... ASSISTANT:``), that tag is the
  generation prompt: it is written after a user turn when an assistant message follows or when
  ``add_generation_prompt`` is set; otherwise the whole format is the user turn;
* an assistant message is ``answer``, then ``eos_token`` when ``answer_ends_with_eos``.
"""

from __future__ import annotations

import json
import string

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import Template


def _literal(text: str) -> str:
    # A JSON string is a valid Jinja string literal (its escapes are Python's).
    return json.dumps(text)


def _expression(fmt: str, fields: dict[str, str]) -> str:
    """A Jinja expression for ``fmt.format(**values)`` where ``fields`` maps each name to a Jinja variable."""
    parts = []
    for literal, name, spec, conversion in string.Formatter().parse(fmt):
        if literal:
            parts.append(_literal(literal))
        if name is not None:
            if name not in fields or spec or conversion:
                raise ValueError(f"template field {{{name}}} in {fmt!r} is not one of {sorted(fields)}")
            parts.append(fields[name])
    return " + ".join(parts) or '""'


def generation_prompt(template: Template) -> str:
    """The assistant's role tag that ends both human formats, or ``""`` when they do not end with one."""
    tag = f"{template.roles[1]}:" if template.roles[1] else ""
    if tag and template.first_human.endswith(tag) and template.human.endswith(tag):
        return tag
    return ""


def chat_template(template: Template) -> str:
    """The Jinja chat template that writes ``template``'s conversations."""
    tag = generation_prompt(template)
    first_user, later_user = template.first_human.removesuffix(tag), template.human.removesuffix(tag)
    fields = {"system": "ns.system", "message": "body"}
    image = _literal(DEFAULT_IMAGE_TOKEN)
    if template.image_only_prompt:  # `plain`: the human turn keeps only its image
        body = f"{{%- set body = {image} if (images > 0 or {image} in text) else '' -%}}"
    else:
        body = (f"{{%- if images > 0 -%}}{{%- set body = {_literal(DEFAULT_IMAGE_TOKEN + chr(10))} * images"
                f" + (text | replace({image}, '') | trim) -%}}"
                "{%- else -%}{%- set body = text -%}{%- endif -%}")
    eos = " + eos_token" if template.answer_ends_with_eos else ""
    return "".join([
        f"{{%- set ns = namespace(system={_literal(template.system)}, first=true) -%}}",
        "{%- for message in messages -%}",
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set images = 0 -%}",
        "{%- else -%}",
        "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}",
        "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}",
        "{%- endif -%}",
        "{%- if message['role'] == 'system' -%}{%- set ns.system = text -%}",
        "{%- elif message['role'] == 'user' -%}",
        body,
        f"{{%- if ns.first -%}}{{{{- {_expression(first_user, fields)} -}}}}",
        f"{{%- else -%}}{{{{- {_expression(later_user, fields)} -}}}}{{%- endif -%}}",
        "{%- set ns.first = false -%}",
        "{%- if not loop.last and messages[loop.index0 + 1]['role'] == 'assistant' -%}",
        f"{{{{- {_literal(tag)} -}}}}{{%- endif -%}}",
        "{%- elif message['role'] == 'assistant' -%}",
        f"{{{{- {_expression(template.answer, {'message': 'text'})}{eos} -}}}}",
        "{%- else -%}{{- raise_exception('unknown role: ' + message['role']) -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        f"{{%- if add_generation_prompt -%}}{{{{- {_literal(tag)} -}}}}{{%- endif -%}}",
    ])


def set_chat_template(processor, template: Template) -> None:
    """Give ``processor`` (and its tokenizer) ``template``'s chat template; both are saved with it."""
    text = chat_template(template)
    processor.chat_template = text
    processor.tokenizer.chat_template = text
