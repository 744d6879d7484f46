"""The reference model's log-probabilities, three ways (``--reference_mode``).

* ``cached`` (default): computed once, before the first optimizer step, by the policy itself (at
  step 0 it *is* the starting checkpoint; LoRA adapters start as the identity), one record at a
  time, and stored on disk under a key of everything that changes the numbers (``train.reference_key``:
  weights, projector adapter, data, image files, tokenizer and image processor, template, negatives,
  precision). Training then holds no reference model, and a rerun with the same key reads the
  cache instead of recomputing it.
* ``live``: a frozen copy of the starting model run every step (sharded too under ZeRO-3).
* ``adapters_off``: the LoRA policy with its adapters disabled: no second copy of the weights.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from llava.fileio import remove_stale_temporaries, write_atomic
from llava.method import ConditionLogps
from llava.train.checkpoints import SaveError
from llava.train.pause_points import pause_at
from llava.train.policy import policy_logps


def cache_path(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"ref_logps_{digest}.pt"


@torch.no_grad()
def reference_pass(trainer, dataset=None) -> torch.Tensor:
    """``[N, C]`` log-probabilities of every record and condition of ``dataset`` (default: the
    training set) under the current model.

    One record per forward, as the released code computes its offline reference: a padded batch
    can shift a record's numbers slightly (other kernels and shapes, bf16 most of all), and the
    table must not depend on which records happened to share a batch. Every rank runs the same
    number of records (ZeRO-3 gathers parameters collectively) over its share; the shares are
    gathered so every rank holds the whole table.
    """
    acc, args = trainer.accelerator, trainer.args
    dataset = trainer.train_dataset if dataset is None else dataset
    collator = trainer.data_collator
    n, world, rank = len(dataset), acc.num_processes, acc.process_index
    mine = list(range(rank, n, world))
    mine += [mine[-1] if mine else 0] * (math.ceil(n / world) - len(mine))
    loader = DataLoader(Subset(dataset, mine), batch_size=1, collate_fn=collator,
                        num_workers=args.dataloader_num_workers)
    model = trainer.model_wrapped
    was_training = model.training
    model.eval()
    rows = []
    from tqdm.auto import tqdm

    for batch in tqdm(loader, desc="reference log-probs", disable=not acc.is_local_main_process):
        logps = policy_logps(model, trainer._prepare_inputs(batch))
        if logps.names != tuple(trainer.objective.conditions):
            raise ValueError(f"the reference pass scored {logps.names}, the objective reads {trainer.objective.conditions}")
        rows.append(logps.values.float())
        pause_at("reference", len(rows))
    model.train(was_training)
    local = torch.cat(rows)
    table = acc.gather(local).cpu()
    index = acc.gather(torch.tensor(mine, device=local.device)).cpu()
    out = torch.full((n, local.shape[1]), float("nan"))
    out[index] = table
    return out


class CachedReference:
    """``split`` is the trainer's dataset the table covers, ``train`` or ``eval``; each has its own cache file.

    The file appears whole or not at all: rank 0 writes it (``write_atomic``) once the pass is done and
    gathered. A pass killed midway leaves no cache, only perhaps ``write_atomic``'s temporary file,
    which the next run removes before it redoes the pass from the starting model (the checkpoints of a
    run have no reference to resume from before the cache exists: there are none before step 1).
    """

    def __init__(self, cache_dir: str | Path, key: dict, split: str = "train"):
        self.cache_dir, self.split = Path(cache_dir), split
        self.key = key if split == "train" else {**key, "split": split}
        self.path = cache_path(cache_dir, self.key)
        self.table: torch.Tensor | None = None
        self.reused = False

    def for_split(self, split: str) -> "CachedReference":
        return CachedReference(self.cache_dir, self.key, split)

    def prepare(self, trainer) -> None:
        n_conditions = len(self.key["conditions"])
        dataset = trainer.eval_dataset if self.split == "eval" else trainer.train_dataset
        if self.path.is_file():
            saved = read_cache(self.path)
            if saved["key"] != self.key or saved["logps"].shape != (len(dataset), n_conditions):
                raise ValueError(f"{self.path}: reference cache does not match this run; delete it to recompute")
            self.table, self.reused = saved["logps"], True
            return
        if trainer.state.global_step > 0:
            raise ValueError(
                f"resuming at step {trainer.state.global_step}, but the reference cache {self.path} is missing: the "
                "reference log-probabilities must come from the starting checkpoint, not from the resumed policy")
        self.table = reference_pass(trainer, dataset)
        if trainer.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.path)  # a write of this cache that a kill cut short
            # serialized in memory first, so that a failed write is an OSError naming the file (torch.save's is not)
            data = io.BytesIO()
            torch.save({"key": self.key, "logps": self.table}, data)
            try:
                write_atomic(self.path, data.getvalue())  # a killed run never leaves a half-written cache
            except OSError as e:
                raise SaveError(f"the reference cache {self.path} was not saved ({e.strerror}): make room and rerun "
                                "the same command (the reference pass is done again)") from e
        trainer.accelerator.wait_for_everyone()

    def logps(self, trainer, model, batch: dict) -> ConditionLogps:
        values = self.table[batch["index"].cpu()].to(batch["input_ids"].device)
        return ConditionLogps(values, tuple(self.key["conditions"]))


def read_cache(path: Path) -> dict:
    """A reference cache file's ``{"key", "logps"}``; one line naming the file if it cannot be read."""
    try:
        saved = torch.load(path, map_location="cpu")
        if not (isinstance(saved, dict) and {"key", "logps"} <= saved.keys()):
            raise ValueError("not a reference cache")
    except Exception as e:  # torch.load's errors for a damaged file are of many kinds
        raise ValueError(f"{path}: unreadable reference cache ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         "delete it to recompute") from e
    return saved


class LiveReference:
    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)

    def prepare(self, trainer) -> None:
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            self.model.to(trainer.args.device)
            return
        import deepspeed

        config = copy.deepcopy(plugin.deepspeed_config)
        for k in ("optimizer", "scheduler"):
            config.pop(k, None)
        if config.get("zero_optimization", {}).get("stage") != 3:
            config["zero_optimization"] = {"stage": 0}
        self.model, *_ = deepspeed.initialize(model=self.model, config=config)
        self.model.eval()

    @torch.no_grad()
    def logps(self, trainer, model, batch: dict) -> ConditionLogps:
        return policy_logps(self.model, batch)


class AdaptersOffReference:
    def prepare(self, trainer) -> None:
        pass

    @torch.no_grad()
    def logps(self, trainer, model, batch: dict) -> ConditionLogps:
        peft_model = trainer.accelerator.unwrap_model(model).llava
        with peft_model.disable_adapter():
            return policy_logps(model, batch)
