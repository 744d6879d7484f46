"""Command-line arguments of ``llava.train.train``: the published flags, typed and validated.

Every field of the released argument dataclasses (``LVUGAI/MCM-DPO``'s ``llava/train/train.py``) is
accepted with its name and meaning (docs/method.md, "Released settings"), so an existing command line runs unchanged. Those
that change nothing here are listed in ``NO_EFFECT`` and named in one warning line when given. Bad
values and bad combinations are rejected here, before any model or data is loaded.

Defaults that differ from the released dataclasses when a flag is omitted (the scripts pass the
published values): ``--version`` v1 (released v0), ``--image_aspect_ratio`` pad (square),
``--mm_vision_select_layer`` -2 (-1), ``--mm_projector_type`` mlp2x_gelu (linear),
``--model_max_length`` 2048 (512), ``--mm_use_im_patch_token`` False (True).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Literal

import transformers

from llava.conversation import TEMPLATE_NAMES
from llava.data.images import AspectRatio
from llava.data.negatives import DIFFUSION_STEPS, ImageType
from llava.model.attention import AttnImplementation  # auto | sdpa_tree | sdpa | eager | flash_attention_2
from llava.train.losses import Aggregate
from llava.train.released_flags import NO_EFFECT, RELEASED_METHOD_FLAGS, Loss, ReleasedFlags, translate

# Each choice is typed once, here or in the module it belongs to; the parser shows and checks the
# choices (--help lists them; a bad value stops with one line), and the rest of the package reads them.
ReferenceMode = Literal["cached", "live", "adapters_off"]
PreferenceForward = Literal["packed", "naive"]
QuantType = Literal["nf4", "fp4"]
LoraBias = Literal["none", "all", "lora_only"]
ProjectorType = Literal["mlp2x_gelu", "linear"]
SelectFeature = Literal["patch", "cls_patch"]
Version = Literal[TEMPLATE_NAMES]

logger = logging.getLogger("llava.train")

@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "HF-format LLaVA / LLaVA-NeXT directory, an original-format "
                                              "LLaVA directory (converted on load), or a causal LM to compose with --vision_tower"})
    model_revision: str | None = field(default=None, metadata={"help": "branch, tag or commit of a hub --model_name_or_path"})
    version: Version = field(default="v1", metadata={"help": "conversation template (v1 = vicuna_v1, the training template; "
                                                     "docs/method.md#tokens)"})
    vision_tower: str | None = field(default=None, metadata={"help": "local CLIP directory: composes a new LLaVA with a causal LM, "
                                                             "or supplies the tower of an original-format checkpoint"})
    mm_projector_type: ProjectorType = field(default="mlp2x_gelu", metadata={"help": "projector of a composed model: mlp2x_gelu or linear"})
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "vision layer whose features feed the projector (composed models)"})
    mm_vision_select_feature: SelectFeature = field(default="patch", metadata={"help": "patch (drop CLS) or cls_patch (composed models)"})
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "LLaVA's image start/end tokens (only False is supported)"})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "LLaVA's image patch token: True (the released default) "
                                                                "only adds a token no prompt uses; accepted, not added"})
    mm_patch_merge_type: str = field(default="flat", metadata={"help": "accepted, no effect: " + NO_EFFECT["mm_patch_merge_type"]})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "projector weights (safetensors or .bin) to load"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the language model"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "train the projector only (pre-training)"})
    unfreeze_mm_vision_tower: bool | None = field(default=None, metadata={
        "help": "train the vision tower: unset, it trains (as in the released code, whatever its flags) except with "
                "--tune_mm_mlp_adapter; False freezes it (paradigms a, b, c in the stages they freeze it)"})
    attn_implementation: AttnImplementation = field(default="auto", metadata={
        "help": "auto: flash_attention_2 when flash_attn is installed, CUDA is present, the run is bf16/fp16 and its masks are "
                "ordinary (SFT, --preference_forward naive); else sdpa_tree for tree-packed preference rows (masked-out "
                "pairs skipped) and sdpa for the rest; sdpa and eager compute tree rows with a dense mask"})

    def __post_init__(self):
        if self.mm_use_im_start_end:
            # It wraps the image in two new tokens whose embeddings must be learnt: other prompts, other
            # ids. No LLaVA-1.5 or later checkpoint (nor the released scripts) uses it.
            raise ValueError("--mm_use_im_start_end True is not supported (LLaVA-1.5 and later, and the released scripts, use False)")


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "training data: JSON array, JSON Lines, Parquet or a datasets directory"})
    image_folder: str | None = field(default=None, metadata={"help": "folder that image paths in the data are relative to"})
    image_aspect_ratio: AspectRatio = field(default="pad", metadata={"help": "pad (square in the mean colour), square (resize and centre crop) "
                                                             "or anyres (LLaVA-NeXT multi-crop)"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted, no effect: " + NO_EFFECT["lazy_preprocess"]})
    is_multimodal: bool = field(default=False, metadata={"help": "accepted, no effect: " + NO_EFFECT["is_multimodal"]})
    eval_data_path: str | None = field(default=None, metadata={"help": "held-out data (same format as --data_path) evaluated "
                                                         "with the training objective at --eval_steps (--eval_strategy steps)"})
    skip_bad_records: bool = field(default=False, metadata={"help": "leave out records with a bad image or field (missing, "
                                                       "unreadable, outside --image_folder) instead of stopping; they are "
                                                       "counted in the log and listed in <output_dir>/skipped_records.jsonl"})
    strip_special_text: bool = field(default=False, metadata={"help": "remove special-token literals (</s>, <s>, <unk>) "
                                     "from the texts; without it they are read as those tokens (a warning)"})
    allow_outside_image_folder: bool = field(default=False, metadata={"help": "read image paths that lead outside "
                                                                 "--image_folder (absolute, or climbing out with ..); "
                                                                 "refused by default"})

    def __post_init__(self):
        if not self.data_path:
            raise ValueError("--data_path is required")


@dataclass
class TrainingArguments(transformers.TrainingArguments, ReleasedFlags):
    """transformers' fields, the released ones (``llava.train.released_flags``: aliases of --loss and
    --term_weights, or without effect) and this toolkit's."""

    loss: Loss | None = field(default=None, metadata={"help": "sft, dpo or mcm_dpo (default: from the released aliases "
                                                      "below, else sft)"})
    term_weights: dict | str | None = field(default=None, metadata={"help": "MCM-DPO term weights as JSON, "
        "'{\"response\": 1.0, \"image\": 0.5}'; terms left out weigh 0 (terms: docs/method.md; default: from the released "
        "aliases below)"})
    para_norm: float = field(default=2.8, metadata={"help": "divisor of the term weights (not re-derived when terms are off)"})
    beta: float = field(default=0.1, metadata={"help": "DPO temperature beta"})
    mcm_aggregate: Aggregate = field(default="margin", metadata={"help": "margin: one sigmoid over the weighted margins (released code); "
                                                           "loss: weighted sum of seven DPO losses (the paper's second reading)"})
    use_image_type: ImageType = field(default="diffusion", metadata={"help": "corrupted image m_l (docs/method.md#corrupted-images)"})
    diffusion_step: int = field(default=700, metadata={"help": "forward-diffusion step of the diffusion corruption (0..999)"})
    negatives_seed: int | None = field(default=None, metadata={"help": "seed of corrupted images and swapped contexts (default: --seed)"})
    reference_mode: ReferenceMode = field(default="cached", metadata={"help": "cached: reference log-probs computed once before training and "
                                                            "cached on disk; live: a frozen copy of the starting model; "
                                                            "adapters_off: the LoRA policy with adapters disabled"})
    offline_ref_logits: str | None = field(default=None, metadata={"help": "directory of the reference log-prob cache "
                                                                   "(default: <output_dir>/ref_logps)"})
    preference_forward: PreferenceForward = field(default="packed", metadata={"help": "packed: each record's conditions as one tree-packed "
                                                                "sequence (fast); naive: one full sequence per condition (published)"})
    model_max_length: int = field(default=2048, metadata={"help": "longest sequence of one condition; the context is shortened to fit"})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "learning rate of the projector (default: --learning_rate)"})
    mm_vision_tower_lr: float | None = field(default=None, metadata={"help": "learning rate of the vision tower (default: --learning_rate)"})
    group_by_modality_length: bool = field(default=False, metadata={"help": "batch records of similar length, image and text-only apart"})
    lora_enable: bool = field(default=False, metadata={"help": "train LoRA adapters on the language model"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_bias: LoraBias = field(default="none", metadata={"help": "LoRA bias"})
    merge_lora: bool = field(default=False, metadata={"help": "with LoRA: also save a merged full model to <output_dir>/merged"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "kept False: batches carry their own keys"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer (the released default, adamw_torch: not the fused one)"})
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "freeze the projector"})
    bits: int = field(default=16, metadata={"help": "4 or 8: QLoRA (with --lora_enable), the language model quantized by "
                                            "bitsandbytes on a CUDA GPU; 16 (or 32): no quantization"})
    double_quant: bool = field(default=True, metadata={"help": "with --bits 4: quantize the quantization constants too"})
    quant_type: QuantType = field(default="nf4", metadata={"help": "with --bits 4: the 4-bit data type"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "gradient clipping norm; 0 (released: no clipping) turns it off"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start afresh in an --output_dir holding another "
                                       "run (its checkpoints are removed); never one holding files of no training run"})
    save_at_epoch_end: bool = field(default=False, metadata={"help": "with --save_strategy steps: also save a checkpoint "
                                                           "at the end of each epoch"})
    # Spellings of the published scripts that transformers 5 renamed.
    warmup_ratio: float | None = field(default=None, metadata={"help": "warmup as a share of all steps (= --warmup_steps < 1)"})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "older name of --eval_strategy"})
    nan_policy: Literal["stop", "skip"] = field(default="stop", metadata={"help": "a step whose loss or gradient is not "
        "finite: stop (the run ends naming the step, its records and the last checkpoint) or skip (no update; counted "
        "as nan_skipped in the logs)"})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.tf32 and not transformers.utils.is_torch_tf32_available():
            # The released scripts pass --tf32 True; it is a matmul mode of NVIDIA GPUs, nothing to do elsewhere.
            logger.warning("--tf32 True ignored: no GPU with TF32 here")
            self.tf32 = None
        self._check_quantization()
        super().__post_init__()
        if not 0 <= self.diffusion_step < DIFFUSION_STEPS:
            raise ValueError(f"--diffusion_step must be in 0..{DIFFUSION_STEPS - 1}, got {self.diffusion_step}")
        if self.reference_mode == "adapters_off" and not self.lora_enable:
            raise ValueError("--reference_mode adapters_off needs --lora_enable True")
        if isinstance(self.term_weights, str):
            try:
                self.term_weights = json.loads(self.term_weights)
            except json.JSONDecodeError as e:
                raise ValueError(f"--term_weights {self.term_weights}: not JSON ({e})") from None
            if not isinstance(self.term_weights, dict):
                raise ValueError(f"--term_weights: expected a JSON object of term weights, got {self.term_weights!r}")
        translate(self)  # the released aliases -> loss, term_weights
        if self.negatives_seed is None:
            self.negatives_seed = self.seed

    def _check_quantization(self) -> None:
        if self.bits not in (4, 8, 16, 32):
            raise ValueError(f"--bits must be 4 or 8 (QLoRA) or 16 (no quantization), got {self.bits}")
        if self.bits not in (4, 8):
            return
        import torch

        if self.use_cpu or not torch.cuda.is_available():
            raise ValueError(f"--bits {self.bits} quantizes with bitsandbytes, which needs a CUDA GPU: none is available here")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"--bits {self.bits} needs the bitsandbytes package: pip install bitsandbytes")
        if not self.lora_enable:
            raise ValueError(f"--bits {self.bits} trains LoRA adapters on a quantized model: add --lora_enable True")


