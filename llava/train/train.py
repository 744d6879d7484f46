"""Train a LLaVA model: SFT (``--task LM``), DPO or MCM-DPO (``--task DPO``).

    deepspeed llava/train/train.py --deepspeed scripts/zero3.json --model_name_or_path ... --task DPO ...
    torchrun --nproc_per_node N llava/train/train.py ...
    python -m llava.train.train ...

Parse, build, train, save. Everything that can be wrong with the input (flags, data, model path)
is reported before the first step as one line naming the file, record and field.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (deepspeed/torchrun llava/train/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import get_template
from llava.data.collate import PreferenceCollator, SFTCollator
from llava.data.datasets import PreferenceDataset, SFTDataset
from llava.data.images import ImageProcessor, missing_images
from llava.data.records import DataError, read_records
from llava.model.load import ModelLoadError, checkpoint_kind, compose, load_model, save_model
from llava.train.arguments import DataArguments, ModelArguments, TrainingArguments, parse_args
from llava.train.params import Trainable, apply_lora, set_trainable
from llava.train.policy import ResponseLogps
from llava.train.projector_file import trains_projector_only, write_projector_file
from llava.train.reference import AdaptersOffReference, CachedReference, LiveReference, file_fingerprint, model_fingerprint
from llava.train.trainer import DPOObjective, LlavaTrainer, MCMObjective, SFTObjective

logger = logging.getLogger("llava.train")


def model_dtype(args: TrainingArguments) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def build_model(model_args: ModelArguments, args: TrainingArguments):
    """``(llava, processor)`` from ``--model_name_or_path`` (and ``--vision_tower`` to compose)."""
    path = model_args.model_name_or_path
    kind = checkpoint_kind(path)
    if kind == "causal_lm":
        if not model_args.vision_tower:
            raise ModelLoadError(f"{path} is a plain language model: give a CLIP directory with --vision_tower")
        model, processor = compose(path, model_args.vision_tower, projector_type=model_args.mm_projector_type,
                                   select_layer=model_args.mm_vision_select_layer,
                                   select_feature=model_args.mm_vision_select_feature, dtype=model_dtype(args), seed=args.seed)
    else:
        if model_args.vision_tower and kind == "hf":
            logger.info("%s has its own vision tower; --vision_tower %s is not used", path, model_args.vision_tower)
        model, processor = load_model(path, dtype=model_dtype(args), attn_implementation=model_args.attn_implementation,
                                      vision_tower=model_args.vision_tower if kind == "original" else None)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    return model, processor


def load_projector(model, path: str) -> None:
    """Projector weights from a pre-training run (LLaVA's ``mm_projector.bin`` or our own names)."""
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"--pretrain_mm_mlp_adapter {path}: file not found")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(file)
    else:
        weights = torch.load(file, map_location="cpu", weights_only=True)
    rename = {"0.": "linear_1.", "2.": "linear_2."}
    own = {}
    for k, v in weights.items():
        k = k.split("mm_projector.")[-1].split("multi_modal_projector.")[-1]
        own[next((new + k[len(old):] for old, new in rename.items() if k.startswith(old)), k)] = v
    model.model.multi_modal_projector.load_state_dict(own)


def build_data(data_args: DataArguments, model_args: ModelArguments, args: TrainingArguments, processor, conditions):
    task = "preference" if args.task == "DPO" else "sft"
    records = read_records(data_args.data_path, task)
    problems = missing_images(records, data_args.image_folder)
    if problems:
        raise DataError(problems)
    strategy = getattr(processor, "vision_feature_select_strategy", None) or "default"
    images = ImageProcessor(processor, data_args.image_aspect_ratio, strategy)
    template = get_template(model_args.version)
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    if task == "sft":
        dataset = SFTDataset(records, tok, template, images, data_args.image_folder, args.model_max_length)
        return dataset, SFTCollator(tok.pad_token_id, image_token_id)
    dataset = PreferenceDataset(records, tok, template, images, data_args.image_folder, args.model_max_length, conditions,
                                image_type=args.use_image_type, diffusion_step=args.diffusion_step, seed=args.negatives_seed)
    packed = args.preference_forward == "packed"
    return dataset, PreferenceCollator(conditions, tok.pad_token_id, image_token_id, packed=packed)


def make_objective(args: TrainingArguments):
    if args.task == "LM":
        return SFTObjective()
    if args.use_cross_modal_loss:
        return MCMObjective(args.weights(), args.para_norm, args.beta, args.mcm_aggregate)
    return DPOObjective(args.beta)


