"""What the model is trained on (or prompted with) for one record, token by token.

    python -m llava.data.show FILE --model DIR [--vision_tower CLIP_DIR] [--image_folder DIR]
        [--task sft|preference|test] [--index N | --all] [--json] [--version v1] [--use_image_type diffusion] [--seed 42]

The ids come from the same datasets training and inference use, with the tokenizer and image processor
training builds for ``--model`` (``training_processor``), so what this prints is what a run sees. Text form: each condition's prompt and answer decoded, the trained part between ``[[`` and
``]]``. ``--json``: ``{"<condition>": {"input_ids": [...], "labels": [...]}}`` with conditions ``sft``,
the eight conditions of a preference record (``llava.method``), or ``prompt`` for a test record; the
image is the single id -200 where LLaVA places it (``IMAGE_TOKEN_INDEX``) and masked labels are -100.
``--all`` prints one such object per line for every record.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from llava.flags import FlagParser
from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import TEMPLATE_NAMES, get_template
from llava.data.datasets import PreferenceDataset, SFTDataset
from llava.data.images import ImageProcessor
from llava.data.records import DataError, DataProblem, read_records
from llava.method import CONDITION_NAMES, SFT_CONDITION, condition

Sequences = dict[str, dict[str, list[int]]]


def _llava_ids(ids: list[int], image_token_id: int) -> list[int]:
    return [IMAGE_TOKEN_INDEX if t == image_token_id else t for t in ids]


def sft_sequences(dataset: SFTDataset, index: int) -> Sequences:
    example = dataset[index]
    return {SFT_CONDITION: {"input_ids": _llava_ids(example.input_ids, dataset.image_token_id), "labels": list(example.labels)}}


def preference_sequences(dataset: PreferenceDataset, index: int) -> Sequences:
    """The eight conditions of record ``index``, each as one LLaVA sequence (what the naive forward runs)."""
    e = dataset[index]
    out = {}
    for name in dataset.conditions:
        k = condition(name)
        answer = e.response(k.response)
        ids = e.prefix + [IMAGE_TOKEN_INDEX] + e.question(k.context) + answer
        out[name] = {"input_ids": ids, "labels": [IGNORE_INDEX] * (len(ids) - len(answer)) + answer}
    return out


def sequences_of(dataset: SFTDataset | PreferenceDataset, index: int) -> Sequences:
    """Record ``index`` of a training dataset as the sequences a run trains on."""
    if isinstance(dataset, PreferenceDataset):
        return preference_sequences(dataset, index)
    return sft_sequences(dataset, index)


def prompt_sequences(tokenizer, template_name: str, question: str, trailing_newline: bool) -> Sequences:
    from llava.conversation import encode_prompt, image_token_id_of, inference_question

    ids = encode_prompt(tokenizer, get_template(template_name), inference_question(question, True, trailing_newline))
    return {"prompt": {"input_ids": _llava_ids(ids, image_token_id_of(tokenizer)), "labels": [IGNORE_INDEX] * len(ids)}}


def _decode_runs(tokenizer, ids: list[int], trained: list[bool]) -> str:
    """``ids`` (no image) decoded, runs of trained tokens between ``[[`` and ``]]``.

    Each run is the difference of two decodes of a growing prefix, so the spaces and multi-byte
    characters that straddle token boundaries come out as the whole sequence decodes them.
    """
    text, done = "", ""
    for start, end in _runs(trained):
        upto = tokenizer.decode(ids[:end])
        piece = upto[len(done):]
        text += f"[[{piece}]]" if trained[start] else piece
        done = upto
    return text


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    bounds = [0] + [i for i in range(1, len(flags)) if flags[i] != flags[i - 1]] + [len(flags)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def render_text(tokenizer, sequences: Sequences) -> str:
    """Each sequence decoded, ``<image>`` where the image goes, the trained tokens between ``[[`` and ``]]``."""
    lines = []
    for name, seq in sequences.items():
        ids, labels = seq["input_ids"], seq["labels"]
        cut = [-1] + [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX] + [len(ids)]
        pieces = [_decode_runs(tokenizer, ids[a + 1:b], [x != IGNORE_INDEX for x in labels[a + 1:b]])
                  for a, b in zip(cut, cut[1:])]
        lines.append(f"--- {name} ({len(ids)} tokens, {sum(x != IGNORE_INDEX for x in labels)} trained)\n"
                     + DEFAULT_IMAGE_TOKEN.join(pieces))
    return "\n".join(lines)


def training_processor(model: str, vision_tower: str | None = None, select_feature: str = "patch"):
    """The processor (tokenizer and image settings) a run builds for ``--model_name_or_path``.

    An HF-format directory (or a LoRA adapter over one) is read without its weights; an original-format
    checkpoint and a language model composed with ``--vision_tower`` are built as training builds them
    (``llava.model.load``), which reads the weights too.
    """
    from llava.model.load import checkpoint_kind, compose, load_model, lora_base, resolve
    from llava.model.tokenizer import load_processor

    path = resolve(model)
    kind = checkpoint_kind(path)
    if kind == "hf":
        return load_processor(path)
    if kind == "lora":
        own = (path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file()
        return load_processor(path) if own else training_processor(str(lora_base(path)), vision_tower, select_feature)
    if kind == "causal_lm":
        if not vision_tower:
            raise ValueError(f"{path} is a plain language model: give the CLIP directory training composes it with "
                             "(--vision_tower)")
        return compose(path, vision_tower, select_feature=select_feature)[1]
    return load_model(path, vision_tower=vision_tower)[1]


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(description="Print what the model is trained on (or prompted with) for a record.")
    # Named as in training (--data_path, --model_name_or_path); the positional file and --model still work.
    p.add_argument("file", nargs="?", help="data file (any format llava.data.records reads)")
    p.add_argument("--data_path", default=None, help="the data file, named as in training")
    p.add_argument("--model_name_or_path", "--model", dest="model", required=True,
                   help="model directory (its tokenizer and image processor are used)")
    p.add_argument("--vision_tower", default=None,
                   help="as in training: the CLIP directory of a composed model, or the tower of an original checkpoint")
    p.add_argument("--mm_vision_select_feature", default="patch", choices=["patch", "cls_patch"],
                   help="as in training, for a composed model (cls_patch: one image token more)")
    p.add_argument("--image_folder", default=None, help="folder image paths are relative to")
    p.add_argument("--task", default="preference", choices=["sft", "preference", "test"])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, default=0, help="record number, from 0 (default 0)")
    which.add_argument("--all", action="store_true", help="every record (with --json: one object per line)")
    p.add_argument("--json", action="store_true", help="ids and labels as JSON instead of text")
    p.add_argument("--version", default=None, choices=TEMPLATE_NAMES,
                   help="template (default: v1 for sft/preference, as training; llava_v1 for test, as inference)")
    p.add_argument("--prompt_newline", default="True", choices=["True", "False"], help="test: the released trailing newline")
    p.add_argument("--image_aspect_ratio", default="pad", choices=["pad", "square", "anyres"])
    p.add_argument("--model_max_length", type=int, default=2048)
    p.add_argument("--use_image_type", default="diffusion")
    p.add_argument("--diffusion_step", type=int, default=700)
    p.add_argument("--seed", type=int, default=42, help="the run's --negatives_seed (default --seed's default, 42)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.file is None) == (args.data_path is None):
        parser.error("give the data file once: FILE or --data_path FILE")
    args.file = args.file or args.data_path
    try:
        records = read_records(args.file, args.task)
        processor = training_processor(args.model, args.vision_tower, args.mm_vision_select_feature)
        tok = processor.tokenizer
        indices = range(len(records)) if args.all else [args.index]
        if not args.all and not 0 <= args.index < len(records):
            raise DataError(DataProblem(args.file, None, None, f"--index {args.index} is out of range: the file has "
                                                                f"{len(records)} records"))
        if args.task == "test":
            version = args.version or "llava_v1"
            build = lambda i: prompt_sequences(tok, version, records[i].question, args.prompt_newline == "True")  # noqa: E731
        else:
            template = get_template(args.version or "v1")
            images = ImageProcessor.of(processor, args.image_aspect_ratio)
            if args.task == "sft":
                dataset = SFTDataset(records, tok, template, images, args.image_folder, args.model_max_length)
            else:
                dataset = PreferenceDataset(records, tok, template, images, args.image_folder, args.model_max_length,
                                            CONDITION_NAMES, image_type=args.use_image_type,
                                            diffusion_step=args.diffusion_step, seed=args.seed)
            build = lambda i: sequences_of(dataset, i)  # noqa: E731
        for i in indices:
            sequences = build(i)
            if args.json:
                sys.stdout.write(json.dumps(sequences) + "\n")
            else:
                sys.stdout.write(f"=== {args.file}, record {i}\n{render_text(tok, sequences)}\n")
    except (DataError, ValueError, OSError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