class _OneLineErrors(transformers.HfArgumentParser):
    """A bad flag or value (an unknown choice, a missing value) stops with one line, not the usage of ~200 flags."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(2)


USAGE = "llava-mcmdpo train [SETTINGS.yaml] [--flag value ...]"
SETTINGS_HELP = ("SETTINGS.yaml (optional, first): a settings file, such as configs/sft.yaml, configs/dpo.yaml or "
                 "configs/mcmdpo.yaml, whose keys are the flags below; flags given after it win over the file.")
# The toolkit's own flags, grouped for --help; --help-all adds every field of transformers' TrainingArguments.
METHOD_FLAGS = ("loss", "term_weights", "para_norm", "beta", "mcm_aggregate", "use_image_type", "diffusion_step", "negatives_seed", "reference_mode",
                "offline_ref_logits", "preference_forward", *RELEASED_METHOD_FLAGS)
# transformers' own fields that every run sets, shown with the run group
RUN_FLAGS_FROM_TRANSFORMERS = ("output_dir", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type",
                               "per_device_train_batch_size", "gradient_accumulation_steps", "save_strategy", "save_steps",
                               "save_total_limit", "resume_from_checkpoint", "logging_steps", "report_to", "seed", "bf16",
                               "fp16", "deepspeed", "gradient_checkpointing", "dataloader_num_workers")


def build_parser() -> _OneLineErrors:
    """The trainer's parser: no prefix matching (``--max_step`` is not ``--max_steps``), help handled by ``parse_args``."""
    return _OneLineErrors((ModelArguments, DataArguments, TrainingArguments), prog="llava-mcmdpo train", usage=USAGE,
                          allow_abbrev=False, add_help=False)