def make_reference(model_args, data_args, args, conditions):
    if args.reference_mode == "adapters_off":
        return AdaptersOffReference()
    if args.reference_mode == "live":
        llava, _ = build_model(model_args, args)
        return LiveReference(ResponseLogps(llava, naive=args.preference_forward == "naive"))
    model_path = Path(model_args.model_name_or_path)
    key = {
        "model": model_fingerprint(model_path),
        "vision_tower": model_fingerprint(model_args.vision_tower) if model_args.vision_tower and Path(model_args.vision_tower).is_dir() else None,
        "data": file_fingerprint(data_args.data_path),
        "image_folder": str(Path(data_args.image_folder).resolve()) if data_args.image_folder else None,
        "negatives": [args.negatives_seed, args.use_image_type, args.diffusion_step],
        "preprocess": [model_args.version, data_args.image_aspect_ratio, args.model_max_length],
        "conditions": list(conditions),
        "dtype": str(model_dtype(args)),
    }
    return CachedReference(args.offline_ref_logits or Path(args.output_dir) / "ref_logps", key)


def abandoned_build_locks(max_age_minutes: float) -> list[Path]:
    """Build locks in torch's extensions cache that are older than ``max_age_minutes``.

    DeepSpeed JIT-builds a C++ op when it first starts, and torch guards each build with a lock
    file. A build killed midway (Ctrl-C, a job limit) leaves the lock behind, and every later
    launch then waits on it forever without a word.
    """
    from torch.utils.cpp_extension import get_default_build_root

    # <root>/<op>/lock under TORCH_EXTENSIONS_DIR, <root>/<python>_<accelerator>/<op>/lock by default
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    cutoff = time.time() - 60 * max_age_minutes
    stale = []
    for path in itertools.chain(root.glob("*/lock"), root.glob("*/*/lock")):
        try:
            if path.stat().st_mtime < cutoff:
                stale.append(path)
        except FileNotFoundError:  # the build it guarded has just finished
            pass
    return sorted(stale)


def prepare(argv: list[str] | None = None) -> LlavaTrainer:
    model_args, data_args, args = parse_args(argv)
    if args.deepspeed:
        minutes = float(os.environ.get("STALE_LOCK_MINUTES", 10))
        if stale := abandoned_build_locks(minutes):
            raise FileExistsError(f"a torch extension build lock older than {minutes:g} minutes, left by a killed build: "
                                  f"{', '.join(map(str, stale))}. DeepSpeed would wait on it forever; "
                                  "if no build is running, delete it and rerun (STALE_LOCK_MINUTES sets the age)")
    # Set up the process group now: ZeRO-3 partitions weights while they load, which needs it.
    args.device  # noqa: B018
    if args.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # joins the process group the Trainer's arguments created
    objective = make_objective(args)
    conditions = objective.conditions
    llava, processor = build_model(model_args, args)
    dataset, collator = build_data(data_args, model_args, args, processor, conditions)
    trainable = Trainable.from_flags(tune_mm_mlp_adapter=model_args.tune_mm_mlp_adapter,
                                     freeze_backbone=model_args.freeze_backbone,
                                     unfreeze_mm_vision_tower=model_args.unfreeze_mm_vision_tower)
    set_trainable(llava, trainable)
    if args.lora_enable:
        llava = apply_lora(llava, trainable, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, bias=args.lora_bias)
    reference = make_reference(model_args, data_args, args, conditions) if objective.needs_reference else None
    model = ResponseLogps(llava, naive=args.preference_forward == "naive")
    return LlavaTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=processor,
                        objective=objective, reference=reference)


def train(trainer: LlavaTrainer) -> None:
    args = trainer.args
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the logged history the demo's plots read
    if trains_projector_only(trainer.model) and trainer.is_world_process_zero():  # stage 1: LLaVA's mm_projector.bin too
        write_projector_file(args.output_dir)
    if args.lora_enable and args.merge_lora and trainer.is_world_process_zero():
        base = trainer.model.llava.peft_config["default"].base_model_name_or_path
        merged, processor = load_model(args.output_dir, model_base=base, merge_lora=True)
        save_model(merged, processor, Path(args.output_dir) / "merged")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        trainer = prepare(argv)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # flags, data, paths: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    train(trainer)


if __name__ == "__main__":
    main()
