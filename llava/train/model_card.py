"""What a saved model directory carries to be publishable: a model card and the released decoding.

``CardFacts`` is what the run knows before its first step (base model, stage and method, data files
and their record counts, the command line); ``render_card`` adds the training metrics logged so far
and says how to load the model in plain transformers and how to run this toolkit's inference.
``write_model_card`` writes it as ``README.md`` into a checkpoint or the final model directory.
``release_generation_config`` is the decoding of the released evaluation (``mcmdpo_inference.py``'s
defaults: beam search with 3 beams, no sampling, 256 new tokens), saved as ``generation_config.json``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from llava.constants import INFERENCE_DEFAULTS
from llava.method import CHOSEN, TERMS

CARD_NAME = "README.md"
TRAINING_METRICS = ("loss", "rewards/", "mcm/", "grad_norm", "learning_rate", "epoch")


def release_generation_config(tokenizer):
    """A fresh ``GenerationConfig`` with the released decoding and the tokenizer's special tokens."""
    from transformers import GenerationConfig

    return GenerationConfig(num_beams=INFERENCE_DEFAULTS["num_beams"], do_sample=INFERENCE_DEFAULTS["temperature"] > 0,
                            max_new_tokens=INFERENCE_DEFAULTS["max_new_tokens"], eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)


def stage_of(args) -> str:
    return {"sft": "SFT", "dpo": "DPO", "mcm_dpo": "MCM-DPO"}[args.loss]


def method_lines(args) -> list[str]:
    """The objective and its settings, as Markdown list items."""
    stage = stage_of(args)
    if stage == "SFT":
        return ["- Objective: supervised fine-tuning, mean negative log-likelihood of the answer tokens."]
    lines = [f"- Reference: `{args.reference_mode}` (`--reference_mode`), beta {args.beta:g}."]
    if stage == "DPO":
        return ["- Objective: DPO, `-log sigmoid(beta * (reward(chosen) - reward(rejected)))`."] + lines
    weights = args.term_weights
    lines = [f"- Objective: MCM-DPO (`--mcm_aggregate {args.mcm_aggregate}`), each term's weight divided by "
             f"`--para_norm {args.para_norm:g}` (`--loss mcm_dpo`, `--term_weights` below)."] + lines
    lines.append(f"- Corrupted image: `{args.use_image_type}`"
                 + (f" (diffusion step {args.diffusion_step})" if args.use_image_type == "diffusion" else "")
                 + f", negatives seed {args.negatives_seed}.")
    lines.append("")
    lines.append(f"| term | prefers `{CHOSEN}` to | weight |")
    lines.append("|---|---|---|")
    lines += [f"| {t.name} | `{t.loser}` | {weights[t.name]:g}{'' if weights[t.name] else ' (off)'} |" for t in TERMS]
    return lines


# flags the card leaves out with their values: a secret, and the launcher's own (nothing about the run)
PRIVATE_FLAGS = ("hub_token", "local_rank")


def public_flags(argv: Sequence[str]) -> tuple[str, ...]:
    """``argv`` without ``PRIVATE_FLAGS`` and their values (``--flag value`` or ``--flag=value``).

    A ``--flag=value`` word carries its value: the word after it (DeepSpeed puts the settings file
    right after ``--local_rank=N``) is kept."""
    kept, private = [], False
    for arg in argv:
        if arg.startswith("--"):
            private = arg[2:].split("=", 1)[0].replace("-", "_") in PRIVATE_FLAGS
            if private and "=" in arg:
                private = False
                continue
        if not private:
            kept.append(arg)
    return tuple(kept)


def relative_paths(argv: Sequence[str], start: str | Path) -> tuple[str, ...]:
    """``argv`` with each absolute path under ``start`` (the run's directory) written relative to it."""
    start = Path(start).resolve()
    out = []
    for arg in argv:
        path = Path(arg)
        out.append(str(path.relative_to(start)) if path.is_absolute() and path.is_relative_to(start) else arg)
    return tuple(out)


