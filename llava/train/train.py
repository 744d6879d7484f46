"""Train a LLaVA model: SFT (``--task LM``), DPO or MCM-DPO (``--task DPO``).

    deepspeed llava/train/train.py --deepspeed scripts/zero3.json --model_name_or_path ... --task DPO ...
    torchrun --nproc_per_node N llava/train/train.py ...
    python -m llava.train.train ...

Parse, build, train, save. Everything that can be wrong with the input (flags, data, model path)
is reported before the first step as one line naming the file, record and field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
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
from llava.data.images import ImageProcessor, image_path
from llava.data.lengths import early_processor, too_long
from llava.data.records import (SPECIAL_TEXT, DataError, DataProblem, Record, read_records_checked,
                                 strip_special_text)
from llava.data.show import render_text, sequences_of
from llava.data.verify import (SKIPPED_RECORDS, bad_records, leave_out, verify_images_everywhere,
                               write_skipped_records)
from llava.model.attention import attention_here, use_attention
from llava.model.chat_template import set_chat_template
from llava.model.hub import dataset_fingerprint
from llava.model.load import ModelLoadError, checkpoint_kind, compose, load_model, resolve_hub_arguments, save_model
from llava.train.arguments import DataArguments, ModelArguments, TrainingArguments, parse_args
from llava.fileio import LockHeld, RunLock
from llava.train.checkpoints import (AUTO, LOCK_FILE, OutputDirError, ReplayEpochOrder, SaveAtEpochEnd,
                                     check_output_dir_shared, claim_output_dir, copy_final_model,
                                     discard_final_model_marker, remove_unfinished_saves, resolve_resume, save_failure,
                                     steps_done)
from llava.train.deepspeed_host import cpu_op_build_note, refuse_abandoned_build_locks, release_shared_memory_names
from llava.train.errors import EXPECTED, error_line, exit_code, rank, write_traceback
from llava.train.model_card import CardFacts, release_generation_config, write_model_card
from llava.train.pause_points import PauseMidStep
from llava.train.params import Trainable, apply_lora, quantization, set_trainable
from llava.train.losses import DPOObjective, MCMObjective, SFTObjective
from llava.train.projector_file import load_projector_file, trains_projector_only, write_projector_file
from llava.fingerprint import file_fingerprint, images_fingerprint, model_fingerprint, processor_fingerprint
from llava.train.saving import check_supported
from llava.train.step import AdaptersOffReference, CachedReference, LiveReference, ScoringModel
from llava.train.reporting import prepare_wandb
from llava.train.run_log import PLAN_SHOWN, TrainLog, metrics_logger, plan_lines, quiet_frameworks
from llava.train.trainer import LlavaTrainer

logger = logging.getLogger("llava.train")


def compute_dtype(args: TrainingArguments) -> torch.dtype:
    """The precision the matrix products run in: ``--bf16`` / ``--fp16``, else float32."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def weights_dtype(args: TrainingArguments) -> torch.dtype:
    """The precision the weights are loaded in.

    Under DeepSpeed the half-precision weights are the engine's working copy: it keeps float32 master
    weights in the optimizer itself. Without DeepSpeed, ``--bf16``/``--fp16`` mean what they mean to the
    Trainer, mixed precision: float32 weights under autocast (with a grad scaler for fp16). Loading
    them in half precision instead would have AdamW update bf16 weights, where a step at the published
    lr 5e-7 is below bf16's resolution and is lost. A quantized (QLoRA) base stays in its compute dtype.
    """
    if args.deepspeed or args.bits in (4, 8):
        return compute_dtype(args)
    return torch.float32


def attention_for(model_args: ModelArguments, args: TrainingArguments) -> str:
    """The attention kernel of this run's models: flash-attention 2 only where the masks are ordinary
    (SFT, the naive preference forward), never for tree-packed preference rows (a 4-D mask)."""
    ordinary = args.loss == "sft" or args.preference_forward == "naive"
    return attention_here(model_args.attn_implementation, ordinary_masks=ordinary, dtype=compute_dtype(args))


