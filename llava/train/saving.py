"""What the trainer writes, through the Trainer's public API: saved model directories and whole checkpoints.

A saved directory (a checkpoint's model, the final model) is the LLaVA model itself in HF format, its
weights under the llava-hf names (``llava.model.weights``), with its processor (and chat template), the
released decoding (``generation_config.json``), the model card (``llava.train.model_card``) and the run's
``run.json``: ``write_model_dir``, called by ``LlavaTrainer.save_model``.

A checkpoint appears whole or not at all (``llava.train.checkpoints``): ``CheckpointWriter``, the trainer's
last callback, takes every save the Trainer is asked for (``control.should_save``) and writes it itself
into ``.tmp-checkpoint-N``, which one process renames to ``checkpoint-N`` once every rank has written its
part. It writes what the Trainer's resume reads, under the Trainer's file names: the model, the optimizer
and scheduler (under DeepSpeed, the engine's own checkpoint), the grad scaler, each rank's RNG states and,
last, ``trainer_state.json``. It saves where the Trainer would: after the step's log entry and after its
evaluation, so the checkpoint's state holds them, and before the next batches are drawn. Then, as the
Trainer does, it pushes (``--push_to_hub``), rotates (``--save_total_limit``) and calls ``on_save``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from transformers import TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCALER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.training_args import ParallelMode
from transformers.utils import GENERATION_CONFIG_NAME, PushInProgress

from llava.model.weights import memory_name, save_llava_weights
from llava.train.checkpoints import IDENTITY_FILE, publish, save_failure, staging_dir
from llava.train.model_card import write_model_card
from llava.train.pause_points import pause_at

logger = logging.getLogger(__name__)


# -- a saved model directory -------------------------------------------------------------------------


def write_model_dir(trainer, output_dir: str, state_dict: dict | None = None, weights: bool = True) -> None:
    """The LLaVA model the trainer holds, as a directory ``from_pretrained`` loads; call it where ``should_save``.

    ``state_dict``: the model's gathered weights (ZeRO), named as the Trainer's model holds them;
    ``None``: the model's own. ``weights=False``: everything but the weights (ZeRO-3 without 16-bit gathering).
    """
    os.makedirs(output_dir, exist_ok=True)
    model = trainer.accelerator.unwrap_model(trainer.model)  # a ScoringModel, or a peft model around one
    llava = model.llava
    if not weights:
        llava.config.save_pretrained(output_dir)
    elif hasattr(model, "peft_config"):  # LoRA: the adapter's own files
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    else:
        save_llava_weights(llava, output_dir, state_dict)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
    if not os.path.isfile(os.path.join(output_dir, GENERATION_CONFIG_NAME)):  # a LoRA adapter's directory
        llava.generation_config.save_pretrained(output_dir)
    if trainer.card is not None:
        write_model_card(output_dir, trainer.card, trainer.state.log_history)
    identity = Path(trainer.args.output_dir) / IDENTITY_FILE  # every checkpoint says which run made it
    if identity.is_file() and Path(output_dir).resolve() != identity.parent.resolve():
        shutil.copy2(identity, Path(output_dir) / IDENTITY_FILE)


def take_saved_names(module, state_dict, prefix, *args) -> None:
    """A ``load_state_dict`` pre-hook of the ``ScoringModel`` the Trainer holds: a saved directory's weights,
    under their llava-hf names, renamed to the in-memory ones.

    What the Trainer's resume (without DeepSpeed) hands the model it holds is ``model.safetensors`` as saved;
    in-memory names (DeepSpeed's engine checkpoints) pass untouched, and so do those of engine checkpoints
    written when the wrapper held the LLaVA model as ``llava`` (``llava.`` + in-memory names).
    """
    if prefix or not state_dict:
        return
    renamed = {memory_name(k.removeprefix("llava.")): v for k, v in state_dict.items()}
    own = module.state_dict(keep_vars=True)
    for name, tensor in own.items():  # a tied weight is written once (save_llava_weights): its twin's
        twin = next((k for k, v in own.items() if v is tensor and k in renamed), None) if name not in renamed else None
        if twin is not None:
            renamed[name] = renamed[twin]
    unknown = sorted(k for k in renamed if k not in own)
    if unknown:
        raise ValueError(f"the checkpoint's weights are not this model's: {len(unknown)} unknown, e.g. {unknown[0]}")
    state_dict.clear()
    state_dict.update(renamed)


# -- checkpoints, written whole ------------------------------------------------------------------------


def check_supported(args) -> None:
    """The save settings ``CheckpointWriter`` cannot honour as the Trainer would, refused before training starts."""
    # The Trainer updates the best metric, and steps the schedulers that follow it, after on_evaluate and before
    # it saves: a checkpoint written at on_evaluate would miss that step's update.
    if args.metric_for_best_model is not None or args.save_strategy == "best":
        raise ValueError("--metric_for_best_model (also set by --load_best_model_at_end and the reduce_lr_on_plateau "
                         "and greedy schedulers) and --save_strategy best are not supported: checkpoints are saved "
                         "by step or epoch")
    if args.fsdp:
        raise ValueError("--fsdp: not supported; shard the model with DeepSpeed ZeRO-3 (--deepspeed scripts/zero3.json)")
    if args.push_to_hub and args.hub_strategy not in ("every_save", "end"):
        raise ValueError(f"--hub_strategy {args.hub_strategy}: not supported; use every_save (the model at each save) "
                         "or end")


class CheckpointWriter(TrainerCallback):
    """Takes each checkpoint save from the Trainer and writes it whole (module docstring).

    The Trainer logs, then evaluates, then saves (in that order, after ``on_step_end`` or ``on_epoch_end``);
    a save it is asked for is written after the log entry (``on_log``) or the evaluation (``on_evaluate``)
    still to come at that step, or at once if none is. It must be the last callback, to see every request
    (``LlavaTrainer.train`` puts it there).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.due: str | None = None  # the event the save waits for: "log" or "evaluate"
        self.logged_step = -1  # the step of the latest training log entry

    def on_train_begin(self, args, state, control, **kwargs):
        self.due, self.logged_step = None, state.global_step  # the Trainer logs only steps after the one it starts at

    def on_step_end(self, args, state, control, **kwargs):
        self._take(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._take(state, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # a training step's entry (evaluations log eval_*, the summary train_*)
            self.logged_step = state.global_step
            if self.due == "log":
                self._save(control)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.due == "evaluate":
            self._save(control)

    def _take(self, state, control) -> None:
        if not control.should_save:
            return
        control.should_save = False
        if control.should_evaluate:
            self.due = "evaluate"
        elif control.should_log and state.global_step > self.logged_step:
            self.due = "log"
        else:
            self._save(control)

    def _save(self, control) -> None:
        self.due = None
        trainer = self.trainer
        args, state, accelerator = trainer.args, trainer.state, trainer.accelerator
        trainer.store_flos()
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        staging = staging_dir(checkpoint)
        if args.should_save and staging.exists():  # left by a save killed at this same step
            shutil.rmtree(staging)
        accelerator.wait_for_everyone()
        try:
            self._write(str(staging))
            accelerator.wait_for_everyone()  # every rank's files are in: DeepSpeed shards, RNG states
            if args.should_save:
                publish(staging, checkpoint)
        except Exception as e:
            error = save_failure(f"checkpoint {checkpoint}", staging, e, args.output_dir)
            if args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # give the space back now
            raise error from e
        accelerator.wait_for_everyone()  # no rank goes on before the checkpoint is in place
        if args.push_to_hub and args.hub_strategy != "end":
            self._push(state)
        if args.should_save:
            rotate_checkpoints(output_dir=args.output_dir, save_total_limit=args.save_total_limit,
                               best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)
        trainer.callback_handler.on_save(args, state, control)

    def _write(self, folder: str) -> None:
        """A checkpoint's files, as the Trainer's resume reads them, ``trainer_state.json`` last."""
        trainer = self.trainer
        args = trainer.args
        trainer.save_model(folder, _internal_call=True)
        pause_at("save", trainer.state.global_step)
        if not args.save_only_model:
            if trainer.is_deepspeed_enabled:  # the engine's own checkpoint: its shards of weights and optimizer
                trainer.model_wrapped.save_checkpoint(folder)
            elif args.should_save:
                torch.save(trainer.optimizer.state_dict(), os.path.join(folder, OPTIMIZER_NAME))
            if args.should_save and not isinstance(trainer.lr_scheduler, DeepSpeedSchedulerWrapper):
                torch.save(trainer.lr_scheduler.state_dict(), os.path.join(folder, SCHEDULER_NAME))
            scaler = getattr(trainer.accelerator, "scaler", None)
            if scaler is not None and args.should_save:
                torch.save(scaler.state_dict(), os.path.join(folder, SCALER_NAME))
            save_rng_state(args, folder)
        if args.should_save:
            state = trainer.state
            for cb in trainer.callback_handler.callbacks + [trainer.control]:
                if isinstance(cb, ExportableState):
                    name = cb.__class__.__name__
                    if isinstance(state.stateful_callbacks.get(name), list):
                        state.stateful_callbacks[name].append(cb.state())
                    else:
                        state.stateful_callbacks[name] = cb.state()
            state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))

    def _push(self, state) -> None:
        """The model as of this checkpoint, uploaded from ``output_dir`` (``push_to_hub`` saves it there; every
        rank takes part, as ZeRO-3 gathers the weights); the next upload waits for this one."""
        trainer = self.trainer
        step = f"step {state.global_step}" if trainer.args.save_strategy == "steps" else f"epoch {int(state.epoch)}"
        job = trainer.push_to_hub(commit_message=f"Training in progress, {step}", blocking=False)
        if job is not None:  # rank 0; Trainer waits for it before the next push and at the end of training
            trainer.push_in_progress = PushInProgress([job])


def save_rng_state(args, folder: str) -> None:
    """Each rank's RNG states, in the file the Trainer's resume restores them from."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        distributed = args.parallel_mode == ParallelMode.DISTRIBUTED
        states["cuda"] = torch.cuda.random.get_rng_state_all() if distributed else torch.cuda.random.get_rng_state()
    os.makedirs(folder, exist_ok=True)  # a rank may get here before rank 0 has written the model
    name = "rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth"
    torch.save(states, os.path.join(folder, name))
