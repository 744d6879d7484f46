"""Answers that cannot fit ``--model_max_length``: found before the model loads, from the processor alone.

The datasets shorten a record's question until its sequence fits (``llava.data.datasets``); an answer
too long to fit even under an empty question would stop training at the step that meets it. This
check runs the same encoding with an empty question over every record before step 1 (training) and in
``llava-check --model_name_or_path``. The image's tokens are those of one view
(``ImageProcessor.flat_tokens``): exact for ``pad`` and ``square``, a lower bound for ``anyres`` tiles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from llava.conversation import encode_conversation, get_template, image_question
from llava.data.images import ImageProcessor
from llava.data.records import DataProblem, Record


def early_processor(model_path: str | Path, vision_tower: str | Path | None = None):
    """The processor of a LLaVA checkpoint, built without its weights: an HF-format directory's own, an
    original-format one's from its config, tokenizer and CLIP settings, a LoRA adapter's base's. None for
    a model still to be composed from parts (its processor comes with the composition)."""
    from llava.model.load import checkpoint_kind, lora_base

    if not Path(model_path).is_dir():
        return None
    kind = checkpoint_kind(model_path)
    if kind == "lora":
        return early_processor(lora_base(Path(model_path)), vision_tower)
    if kind == "original":
        from llava.model.original_layout import original_processor

        return original_processor(model_path, vision_tower)
    if kind != "hf":
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_path)


def too_long(records: Sequence[Record], processor, version: str, aspect_ratio: str, max_length: int,
             strategy: str = "default") -> list[DataProblem]:
    """One problem per record whose answer (the longer one of a preference pair) cannot fit ``max_length``."""
    tokenizer, template = processor.tokenizer, get_template(version)
    image_tokens = ImageProcessor(processor, aspect_ratio, strategy).flat_tokens
    problems = []
    for r in records:
        extra = image_tokens - 1 if r.image is not None else 0  # the placeholder is one id of the encoding
        if r.turns is not None:
            turns = [(image_question("", r.image is not None), r.turns[0][1]), *r.turns[1:]]
            answers = [("conversations", turns)]
        else:
            answers = [(name, [(image_question("", r.image is not None), text)])
                       for name, text in (("chosen", r.chosen), ("rejected", r.rejected)) if isinstance(text, str)]
        for name, turns in answers:
            n = len(encode_conversation(tokenizer, template, turns, record=f"{r.source}, record {r.number}")[0]) + extra
            if n > max_length:
                problems.append(DataProblem(r.source, r.number, name, f"the answer cannot fit --model_max_length "
                                            f"{max_length}: {n} tokens with the image's {image_tokens} and an empty "
                                            "question", r.line))
    return problems