def build_model(model_args: ModelArguments, args: TrainingArguments):
    """``(llava, processor)`` from ``--model_name_or_path`` (and ``--vision_tower`` to compose)."""
    path = model_args.model_name_or_path
    attn = attention_for(model_args, args)
    kind = checkpoint_kind(path)
    quantized = quantization(args.bits, quant_type=args.quant_type, double_quant=args.double_quant, compute_dtype=compute_dtype(args),
                             device=args.device) if args.bits in (4, 8) else None
    if kind == "causal_lm":
        if not model_args.vision_tower:
            raise ModelLoadError(f"{path} is a plain language model: give a CLIP directory with --vision_tower")
        if quantized:
            raise ModelLoadError(f"--bits {args.bits}: quantized loading needs a LLaVA checkpoint, not one composed from parts")
        model, processor = compose(path, model_args.vision_tower, projector_type=model_args.mm_projector_type,
                                   select_layer=model_args.mm_vision_select_layer,
                                   select_feature=model_args.mm_vision_select_feature, dtype=weights_dtype(args), seed=args.seed)
    else:
        if model_args.vision_tower and kind == "hf":
            logger.info("%s has its own vision tower; --vision_tower %s is not used", path, model_args.vision_tower)
        model, processor = load_model(path, dtype=weights_dtype(args), attn_implementation=attn,
                                      vision_tower=model_args.vision_tower if kind == "original" else None, quantization=quantized)
    use_attention(model, attn)  # composed and converted models are built with the default kernel
    if model_args.pretrain_mm_mlp_adapter:
        load_projector_file(model, model_args.pretrain_mm_mlp_adapter)
    return model, processor


def task_of(args: TrainingArguments) -> str:
    return "sft" if args.loss == "sft" else "preference"


def build_data(records: list[Record], data_args: DataArguments, model_args: ModelArguments, args: TrainingArguments, processor,
               conditions):
    """The dataset and collator of already verified ``records`` (``verified_records``)."""
    task = task_of(args)
    images = ImageProcessor.of(processor, data_args.image_aspect_ratio)
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


def verified_records(data_args: DataArguments, args: TrainingArguments, task: str, *, held_out: bool = False,
                     lengths=None, writes: list | None = None) -> list[Record]:
    """The records of ``--data_path``, every image opened and verified before step 1 (``llava.data.verify``).

    A bad record (a field, or an image missing, unreadable or outside ``--image_folder``) stops the run
    naming file, record and field; with ``--skip_bad_records`` it is left out, counted in the log and
    listed in ``<output_dir>/skipped_records.jsonl``. Every process gets the same verdict. ``held_out``:
    the ``--eval_data_path`` records, verified after the training data (their lines join theirs).
    ``lengths``: records -> the problems of answers too long for ``--model_max_length`` (``length_check``).
    ``writes``: where the write of the list goes, to be done once OUTPUT_DIR is known to be this run's
    (``claim_output_dir``); without it, written at once.
    """
    records, problems = read_records_checked(data_args.data_path, task)
    if data_args.strip_special_text:
        records = [strip_special_text(r) for r in records]
    if lengths is not None:
        problems += lengths(records)
    hint = "--skip_bad_records leaves bad records out"
    if problems and not data_args.skip_bad_records:
        raise DataError(problems, hint=hint)
    if not data_args.strip_special_text and (special := [r for r in records if r != strip_special_text(r)]) \
            and args.process_index == 0:
        logger.warning("%d of %d records of %s hold special-token literals (%s), read as those tokens; first: record %d "
                       "(--strip_special_text removes them; llava-check lists them)", len(special), len(records),
                       data_args.data_path, ", ".join(SPECIAL_TEXT), special[0].number)
    start = time.time()
    check = verify_images_everywhere(records, data_args.image_folder, allow_outside=data_args.allow_outside_image_folder)
    main_process = args.process_index == 0
    if main_process:
        logger.info("%s: %s", data_args.data_path, check.summary(time.time() - start))
    if check.problems and not data_args.skip_bad_records:
        raise DataError(check.problems, hint=hint)
    if not data_args.skip_bad_records:
        return records
    problems += check.problems
    kept = leave_out(records, problems)
    skipped_list = Path(args.output_dir) / SKIPPED_RECORDS
    if main_process:
        write = functools.partial(write_skipped_records, skipped_list, problems,
                                  replacing=data_args.data_path if held_out else None)
        if writes is not None:
            writes.append(write)
        else:
            write()
    if problems:
        left_out = len(bad_records(problems))
        if main_process:
            logger.warning("--skip_bad_records: left out %d of %d records of %s (listed in %s); first: %s", left_out,
                           len(kept) + left_out, data_args.data_path, skipped_list, problems[0])
        if not kept:
            raise DataError(DataProblem(str(data_args.data_path), None, None, f"every record is bad ({left_out} left out, "
                                        f"listed in {skipped_list})"))
    return kept