def help_groups() -> dict[str, list[str]]:
    """The flags ``--help`` shows, group by group: model, data, method, run."""
    from dataclasses import fields

    own = [f.name for f in fields(TrainingArguments) if f.name in TrainingArguments.__annotations__]
    run = [n for n in own if n not in METHOD_FLAGS and n not in NO_EFFECT]
    return {"model": [f.name for f in fields(ModelArguments) if f.name not in NO_EFFECT],
            "data": [f.name for f in fields(DataArguments) if f.name not in NO_EFFECT],
            "method": list(METHOD_FLAGS),
            "run": list(RUN_FLAGS_FROM_TRANSFORMERS) + [n for n in run if n not in RUN_FLAGS_FROM_TRANSFORMERS]}


def short_help(parser: _OneLineErrors) -> str:
    """``--help``: the settings file and the toolkit's flags, grouped; the rest with ``--help-all``."""
    import argparse
    import copy

    def compact(action):  # one spelling a flag (the underscore one), its choices or a short metavar
        shown = copy.copy(action)
        shown.option_strings = action.option_strings[:1]
        if action.choices is None:
            shown.metavar = "[True|False]" if action.nargs == "?" else "X"
        return shown

    actions = {a.dest: a for a in parser._actions}
    shown = argparse.ArgumentParser(prog=parser.prog, usage=USAGE, add_help=False, description=SETTINGS_HELP,
                                    formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(
                                        prog, max_help_position=34, width=120),
                                    epilog=f"Accepted without effect (released flags): {', '.join(NO_EFFECT)}. "
                                           "--help-all lists every flag, transformers' TrainingArguments included.")
    for name, dests in help_groups().items():
        group = shown.add_argument_group(f"{name} flags")
        for dest in dests:
            group._group_actions.append(compact(actions[dest]))
    return shown.format_help()