def launcher_of(args) -> str:
    """The command that starts the trainer as this run was started: DeepSpeed's launcher with its process
    counts, else Python."""
    import os

    if not args.deepspeed:
        return "python -m llava.train.train"
    per_node = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or args.world_size)  # DeepSpeed, torchrun
    nodes = max(1, args.world_size // max(1, per_node))
    return f"deepspeed --num_gpus {per_node}" + (f" --num_nodes {nodes}" if nodes > 1 else "") + " --module llava.train.train"


@dataclass(frozen=True)
class CardFacts:
    base_model: str
    vision_tower: str | None
    model_class: str
    version: str
    image_aspect_ratio: str
    method: tuple[str, ...]
    stage: str
    data: tuple[tuple[str, str, int], ...]  # (role, path, records)
    command: tuple[str, ...]
    lora: str | None = None  # "r R, alpha A" when the directory holds a LoRA adapter
    hub_model_id: str | None = None
    launcher: str = "python -m llava.train.train"

    @classmethod
    def from_run(cls, model_args, data_args, args, argv: Sequence[str], model_class: str, n_train: int,
                 n_eval: int | None) -> "CardFacts":
        data = [("train", str(data_args.data_path), n_train)]
        if n_eval is not None:
            data.append(("eval", str(data_args.eval_data_path), n_eval))
        return cls(base_model=str(model_args.model_name_or_path), vision_tower=model_args.vision_tower,
                   model_class=model_class, version=model_args.version, image_aspect_ratio=data_args.image_aspect_ratio,
                   method=tuple(method_lines(args)), stage=stage_of(args), data=tuple(data),
                   command=relative_paths(public_flags(argv), Path.cwd()), launcher=launcher_of(args),
                   lora=f"r {args.lora_r}, alpha {args.lora_alpha}" if args.lora_enable else None,
                   hub_model_id=args.hub_model_id if args.push_to_hub else None)

    def merged(self) -> "CardFacts":
        """The same run, for the full model its LoRA adapter was merged into."""
        return replace(self, lora=None)


def final_metrics(log_history: Sequence[Mapping]) -> tuple[int | None, dict, dict]:
    """``(step, training metrics, eval metrics)``: the last logged of each (the run summary included)."""
    train, evaluation, step = {}, {}, None
    for entry in log_history:
        step = entry.get("step", step)
        if any(k.startswith("eval_") for k in entry):
            evaluation = {k: v for k, v in entry.items() if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))}
        elif "loss" in entry:
            train = {k: v for k, v in entry.items() if k.startswith(TRAINING_METRICS)}
        elif "train_loss" in entry:  # the summary the Trainer logs at the end
            train.update({k: v for k, v in entry.items() if k in ("train_loss", "train_runtime", "epoch")})
    return step, train, evaluation


def command_text(argv: Sequence[str], launcher: str = "python -m llava.train.train") -> str:
    """The trainer's command line, one flag and its values a line."""
    lines: list[list[str]] = [[]]
    for arg in argv:
        if arg.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(arg)
    return " \\\n    ".join([launcher] + [shlex.join(line) for line in lines if line])


def _metrics_table(metrics: Mapping[str, float]) -> list[str]:
    rows = ["| metric | value |", "|---|---|"]
    return rows + [f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in sorted(metrics.items())]


def _front_matter(facts: CardFacts) -> str:
    from huggingface_hub import ModelCardData

    tags = ["llava", "alt-text", facts.stage.lower()]
    # the Hub wants a repository id here; a local path would be flagged as invalid metadata
    on_hub = facts.base_model.count("/") == 1 and not Path(facts.base_model).exists()
    data = ModelCardData(library_name="peft" if facts.lora else "transformers", pipeline_tag="image-text-to-text",
                         tags=tags, base_model=facts.base_model if on_hub else None)
    return f"---\n{data.to_yaml()}\n---\n"