def length_check(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments):
    """records -> answers too long for ``--model_max_length`` (``llava.data.lengths``), from the processor alone;
    None where the processor comes only with the model (one composed from parts)."""
    processor = early_processor(model_args.model_name_or_path, model_args.vision_tower)
    if processor is None:
        return None
    strategy = getattr(processor, "vision_feature_select_strategy", None) or "default"
    return lambda records: too_long(records, processor, model_args.version, data_args.image_aspect_ratio,
                                    args.model_max_length, strategy)


def check_eval_flags(data_args: DataArguments, args: TrainingArguments) -> None:
    if data_args.eval_data_path and args.eval_strategy == "no":
        raise ValueError(f"--eval_data_path {data_args.eval_data_path}: say when to evaluate, with --eval_strategy steps "
                         "--eval_steps N (or --eval_strategy epoch)")
    if args.eval_strategy != "no" and not data_args.eval_data_path:
        raise ValueError(f"--eval_strategy {args.eval_strategy.value}: give the held-out data with --eval_data_path")


def make_objective(args: TrainingArguments):
    if args.loss == "sft":
        return SFTObjective()
    if args.loss == "mcm_dpo":
        return MCMObjective(args.term_weights, args.para_norm, args.beta, args.mcm_aggregate)
    return DPOObjective(args.beta)


def make_reference(model_args, data_args, args, conditions, processor=None, records=(), policy=None):
    """The reference of ``--reference_mode``; ``policy``: the model trained (its adapters, for ``adapters_off``)."""
    if args.reference_mode == "adapters_off":
        return AdaptersOffReference(policy)
    if args.reference_mode == "live":
        llava, _ = build_model(model_args, args)
        return LiveReference(ScoringModel(llava, naive=args.preference_forward == "naive"))
    key = reference_key(model_args, data_args, args, conditions, processor, records)
    return CachedReference(args.offline_ref_logits or Path(args.output_dir) / "ref_logps", key)


def reference_key(model_args, data_args, args, conditions, processor, records) -> dict:
    """Everything that changes the cached reference log-probabilities; a change in any recomputes them."""
    model_path = Path(model_args.model_name_or_path)
    tower = model_args.vision_tower if model_args.vision_tower and Path(model_args.vision_tower).is_dir() else None
    adapter = model_args.pretrain_mm_mlp_adapter
    kind = checkpoint_kind(model_path)
    composed = kind == "causal_lm"  # a fresh projector: its settings and seed decide it
    base = json.loads((model_path / "adapter_config.json").read_text()).get("base_model_name_or_path") if kind == "lora" else None
    return {
        "model": model_fingerprint(model_path),
        "base_model": model_fingerprint(base) if base and Path(base).is_dir() else None,  # under a LoRA adapter
        "vision_tower": model_fingerprint(tower) if tower else None,
        "projector_adapter": file_fingerprint(adapter) if adapter else None,
        "composed": [model_args.mm_projector_type, model_args.mm_vision_select_layer, model_args.mm_vision_select_feature,
                     args.seed] if composed else None,
        "data": dataset_fingerprint(data_args.data_path),
        "image_folder": str(Path(data_args.image_folder).resolve()) if data_args.image_folder else None,
        "images": images_fingerprint(image_path(r.image, data_args.image_folder) for r in records if r.image and r.image.path),
        "processor": processor_fingerprint(processor) if processor is not None else None,
        "negatives": [args.negatives_seed, args.use_image_type, args.diffusion_step],
        "preprocess": [model_args.version, data_args.image_aspect_ratio, args.model_max_length],
        "forward": [args.preference_forward, model_args.attn_implementation],
        "quantization": [args.bits, args.quant_type, args.double_quant] if args.bits in (4, 8) else None,
        "conditions": list(conditions),
        "dtype": [str(weights_dtype(args)), str(compute_dtype(args))],
    }