def check_flag_names(argv: list[str], parser: _OneLineErrors, source: str = "") -> None:
    """Stop, before anything loads, on a flag no dataclass has, naming the closest ones (difflib)."""
    import difflib

    known = [s for s in parser._option_string_actions if s.startswith("--") and "-" not in s[2:]]
    for word in argv:
        if not word.startswith("--"):
            continue
        name = word.split("=", 1)[0]
        if name not in parser._option_string_actions:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"{source}unknown flag {name}{hint} (see --help)")


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "--help-all" in argv:
        sys.stdout.write(parser.format_help())
        raise SystemExit(0)
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(short_help(parser))
        raise SystemExit(0)
    check_flag_names(argv, parser)
    argv = expand_config(argv, parser)
    import torch

    if not torch.cuda.is_available() and not any(a.startswith("--use_cpu") for a in argv):
        # A host without CUDA trains on the CPU; said up front, the launchers' processes agree on
        # the world size (gloo), which DeepSpeed on the CPU needs.
        argv += ["--use_cpu", "True"]
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.tune_mm_mlp_adapter and training_args.lora_enable:
        raise ValueError("--tune_mm_mlp_adapter trains only the projector: it cannot be combined with --lora_enable")
    for line in released_flag_notes(argv, model_args):
        logger.warning(line)
    return model_args, data_args, training_args