def render_card(facts: CardFacts, log_history: Sequence[Mapping], directory: str | Path) -> str:
    name = facts.hub_model_id or str(directory)
    step, train, evaluation = final_metrics(log_history)
    base = f"`{facts.base_model}`" + (f" with the vision tower `{facts.vision_tower}`" if facts.vision_tower else "")
    what = f"A LoRA adapter ({facts.lora}) on {base}" if facts.lora else base
    lines = [
        _front_matter(facts),
        f"# {Path(name).name}: LLaVA for alt-text, {facts.stage}",
        "",
        f"{what}, trained by {facts.stage} with llava-mcmdpo (MCM-DPO, ACM MM 2025). Model class `{facts.model_class}`; "
        f"conversation template `{facts.version}`; images `--image_aspect_ratio {facts.image_aspect_ratio}`.",
        "",
        "## Method",
        "",
        *facts.method,
        "",
        "## Data",
        "",
        "| split | file | records |",
        "|---|---|---|",
        *[f"| {role} | `{path}` | {n} |" for role, path, n in facts.data],
        "",
        "## Command",
        "",
        "The command that ran (the settings file first, if any); paths are relative to the directory it was run from.",
        "",
        "```bash",
        command_text(facts.command, facts.launcher),
        "```",
        "",
        "## Final training metrics" + (f" (step {step})" if step is not None else ""),
        "",
        *(_metrics_table(train) if train else ["No training step was logged."]),
        "",
    ]
    if evaluation:
        lines += ["Held-out evaluation (`--eval_data_path`), last evaluated:", "", *_metrics_table(evaluation), ""]
    lines += _usage(facts, name)
    return "\n".join(lines) + "\n"


def _usage(facts: CardFacts, name: str) -> list[str]:
    if facts.lora:
        load = (f"base = AutoModelForImageTextToText.from_pretrained({facts.base_model!r})\n"
                f"model = PeftModel.from_pretrained(base, {name!r})\n"
                f"processor = AutoProcessor.from_pretrained({name!r})")
        imports = "from peft import PeftModel\nfrom transformers import AutoModelForImageTextToText, AutoProcessor"
        toolkit_base = f" --model_base {shlex.quote(facts.base_model)}"
    else:
        load = (f"model = AutoModelForImageTextToText.from_pretrained({name!r})  # {facts.model_class}\n"
                f"processor = AutoProcessor.from_pretrained({name!r})")
        imports = "from transformers import AutoModelForImageTextToText, AutoProcessor"
        toolkit_base = ""
    pad_note = ("Training padded each image to a square in the processor's mean colour (`pad`) before the processor; "
                "plain transformers resizes and centre-crops instead (and LLaVA-NeXT's processor tiles), so pad the image "
                "as below to see what training saw." if facts.image_aspect_ratio == "pad" else
                f"Images were processed with `--image_aspect_ratio {facts.image_aspect_ratio}`.")
    return [
        "## Use it with plain transformers",
        "",
        "The processor's chat template writes the training prompt, and `generation_config.json` holds the "
        "released decoding (3 beams, no sampling, 256 new tokens). " + pad_note,
        "",
        "```python",
        "from PIL import Image",
        imports,
        "",
        load,
        "image = Image.open('photo.jpg').convert('RGB')",
        "side, fill = max(image.size), tuple(round(255 * m) for m in processor.image_processor.image_mean)",
        "square = Image.new('RGB', (side, side), fill)",
        "square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))",
        "question = 'Given an image and context, generate alt-text for the image.\\nContext:\\n' + 'the text of the post'",
        "messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': question}]}]",
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        "inputs = processor(images=square, text=prompt, return_tensors='pt')",
        "out = model.generate(**inputs)",
        "print(processor.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "## Use it with llava-mcmdpo",
        "",
        "```bash",
        f"python mcmdpo_inference.py --model_name {shlex.quote(name)}{toolkit_base} --conv_mode {facts.version} "
        f"--image_aspect_ratio {facts.image_aspect_ratio} \\",
        "    --test_datasets test.jsonl --image_folder images --eval_output predictions.jsonl",
        f"python -m llava.eval.alt_text --model_name {shlex.quote(name)}{toolkit_base} --conv_mode {facts.version} "
        f"--image_aspect_ratio {facts.image_aspect_ratio} --image photo.jpg --context \"the text of the post\"",
        "```",
    ]


def write_model_card(directory: str | Path, facts: CardFacts, log_history: Sequence[Mapping]) -> Path:
    """Write the card as ``<directory>/README.md`` (atomically) and return its path."""
    from llava.fileio import write_atomic

    path = Path(directory) / CARD_NAME
    write_atomic(path, [render_card(facts, log_history, directory).encode()])
    return path