# Training flags that change the trained weights (beside ``reference_key``'s model, data and preprocessing);
# logging, saving, workers, report_to, evaluation and the like do not count.
RESULT_FLAGS = ("loss", "term_weights", "para_norm", "beta", "mcm_aggregate", "reference_mode", "learning_rate", "mm_projector_lr", "mm_vision_tower_lr",
                "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "lr_scheduler_type",
                "warmup_ratio", "warmup_steps", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "world_size", "seed", "data_seed", "group_by_modality_length", "lora_enable",
                "lora_r", "lora_alpha", "lora_dropout", "lora_bias", "freeze_mm_mlp_adapter", "nan_policy")
MODEL_RESULT_FLAGS = ("freeze_backbone", "tune_mm_mlp_adapter", "unfreeze_mm_vision_tower")


def run_identity(model_args, data_args, args, conditions, records) -> dict:
    """The settings that define this run's result, written to ``OUTPUT_DIR/run.json`` and each checkpoint:
    ``reference_key`` (every byte of the model, the data, images, preprocessing, precision) and the
    training flags (``RESULT_FLAGS``). A resume continues only a directory of the same identity."""
    key = reference_key(model_args, data_args, args, conditions, None, records)
    del key["processor"]  # its files are the model directory's, which "model" hashes
    flags = {f"--{name}": getattr(args, name) for name in RESULT_FLAGS}
    flags |= {f"--{name}": getattr(model_args, name) for name in MODEL_RESULT_FLAGS}
    flags |= {"--strip_special_text": data_args.strip_special_text, "records": len(records)}
    return json.loads(json.dumps({**key, **flags}, default=lambda v: getattr(v, "value", str(v))))


def prepare(argv: list[str] | None = None, parsed=None) -> LlavaTrainer:
    """The trainer of a command line; ``parsed``: its ``parse_args(argv)``, if already done."""
    argv = sys.argv[1:] if argv is None else list(argv)  # the model card records the command as given
    model_args, data_args, args = parsed or parse_args(argv)
    check_eval_flags(data_args, args)
    check_supported(args)  # save settings the checkpoint writer refuses: said before any data or model loads
    # "auto" becomes the kernel that runs, so the model card and the reference cache's key name it
    model_args.attn_implementation = attention_for(model_args, args)
    resolve_hub_arguments(model_args)
    if args.lora_enable and args.merge_lora and checkpoint_kind(model_args.model_name_or_path) == "causal_lm":
        raise ValueError(f"--merge_lora True: a model composed from {model_args.model_name_or_path} and --vision_tower is "
                         "saved nowhere, so there is no base to merge the adapter into; start LoRA from a saved LLaVA "
                         "model (the projector stage's output, say)")
    if args.deepspeed:
        refuse_abandoned_build_locks()
    # Set up the process group now: ZeRO-3 partitions weights while they load, which needs it.
    args.device  # noqa: B018
    if args.process_index == 0:  # what the run is about to use, before anything heavy
        lines, warning = plan_lines(model_args, data_args, args, argv)
        (metrics_logger() if os.environ.get(PLAN_SHOWN) else logger).info("\n".join(lines))
        if warning:
            logger.warning(warning)
    if args.deepspeed:
        import deepspeed

        if args.local_process_index == 0 and (note := cpu_op_build_note()):
            logger.info(note)

        deepspeed.init_distributed()  # joins the process group the Trainer's arguments created
        release_shared_memory_names()  # CPU: else each launch leaves 2 x 67 MB in /dev/shm for good
    check_output_dir_shared(args.output_dir)  # multi-node: before any model loads, every node must see OUTPUT_DIR
    objective = make_objective(args)
    conditions = objective.conditions
    trainable = Trainable.from_flags(tune_mm_mlp_adapter=model_args.tune_mm_mlp_adapter,
                                     freeze_backbone=model_args.freeze_backbone,
                                     unfreeze_mm_vision_tower=model_args.unfreeze_mm_vision_tower,
                                     freeze_mm_mlp_adapter=args.freeze_mm_mlp_adapter)
    # The data first: a bad record stops the run before a model spends minutes loading.
    task = task_of(args)
    lengths = length_check(model_args, data_args, args)
    writes = []  # skipped_records.jsonl: not into a directory that turns out to hold another run
    records = verified_records(data_args, args, task, lengths=lengths, writes=writes)
    eval_data = dataclasses.replace(data_args, data_path=data_args.eval_data_path) if data_args.eval_data_path else None
    eval_records = verified_records(eval_data, args, task, held_out=True, lengths=lengths, writes=writes) if eval_data else None
    if args.process_index == 0:  # OUTPUT_DIR must hold this run or nothing (before the model loads)
        claim_output_dir(args.output_dir, run_identity(model_args, data_args, args, conditions, records),
                         args.overwrite_output_dir)
    for write in writes:
        write()
    llava, processor = build_model(model_args, args)
    # saved directories write the training prompt through apply_chat_template and decode as released
    set_chat_template(processor, get_template(model_args.version))
    llava.generation_config = release_generation_config(processor.tokenizer)
    dataset, collator = build_data(records, data_args, model_args, args, processor, conditions)
    if args.process_index == 0:  # what the model is trained on, seen before step 1 (python -m llava.data.show)
        logger.info("record 0 of %s as the model sees it ([[trained]]):\n%s", data_args.data_path,
                    render_text(processor.tokenizer, sequences_of(dataset, 0)))
    eval_dataset = build_data(eval_records, eval_data, model_args, args, processor, conditions)[0] if eval_data else None
    card = CardFacts.from_run(model_args, data_args, args, argv, type(llava).__name__, len(dataset),
                              len(eval_dataset) if eval_dataset is not None else None)
    if args.bits in (4, 8):  # QLoRA (untested here: no CUDA): peft's preparation of a quantized model, as released
        from peft import prepare_model_for_kbit_training

        llava = prepare_model_for_kbit_training(llava, use_gradient_checkpointing=args.gradient_checkpointing)
    set_trainable(llava, trainable)
    model = ScoringModel(llava, naive=args.preference_forward == "naive")
    if args.lora_enable:  # the Trainer holds the peft model: its own resume reloads the adapters
        model = apply_lora(model, trainable, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, bias=args.lora_bias,
                           adapters_in_model_dtype=bool(args.deepspeed))
    reference = (make_reference(model_args, data_args, args, conditions, processor, dataset.records, policy=model)
                 if objective.needs_reference else None)
    eval_reference = None
    if eval_data and isinstance(reference, CachedReference):  # the held-out records get their own cache
        eval_reference = make_reference(model_args, eval_data, args, conditions, processor,
                                        eval_dataset.records).for_split("eval")
    return LlavaTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, data_collator=collator,
                        processing_class=processor, objective=objective, reference=reference, eval_reference=eval_reference,
                        card=card)