def given_flags(argv: list[str]) -> set[str]:
    """Names of the flags on a command line (``--name value`` or ``--name=value``)."""
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}


def released_flag_notes(argv: list[str], model_args: ModelArguments) -> list[str]:
    """Warning lines for released flags given on the command line that change nothing here."""
    given = given_flags(argv)
    notes = []
    idle = [f"--{name}" for name in NO_EFFECT if name in given]
    if idle:
        notes.append(f"accepted but without effect here (see --help for why): {', '.join(idle)}")
    if model_args.mm_use_im_patch_token and "mm_use_im_patch_token" in given:
        notes.append("--mm_use_im_patch_token True: the released code only adds an <im_patch> token that no prompt "
                     "contains (one more vocabulary row, no other token id changes); it is not added here")
    return notes


# -- settings files (configs/*.yaml): parse_args reads one given before the flags ----------------

CONFIG_SUFFIXES = (".yaml", ".yml")


def is_config(arg: str) -> bool:
    """Is this command-line word a settings file (``configs/mcmdpo.yaml``) rather than a flag?"""
    return not arg.startswith("-") and arg.lower().endswith(CONFIG_SUFFIXES)


def _unique_key_loader():
    """A YAML SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last, silently)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})")
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


def config_argv(path: str, parser: _OneLineErrors | None = None) -> list[str]:
    """The flags a YAML settings file says, as ``--key value`` words.

    A mapping of flag names to values: a scalar becomes one value (booleans ``True``/``False``, as the
    flags are written), a list several, for the flags that take several (``label_names: [labels, ids]``;
    ``report_to`` takes one, since transformers' parser reads one word for it).
    A key given twice, a key no flag has (the closest named) or a list for a one-value flag stops here.
    """
    import difflib

    import yaml

    parser = parser or build_parser()
    actions = {a.dest: a for a in parser._actions}
    try:
        with open(path, encoding="utf-8") as f:
            settings = yaml.load(f, Loader=_unique_key_loader())  # noqa: S506 -- a SafeLoader subclass
    except FileNotFoundError:
        raise ValueError(f"{path}: settings file not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if settings is None:
        return []
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values, got a {type(settings).__name__}")
    argv = []
    for key, value in settings.items():
        if key not in actions or key == "help":
            close = difflib.get_close_matches(str(key), list(actions), n=3, cutoff=0.75)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"{path}: {key!r} is not a training flag{hint} (see --help)")
        if isinstance(value, list) and len(value) != 1 and actions[key].nargs not in ("+", "*"):
            raise ValueError(f"{path}: {key}: a list ({value!r}), but --{key} takes one value")
        if isinstance(value, dict) and key == "term_weights":  # the one mapping flag: JSON, as on the command line
            argv += [f"--{key}", json.dumps(value)]
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None or isinstance(v, (dict, list)):
                raise ValueError(f"{path}: {key}: expected a value or a list of values, got {v!r}")
        argv += [f"--{key}", *(str(v) for v in values)]
    return argv


def expand_config(argv: list[str], parser: _OneLineErrors | None = None) -> list[str]:
    """``[FILE.yaml] [--flag value ...]`` as flags only: the file's flags first, so that every flag
    given on the command line wins (argparse keeps the last value of a repeated flag).

    Words ``--name=value`` may come before the file: DeepSpeed's launcher puts ``--local_rank=N``
    right after the script's name.
    """
    lead = 0
    while lead < len(argv) and argv[lead].startswith("--") and "=" in argv[lead]:
        lead += 1
    if lead < len(argv) and is_config(argv[lead]):
        return config_argv(argv[lead], parser) + argv[:lead] + argv[lead + 1:]
    return argv
