"""One Trainer for SFT, DPO and MCM-DPO; ``llava.train.step`` says what a step computes.

``compute_loss`` is ``llava.train.step.step_loss`` (policy log-probs -> reference log-probs -> objective)
plus the metrics, averaged over ranks and kept until the next log. The model the Trainer holds is a
``ScoringModel`` (the LLaVA model called on a batch), or with LoRA the peft model around one;
checkpoints are saved as the LLaVA model itself (or its adapter), in HF format with its processor
(and its chat template), the released decoding (``generation_config.json``) and a model card
(``llava.train.model_card``), and written whole (``llava.train.saving``). The Trainer is reached
through public hooks only (and ``_get_train_sampler``, its hook for a custom sampler); its own resume
reloads the weights, the adapters included.

Held-out evaluation (``evaluate``) runs the same step on the eval set, with its own reference
(a cache of the eval records) when given one, and logs the per-record means of its metrics.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback
from accelerate.utils import gather_object

from llava.data.sampler import ModalityLengthGroupedSampler
from llava.train.checkpoints import newest_complete_checkpoint
from llava.train.losses import Metrics
from llava.train.model_card import CardFacts, write_model_card
from llava.train.nonfinite import NonFiniteStep, StepRecords, describe_records, gradients_finite, is_finite, stop_message, verdict
from llava.train.params import parameter_groups
from llava.train.reference import ReferenceSetup
from llava.train.run_log import log_metrics
from llava.train.saving import CheckpointWriter, check_supported, take_saved_names, write_model_dir
from llava.train.step import ScoringModel, step_loss

logger = logging.getLogger(__name__)


class _PrepareReference(TrainerCallback):
    """Runs the references' preparation (the cached passes) once the model is wrapped, before step 1.

    The held-out set's reference comes from the starting model too, so it is prepared here, before
    any step (and before ``--eval_on_start``'s evaluation), not at the first evaluation.
    """

    def __init__(self, trainer: "LlavaTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.prepare_references()


class _CheckFiniteStep(TrainerCallback):
    """``--nan_policy``: runs the trainer's check where the Trainer is about to step the optimizer."""

    def __init__(self, trainer: "LlavaTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.check_step_finite()


class _LogToFile(TrainerCallback):
    """Each logged step's metrics into ``OUTPUT_DIR/train.log`` (``llava.train.run_log``), not the console."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            log_metrics(state.global_step, logs)


class LlavaTrainer(Trainer):
    # compute_loss returns a per-micro-batch mean; the Trainer divides by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, objective, reference=None, eval_reference=None, card: CardFacts | None = None, **kwargs):
        """``eval_reference``: the held-out set's own reference (a cache of its records); ``None``
        evaluates with ``reference`` (live and adapters-off references serve any batch).
        ``card``: what the model card of each saved directory says about the run."""
        super().__init__(*args, **kwargs)
        self.objective, self.reference, self.eval_reference, self.card = objective, reference, eval_reference, card
        if objective.needs_reference:
            if reference is None:
                raise ValueError("this objective needs a reference")
            self.add_callback(_PrepareReference(self))
        self.add_callback(_CheckFiniteStep(self))
        self.add_callback(_LogToFile())
        check_supported(self.args)
        if isinstance(self.model, ScoringModel):  # resume: the Trainer loads saved weights (peft: their adapters)
            self.model.register_load_state_dict_pre_hook(take_saved_names)
        self.checkpoint_writer = CheckpointWriter(self)  # writes each checkpoint whole (llava.train.saving)
        self.add_callback(self.checkpoint_writer)
        if self.is_deepspeed_enabled:
            # transformers accumulates itself and gives Accelerate 1 step, but fills the DeepSpeed config's
            # "auto" with --gradient_accumulation_steps, which DeepSpeed's engine then runs; Accelerate takes
            # that value when it prepares the engine ("Gradient accumulation steps mismatch ... 1 vs 32").
            # Given it here, both agree from the start.
            self.accelerator.gradient_accumulation_steps = self.args.gradient_accumulation_steps
        self._step_records = StepRecords()  # of the optimizer step in progress (--nan_policy)
        self._nan_skipped = 0  # steps skipped since the last log
        self._references_ready = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._eval_rows: list[torch.Tensor] = []
        self._eval_names: list[str] = []

    def prepare_references(self) -> None:
        if self._references_ready or not self.objective.needs_reference:
            return
        datasets = {"train": self.train_dataset}
        if self.eval_dataset is not None:
            datasets["eval"] = self.eval_dataset
        setup = ReferenceSetup(policy=self.model_wrapped, accelerator=self.accelerator, collator=self.data_collator,
                               datasets=datasets, num_workers=self.args.dataloader_num_workers,
                               global_step=self.state.global_step)
        self.reference.prepare(setup)
        if self.eval_reference is not None and self.eval_dataset is not None:
            self.eval_reference.prepare(setup)
        self._references_ready = True

    # -- the step (llava.train.step) ------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, policy, metrics = step_loss(model, inputs, self.objective, self.reference)
        if model.training and metrics:
            self._store(metrics)
        return (loss, policy) if return_outputs else loss

    def _store(self, metrics: Metrics) -> None:
        names = sorted(metrics)
        means = torch.stack([metrics[k].float().mean() for k in names])
        means = self.accelerator.gather(means[None]).mean(0)  # average over ranks
        for k, v in zip(names, means.tolist()):
            if math.isfinite(v):  # a non-finite step is stopped or skipped (--nan_policy), not averaged in
                self._metrics[k].append(v)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs: add the step's averaged metrics
            logs.update({k: sum(v) / len(v) for k, v in self._metrics.items() if v})
            self._metrics.clear()
            if self.args.nan_policy == "skip":
                logs["nan_skipped"] = self._nan_skipped
                self._nan_skipped = 0
        super().log(logs, start_time)

    # -- non-finite steps (llava.train.nonfinite) -------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        records = inputs["index"].tolist()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_records.add(records, is_finite(loss))
        return loss

    def check_step_finite(self) -> None:
        """Update, skip or stop (``--nan_policy``): every rank reaches the same verdict on the step.

        Called before the optimizer steps; under DeepSpeed, after (its step runs in the backward of
        the last micro-batch, and skips an update whose gradients are not finite by itself).
        """
        step = self._step_records
        try:
            self._finish_step(step)
        finally:
            step.clear()  # the next optimizer step starts its own list

    def _finish_step(self, step: StepRecords) -> None:
        if self.args.fp16:  # loss scaling skips an overflowing gradient (and lowers its scale): routine, not a fault
            grads_ok = True
        elif self.is_deepspeed_enabled:
            grads_ok = not self.accelerator.optimizer_step_was_skipped
        else:
            grads_ok = gradients_finite(self.model.parameters())
        flags = torch.tensor([[not step.nonfinite, grads_ok]], dtype=torch.float32, device=self.args.device)
        loss_ok, grads_ok = (self.accelerator.gather(flags).amin(0) > 0).tolist()
        action = verdict(self.args.nan_policy, loss_ok and grads_ok)
        if action == "update":
            return
        applied = self.is_deepspeed_enabled and not self.accelerator.optimizer_step_was_skipped
        if action == "skip" and not applied:
            if not self.is_deepspeed_enabled:
                self._drop_gradients()
            self._nan_skipped += 1
            return
        blamed = gather_object(step.blamed(loss_nonfinite_anywhere=not loss_ok))  # every rank's, in rank order
        records = describe_records(blamed, getattr(self.train_dataset, "records", None))
        message = stop_message(self.state.global_step + 1, "gradient" if loss_ok else "loss", records,
                               newest_complete_checkpoint(self.args.output_dir))
        if applied:
            message += " (DeepSpeed applied this update: the weights are no longer to be trusted)"
        raise NonFiniteStep(message)

    def _drop_gradients(self) -> None:
        """Make the coming optimizer step a no-op: torch's optimizers pass over parameters without a
        gradient; fp16's loss scaler wants gradients to inspect, and skips the step on an infinite one."""
        for p in self.model.parameters():
            if p.grad is not None:
                if self.args.fp16:
                    p.grad.fill_(float("inf"))
                else:
                    p.grad = None

    # -- held-out evaluation: the training objective and its metrics on --eval_data_path ---------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, _, metrics = step_loss(model, inputs, self.objective, self.eval_reference or self.reference)
        if metrics:
            self._eval_names = sorted(metrics)
            rows = torch.stack([metrics[k].float() for k in self._eval_names], dim=1)  # [B, metrics]
            self._eval_rows.append(self.accelerator.gather_for_metrics(rows).cpu())
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        self.prepare_references()
        self._eval_rows = []
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._eval_rows:  # per-record means over the whole set (ranks' padding dropped by gather_for_metrics)
            means = torch.cat(self._eval_rows).mean(0).tolist()
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in zip(self._eval_names, means)})
        self._eval_rows = []
        return output

    # -- data and optimizer -----------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.group_by_modality_length:
            return ModalityLengthGroupedSampler(
                dataset.modality_lengths, self.args.train_batch_size,
                self.args.world_size * self.args.gradient_accumulation_steps, seed=self.args.seed,
            )
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = parameter_groups(
                opt_model, lr=self.args.learning_rate, weight_decay=self.args.weight_decay,
                decay_names=set(self.get_decay_parameter_names(opt_model)),
                projector_lr=self.args.mm_projector_lr, vision_lr=self.args.mm_vision_tower_lr,
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # -- saving: checkpoints (llava.train.saving.CheckpointWriter) and the LLaVA model itself, in HF format --

    def train(self, *args, **kwargs):
        # The checkpoint writer takes the saves other callbacks ask for: it goes last, after those added since.
        self.remove_callback(self.checkpoint_writer)
        self.add_callback(self.checkpoint_writer)
        return super().train(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The LLaVA model (not the wrapper the Trainer holds) as a directory ``from_pretrained`` loads.

        Every rank calls it: under DeepSpeed the weights are gathered first (ZeRO-3's 16-bit consolidation)."""
        output_dir = output_dir or self.args.output_dir
        state_dict, gathered = None, True
        if self.is_deepspeed_enabled:
            try:
                state_dict = self.accelerator.get_state_dict(self.model_wrapped)
            except ValueError:  # ZeRO-3 with stage3_gather_16bit_weights_on_model_save false: nothing to gather
                logger.warning("stage3_gather_16bit_weights_on_model_save=false: saving DeepSpeed's sharded checkpoint "
                               "in %s instead of the weights; zero_to_fp32.py there recovers them", output_dir)
                gathered = False
        if self.args.should_save:
            write_model_dir(self, output_dir, state_dict, weights=gathered)
        if not gathered:
            self.model_wrapped.save_checkpoint(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # -- publishing: every saved directory carries its card; push_to_hub uploads output_dir as saved --

    def create_model_card(self, **kwargs) -> None:
        """This run's card (``llava.train.model_card``) in place of the Trainer's generic one.

        ``Trainer.push_to_hub`` calls this just before it uploads ``output_dir``."""
        if self.card is None:
            return super().create_model_card(**kwargs)
        if self.is_world_process_zero():
            write_model_card(self.args.output_dir, self.card, self.state.log_history)