def train(trainer: LlavaTrainer) -> None:
    """Train (or continue from ``--resume_from_checkpoint``), then save the final model and state.

    A run whose checkpoint is already at its last step trains nothing: its final model is left as
    it is (or copied from that checkpoint, if the run was killed before the final save).
    """
    args = trainer.args
    if args.should_save and Path(args.output_dir).is_dir():
        remove_unfinished_saves(args.output_dir)
    checkpoint = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is not None:
        done, total = steps_done(checkpoint), planned_steps(trainer)
        logger.info("resuming from %s (step %d of %d)", checkpoint, done, total)
        if done >= total:
            finish_without_training(trainer, checkpoint, total)
            return
    elif str(args.resume_from_checkpoint).strip().lower() in AUTO:
        logger.info("no complete checkpoint in %s: starting afresh", args.output_dir)
    if (note := prepare_wandb(args)) and trainer.is_world_process_zero():
        print(note, flush=True)
    trainer.add_callback(ReplayEpochOrder())
    trainer.add_callback(PauseMidStep())  # a test hook (llava.train.pause_points); inert unless a test sets it
    if args.save_at_epoch_end:
        trainer.add_callback(SaveAtEpochEnd())
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    try:
        save_final_model(trainer)
    except Exception as e:
        raise save_failure(f"the final model in {args.output_dir}", Path(args.output_dir), e, args.output_dir) from e


def save_final_model(trainer: LlavaTrainer) -> None:
    """The model, its extras and, last, ``trainer_state.json`` (the marker of a finished save) in ``--output_dir``."""
    args = trainer.args
    if trainer.is_world_process_zero():
        discard_final_model_marker(args.output_dir)
    trainer.save_model(args.output_dir)
    if trains_projector_only(trainer.model) and trainer.is_world_process_zero():  # stage 1: LLaVA's mm_projector.bin too
        write_projector_file(args.output_dir)
    if args.lora_enable and args.merge_lora and trainer.is_world_process_zero():
        base = trainer.model.peft_config["default"].base_model_name_or_path
        tower = trainer.card.vision_tower if trainer.card else None  # an original-format base's CLIP directory
        merged, processor = load_model(args.output_dir, model_base=base, merge_lora=True, vision_tower=tower)
        merged.generation_config = release_generation_config(processor.tokenizer)
        save_model(merged, processor, Path(args.output_dir) / "merged")
        write_model_card(Path(args.output_dir) / "merged", trainer.card.merged(), trainer.state.log_history)
    trainer.save_state()  # trainer_state.json, written last: the logged history the plots read, and "finished"


