"""Preparing the reference before step 1 (``--reference_mode``; the references themselves: ``llava.train.step``).

* ``cached`` (default): the log-probabilities are computed once, before the first optimizer step, by
  the policy itself (at step 0 it *is* the starting checkpoint; LoRA adapters start as the identity),
  one record at a time, and stored on disk under a key of everything that changes the numbers
  (``train.reference_key``: weights, projector adapter, data, image files, tokenizer and image
  processor, template, negatives, precision). Training then holds no reference model, and a rerun
  with the same key reads the cache instead of recomputing it (``cached_table``).
* ``live``: a frozen copy of the starting model, set up under DeepSpeed as the policy is (``frozen_copy``).
* ``adapters_off``: the LoRA policy with its adapters disabled: nothing to prepare.

``ReferenceSetup`` is what preparation reads from the run; the trainer fills it once the policy is
wrapped, and nothing here reaches into the trainer.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, Dataset, Subset

from llava.fileio import remove_stale_temporaries, write_atomic
from llava.train.checkpoints import SaveError
from llava.train.pause_points import pause_at


@dataclass(frozen=True)
class ReferenceSetup:
    """What preparing a reference reads from the run, once the policy is wrapped (DeepSpeed, DDP)."""

    policy: torch.nn.Module  # the ScoringModel as the trainer runs it, at its starting weights
    accelerator: Accelerator
    collator: Callable[[list], dict]
    datasets: Mapping[str, Dataset] = field(default_factory=dict)  # "train", and "eval" when there is one
    num_workers: int = 0
    global_step: int = 0  # > 0 when a run resumes


def cache_path(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"ref_logps_{digest}.pt"


@torch.no_grad()
def reference_pass(setup: ReferenceSetup, dataset: Dataset, conditions: tuple[str, ...]) -> torch.Tensor:
    """``[N, C]`` log-probabilities of every record of ``dataset`` and each of ``conditions`` under the
    policy as it is now.

    One record per forward, as the released code computes its offline reference: a padded batch
    can shift a record's numbers slightly (other kernels and shapes, bf16 most of all), and the
    table must not depend on which records happened to share a batch. Every rank runs the same
    number of records (ZeRO-3 gathers parameters collectively) over its share; the shares are
    gathered so every rank holds the whole table.
    """
    acc, model = setup.accelerator, setup.policy
    n, world, rank = len(dataset), acc.num_processes, acc.process_index
    mine = list(range(rank, n, world))
    mine += [mine[-1] if mine else 0] * (math.ceil(n / world) - len(mine))
    loader = DataLoader(Subset(dataset, mine), batch_size=1, collate_fn=setup.collator, num_workers=setup.num_workers)
    was_training = model.training
    model.eval()
    rows = []
    from tqdm.auto import tqdm

    for batch in tqdm(loader, desc="reference log-probs", disable=not acc.is_local_main_process):
        if tuple(batch["conditions"]) != tuple(conditions):
            raise ValueError(f"the reference pass scores {tuple(batch['conditions'])}, the objective reads {conditions}")
        rows.append(model(**send_to_device(batch, acc.device)).float())
        pause_at("reference", len(rows))
    model.train(was_training)
    local = torch.cat(rows)
    table = acc.gather(local).cpu()
    index = acc.gather(torch.tensor(mine, device=local.device)).cpu()
    out = torch.full((n, local.shape[1]), float("nan"))
    out[index] = table
    return out


def cached_table(path: Path, key: dict, setup: ReferenceSetup, dataset: Dataset) -> tuple[torch.Tensor, bool]:
    """The reference table of ``dataset`` under ``key``, and whether it was read from ``path`` rather than computed.

    The file appears whole or not at all: rank 0 writes it (``write_atomic``) once the pass is done and
    gathered. A pass killed midway leaves no cache, only perhaps ``write_atomic``'s temporary file,
    which the next run removes before it redoes the pass from the starting model (the checkpoints of a
    run have no reference to resume from before the cache exists: there are none before step 1).
    """
    conditions = tuple(key["conditions"])
    if path.is_file():
        saved = read_cache(path)
        if saved["key"] != key or saved["logps"].shape != (len(dataset), len(conditions)):
            raise ValueError(f"{path}: reference cache does not match this run; delete it to recompute")
        return saved["logps"], True
    if setup.global_step > 0:
        raise ValueError(
            f"resuming at step {setup.global_step}, but the reference cache {path} is missing: the "
            "reference log-probabilities must come from the starting checkpoint, not from the resumed policy")
    table = reference_pass(setup, dataset, conditions)
    if setup.accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)  # a write of this cache that a kill cut short
        # serialized in memory first, so that a failed write is an OSError naming the file (torch.save's is not)
        data = io.BytesIO()
        torch.save({"key": key, "logps": table}, data)
        try:
            write_atomic(path, data.getvalue())  # a killed run never leaves a half-written cache
        except OSError as e:
            raise SaveError(f"the reference cache {path} was not saved ({e.strerror}): make room and rerun "
                            "the same command (the reference pass is done again)") from e
    setup.accelerator.wait_for_everyone()
    return table, False


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


def frozen_copy(model: torch.nn.Module, setup: ReferenceSetup) -> torch.nn.Module:
    """The live reference ``model`` ready to run beside the policy: on its device, or in an inference-only
    DeepSpeed engine (ZeRO-3 shards it as it shards the policy; other stages hold it whole)."""
    plugin = getattr(setup.accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return model.to(setup.accelerator.device)
    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    for k in ("optimizer", "scheduler"):
        config.pop(k, None)
    if config.get("zero_optimization", {}).get("stage") != 3:
        config["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeed's engine.eval() returns None, not the engine
    return engine
