"""Alt-text for one image and the post it appears in, printed as one line.

    python -m llava.eval.alt_text --model_name PATH --image FILE [--context TEXT] [--model_base PATH]
        [--question_template TEMPLATE] [--conv_mode llava_v1] [--prompt_newline True] [--num_beams 3]
        [--temperature 0] [--max_new_tokens 256] [--image_aspect_ratio pad] [--dtype auto]

The question is written as the training data writes it: ``--question_template`` with ``{context}``
replaced by the post's text (default: the instruction, a newline, ``Context:``, a newline, the
context). The prompt and generation are those of ``mcmdpo_inference.py`` (same defaults), so the
printed text is what batch inference writes for the same record.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from llava.flags import FlagParser
from llava.eval.inference import (DEFAULTS, InferenceError, add_generation_args, add_model_args, check_model_path, image_processor_for,
                                  load_for_inference)

QUESTION_TEMPLATE = "Given an image and context, generate alt-text for the image.\nContext:\n{context}"


def question_for(context: str, template: str = QUESTION_TEMPLATE) -> str:
    """The training-format question for a post's ``context``."""
    if "{context}" not in template:
        raise InferenceError("--question_template must contain {context}")
    return template.replace("{context}", context)


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(description="Print the alt-text a LLaVA model writes for one image and its post.")
    add_model_args(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--context", default="", help="the text of the post the image appears in")
    p.add_argument("--question_template", default=QUESTION_TEMPLATE,
                   help="question with {context} where the context goes (default: the training format)")
    add_generation_args(p)
    return p


def alt_text(model, processor, image, question: str, *, conv_mode: str = DEFAULTS["conv_mode"],
             prompt_newline: bool = DEFAULTS["prompt_newline"], image_aspect_ratio: str = "pad", num_beams: int = 3,
             temperature: float = 0.0, top_p: float | None = None, max_new_tokens: int = 256) -> str:
    """The response of ``model`` to ``question`` about the PIL ``image``."""
    from llava.conversation import get_template
    from llava.eval.generate import build_prompt, generate

    images = image_processor_for(model, processor, image_aspect_ratio)
    prompt = build_prompt(processor.tokenizer, get_template(conv_mode), question, images(image.convert("RGB")),
                          prompt_newline)
    return generate(model, processor.tokenizer, [prompt], num_beams=num_beams, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens)[0]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from PIL import Image, UnidentifiedImageError

        question = question_for(args.context, args.question_template)
        check_model_path(args.model_name, args.model_base)
        try:
            with Image.open(args.image) as im:
                image = im.convert("RGB")
        except FileNotFoundError:
            raise InferenceError(f"image file not found: {args.image}")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise InferenceError(f"unreadable image {args.image} ({type(e).__name__}: {e})")
        model, processor, _ = load_for_inference(args.model_name, args.model_base, args.dtype, vision_tower=args.vision_tower)
        text = alt_text(model, processor, image, question, conv_mode=args.conv_mode, prompt_newline=args.prompt_newline,
                        image_aspect_ratio=args.image_aspect_ratio, num_beams=args.num_beams,
                        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    except InferenceError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None
    # one line: alt-text is a single paragraph
    sys.stdout.write(" ".join(text.split()) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    main()