def planned_steps(trainer: LlavaTrainer) -> int:
    """The optimizer steps this run is set to take (``--max_steps``, or the epochs' worth)."""
    if trainer.args.max_steps > 0:
        return trainer.args.max_steps
    return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def finish_without_training(trainer: LlavaTrainer, checkpoint: Path, total: int) -> None:
    output_dir = Path(trainer.args.output_dir)
    final = steps_done(output_dir)
    if final is not None and final >= total:
        logger.info("this run finished at step %d: nothing to train, %s left as it is", final, output_dir)
    elif trainer.is_world_process_zero():
        logger.info("this run reached step %d in %s: copying its model to %s", total, checkpoint, output_dir)
        copy_final_model(checkpoint, output_dir)


def leave_process_group() -> None:
    """Wait for every rank to finish (rank 0 saves last), then take the process group down.

    Left to interpreter exit, gloo's worker threads can still hold work whose tensors reference Python
    objects; freeing them during finalization aborts the rank ("terminate called without an active
    exception", exit -6; pytorch/pytorch#190489), and the launcher then reports a finished run as
    failed. Only on success: after an error the other ranks may be gone, and a barrier would hang.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def output_dir_lock(output_dir: str):
    """``OUTPUT_DIR/.lock``, held by rank 0 for the run (``llava.fileio.RunLock``, as inference's): a second run
    into the same directory stops naming the first's host and PID. A directory made only for the lock goes
    again with it (an input error before the run began leaves no directory behind)."""
    folder = Path(output_dir)
    made = not folder.exists()
    try:
        with RunLock(folder / LOCK_FILE, f"--output_dir {folder}", enabled=rank() == 0,
                     log=lambda line: logger.warning("%s", line)):
            yield
    except LockHeld as e:
        raise OutputDirError(str(e)) from None
    finally:
        if made and rank() == 0 and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def main(argv: list[str] | None = None) -> None:
    """Train; any error ends this process with one line on stderr (``llava.train.errors``) and a non-zero
    exit, which makes the launcher stop the other ranks; the traceback goes to ``OUTPUT_DIR/error-rank{N}.log``."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    argv = sys.argv[1:] if argv is None else list(argv)
    with quiet_frameworks(rank()) as once:
        run_log = TrainLog(once).attach() if rank() == 0 else None  # OUTPUT_DIR/train.log, once the run has begun
        try:
            run(argv, run_log)
        finally:
            if run_log:
                run_log.close()


def run(argv: list[str], run_log: TrainLog | None) -> None:
    output_dir, started = None, False
    try:
        parsed = parse_args(argv)
        output_dir = parsed[2].output_dir
        with output_dir_lock(output_dir):
            trainer = prepare(argv, parsed)
            started = True
            if run_log:
                run_log.open(output_dir)
                metrics_logger().info("command: %s", " ".join([sys.executable, *sys.argv[:1], *argv]))
            train(trainer)
            leave_process_group()
            metrics_logger().info("finished")
    except Exception as e:  # noqa: BLE001 -- every error becomes one line; the traceback goes to the log
        # an input error before the run began leaves no directory behind; once training, the run has one
        # (not into a directory that holds another run, or is another's: it is not ours to write)
        log = write_traceback(e, None if isinstance(e, OutputDirError) else output_dir,
                              create=started or not isinstance(e, EXPECTED))
        # mid-run, a progress bar may hold the line (any rank's: they share the terminal): start a new one
        print("\n" * started + error_line(e, log), file=sys.stderr, flush=True)
        if run_log and output_dir and Path(output_dir).is_dir() and not isinstance(e, OutputDirError):
            if run_log.file is None:
                run_log.open(output_dir)
            metrics_logger().error(error_line(e, log))
        sys.exit(exit_code(e))


if __name__ == "__main__":
    main()
