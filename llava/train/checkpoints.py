"""Checkpoints a preempted run resumes from: which one, whether anything is left to train, when to save.

``--resume_from_checkpoint`` takes a checkpoint directory, ``True`` (the newest complete checkpoint in
``--output_dir``, an error if there is none) or ``auto`` (the newest complete one if any, else a
fresh start: what the scripts pass, so that the same command run again continues a killed run).

A checkpoint is written whole or not at all: every rank writes into ``.tmp-checkpoint-N`` (model,
optimizer, scheduler, RNG states, DeepSpeed shards and ``latest``, ``trainer_state.json`` last), and
once all have, one process renames it to ``checkpoint-N`` (``publish``). A save killed at any moment
leaves a ``.tmp-`` directory, which no checkpoint glob matches and the next start removes
(``remove_unfinished_saves``); the checkpoints before it are untouched. ``steps_done`` still checks a
directory's ``trainer_state.json`` and DeepSpeed tag, for checkpoints written by other tools.
The final model in ``--output_dir`` is written in place (the directory also holds the checkpoints):
its ``trainer_state.json`` is removed before that save begins and written after it ends.

Whose run: ``OUTPUT_DIR/run.json`` (and a copy in each checkpoint) holds the run identity
(``train.run_identity``); ``claim_output_dir`` continues a directory only of the same identity and never
writes into one holding files of no run of this tool. Rank 0 holds ``OUTPUT_DIR/.lock``
(``llava.fileio.RunLock``) for the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llava.fileio import sync_folder, sync_tree

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
NEWEST = ("true", "latest")
AUTO = ("auto",)
NONE = ("", "false", "none", "never", "no")
# What a checkpoint holds besides the model directory itself: optimizer, scheduler, RNG, DeepSpeed.
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "latest", "zero_to_fp32.py", STATE_FILE)
STAGING_PREFIX = ".tmp-"  # .tmp-checkpoint-N: a checkpoint being written
REPLACED_SUFFIX = ".old"  # .tmp-checkpoint-N.old: an older checkpoint-N being replaced


class ResumeError(ValueError):
    pass


class SaveError(RuntimeError):
    """A checkpoint or the final model could not be written (a full disk, a quota, a file size limit)."""


# -- writing a checkpoint whole -------------------------------------------------------------------


def staging_dir(checkpoint: str | Path) -> Path:
    """Where ``checkpoint`` is written before ``publish`` renames it into place (the same folder: a rename
    across file systems is not atomic)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(STAGING_PREFIX + checkpoint.name)


def publish(staging: Path, checkpoint: Path) -> None:
    """Rename a fully written ``staging`` directory to ``checkpoint``, its files flushed to disk first.

    An existing ``checkpoint`` (a run resumed from an earlier one) is moved aside, then removed: a kill
    in between leaves the other checkpoints and a ``.tmp-`` directory the next start removes.
    """
    sync_tree(staging)
    replaced = None
    if checkpoint.exists():
        replaced = staging.with_name(staging.name + REPLACED_SUFFIX)
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(checkpoint, replaced)
    os.replace(staging, checkpoint)
    sync_folder(checkpoint.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def remove_unfinished_saves(output_dir: str | Path) -> list[Path]:
    """Remove the ``.tmp-checkpoint-*`` directories that saves killed midway left in ``output_dir``.

    Call it from one process, when no save is running (before training starts).
    """
    found = sorted(Path(output_dir).glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"))
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    if found:
        logger.info("removed %d unfinished checkpoint save(s) of a killed run: %s", len(found),
                    ", ".join(p.name for p in found))
    return found


def last_written_file(folder: Path) -> Path | None:
    """The most recently modified file under ``folder``: after a failed save, the one whose write failed."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)


def save_failure(what: str, folder: Path, error: BaseException, output_dir: str | Path) -> SaveError:
    """One line saying what was not saved, which file failed and why, and what a rerun resumes from."""
    failed = last_written_file(folder)
    newest = newest_complete_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    resume = f"{newest} is the newest complete checkpoint" if newest else "there is no complete checkpoint yet"
    where = f"writing {failed}" if failed else f"writing into {folder}"
    return SaveError(f"{what} was not saved: {where} failed ({write_failure_cause(failed or folder, error)}); "
                     f"{resume}: make room and rerun the same command to continue")


def write_failure_cause(path: Path, error: BaseException) -> str:
    """Why writing ``path`` failed, in words: torch.save's own error ("unexpected pos ...") does not say.

    A file that stopped at the process's file size limit (``ulimit -f``) or a disk with (almost) no
    space left is named as such; otherwise the operating system's reason, else the error's first line.
    """
    import resource

    soft_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        size = path.stat().st_size if path.is_file() else 0
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        size, free = 0, None
    if soft_limit != resource.RLIM_INFINITY and size >= soft_limit:
        return f"the file size limit of {soft_limit} bytes (ulimit -f) was reached"
    if free is not None and free < FULL_DISK_BYTES:
        return f"the disk is full: {free / 2**20:.0f} MiB free"
    reason = next((e.strerror for e in _chain(error) if isinstance(e, OSError) and e.strerror), None)
    return reason or (str(error).strip().splitlines() or [type(error).__name__])[0]


FULL_DISK_BYTES = 64 << 20  # less free space than this after a failed write: the disk was the cause


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def discard_final_model_marker(output_dir: str | Path) -> None:
    """Remove ``output_dir``'s ``trainer_state.json`` before the final model is written over an older one.

    The file marks a finished final save; a save killed midway must not leave an older marker beside
    half-written weights.
    """
    (Path(output_dir) / STATE_FILE).unlink(missing_ok=True)


def steps_done(checkpoint: str | Path) -> int | None:
    """The global step a checkpoint was saved at, or None if its save did not complete."""
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # DeepSpeed writes its ``latest`` tag once every rank's shards are on disk.
    if any(checkpoint.glob("global_step*")) and not (checkpoint / "latest").is_file():
        return None
    return step


def newest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    found = []
    for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        number = path.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if path.is_dir() and number.isdigit() and steps_done(path) is not None:
            found.append((int(number), path))
    return max(found)[1] if found else None


def resolve_resume(value: str | bool | None, output_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint VALUE`` means for a run writing to ``output_dir``."""
    if value is None or value is False:
        return None
    word = str(value).strip().lower()
    if word in NONE:
        return None
    if word in NEWEST + AUTO:
        newest = newest_complete_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if newest is None and word in NEWEST:
            raise ResumeError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}")
        return newest
    path = Path(value)
    if not path.is_dir():
        raise ResumeError(f"--resume_from_checkpoint {value}: no such directory")
    if steps_done(path) is None:
        raise ResumeError(f"--resume_from_checkpoint {value}: not a complete checkpoint (no readable {STATE_FILE})")
    return path


def copy_final_model(checkpoint: Path, output_dir: Path) -> None:
    """The model of a checkpoint taken at the last step, as the run's final model in ``output_dir``.

    A run killed after its last checkpoint but before the final save finishes this way; its
    ``trainer_state.json`` goes last, as the Trainer's does, marking the copy complete.
    """
    discard_final_model_marker(output_dir)
    for item in checkpoint.iterdir():
        if item.name in TRAINING_STATE or item.name.startswith(("global_step", "rng_state")):
            continue
        if item.is_dir():
            shutil.copytree(item, output_dir / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, output_dir / item.name)
    shutil.copy2(checkpoint / STATE_FILE, output_dir / STATE_FILE)


class SaveAtEpochEnd(TrainerCallback):
    """``--save_at_epoch_end``: a checkpoint at each epoch's end on top of the step-based ones.

    The released runs save once per epoch; saving every ``--save_steps`` as well bounds what a
    preemption loses. An epoch that ends on a step just saved is not saved twice.
    """

    def __init__(self):
        self.saved_at = -1

    def on_save(self, args, state, control, **kwargs):
        self.saved_at = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.save_strategy != "no" and state.global_step != self.saved_at:
            control.should_save = True
        return control


class ReplayEpochOrder(TrainerCallback):
    """Tells the training sampler which epoch is starting, resumed epochs included.

    The grouped sampler's order is a function of (seed, epoch). After a resume inside an epoch the
    Trainer skips the batches already trained through a wrapper that does not pass ``set_epoch``
    on to a sampler sharded over several processes, so that epoch would replay epoch 0's order.
    The epoch in progress is the integer part of ``state.epoch`` when an epoch begins.
    """

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        sampler = epoch_sampler(train_dataloader)
        if sampler is not None:
            sampler.set_epoch(math.floor(state.epoch or 0))


def epoch_sampler(loader):
    """The innermost object with ``set_epoch`` under a data loader's (batch) samplers, if any."""
    found, node, seen = None, loader, set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if node is not loader and hasattr(node, "set_epoch"):
            found = node
        inner = getattr(node, "batch_sampler", None)
        node = inner if inner is not None else getattr(node, "sampler", None)
    return found


# -- multi-node runs: one OUTPUT_DIR every node sees ------------------------------------------------

SHARED_CHECK_SECONDS = 5.0  # how long a rank looks for rank 0's marker (a network file system may lag)


def spans_nodes(env: dict) -> bool:
    """Whether the launcher's world spans several nodes: more ranks in all than on this node.

    torchrun says how many run here in ``LOCAL_WORLD_SIZE``; DeepSpeed's launcher (also with
    ``--no_ssh --node_rank``) in ``LOCAL_SIZE``. With neither, the world may span nodes.
    """
    world = int(env.get("WORLD_SIZE") or 1)
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE")
    return world > 1 and (local is None or world > int(local))


def check_output_dir_shared(output_dir: str | Path) -> None:
    """Stop every rank, with one line, when the nodes do not share ``output_dir``.

    The reference cache, the checkpoints and the final model are written once, by rank 0, and read
    by every rank: a separate local directory per node cannot work. Rank 0 writes a marker named by
    a random token, all ranks wait for it, each looks for it, and all learn whether any failed.
    Call it once the process group is up; a single-node world returns at once.
    """
    if not (dist.is_available() and dist.is_initialized()) or not spans_nodes(os.environ):
        return
    directory = Path(output_dir).resolve()
    token = [None]
    if dist.get_rank() == 0:
        token[0] = secrets.token_hex(16)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f".shared-check-{token[0]}").write_text(token[0])
    dist.broadcast_object_list(token, src=0)  # after rank 0's write: the marker exists once the token arrives
    marker = directory / f".shared-check-{token[0]}"
    deadline = time.monotonic() + SHARED_CHECK_SECONDS
    while not (seen := _reads(marker, token[0])) and time.monotonic() < deadline:
        time.sleep(0.5)
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if dist.get_rank() == 0:
        marker.unlink(missing_ok=True)
    blind = [f"rank {rank} on {host}" for rank, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise FileNotFoundError(f"OUTPUT_DIR {directory} is not shared between the nodes ({', '.join(blind)} cannot see "
                                "the file rank 0 wrote there): multi-node runs need a shared file system (docs/training.md#on-a-cluster)")


def _reads(marker: Path, token: str) -> bool:
    try:
        return marker.read_text() == token
    except OSError:
        return False


# -- whose run: the identity of the run an OUTPUT_DIR holds -------------------------------------------

IDENTITY_FILE = "run.json"  # in OUTPUT_DIR and in each checkpoint: the settings that define the run's result
LOCK_FILE = ".lock"
# What this tool writes into OUTPUT_DIR before it writes the run's identity (a run stopped before step 1)
BEFORE_IDENTITY = (LOCK_FILE, "skipped_records.jsonl", "train.log", "ref_logps")
BEFORE_IDENTITY_PREFIXES = ("error-rank", STAGING_PREFIX, ".shared-check-")


class OutputDirError(ValueError):
    """OUTPUT_DIR holds something this run must not continue or write over."""


def read_identity(folder: str | Path) -> dict | None:
    try:
        return json.loads((Path(folder) / IDENTITY_FILE).read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def differing(saved: dict, current: dict) -> list[str]:
    """The settings, by name, whose values differ between two run identities."""
    return sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))


def claim_output_dir(output_dir: str | Path, identity: dict, overwrite: bool) -> None:
    """Make ``output_dir`` this run's before any model loads; call it from rank 0.

    Continued (a checkpoint resumed, files written over) only when its ``run.json`` is this run's
    identity. Refused in one line: a directory holding files no run of this tool wrote (not even with
    ``--overwrite_output_dir``: they are not ours to discard), another run's directory, or one without
    an identity (written by another tool or an older version). ``--overwrite_output_dir`` starts afresh
    in a run's directory: its checkpoints and final-model marker are removed, so no later resume takes them.
    """
    folder = Path(output_dir)
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    saved = read_identity(folder)
    if saved is None:  # checkpoints copied into a new directory carry their run's identity
        found = [read_identity(folder / n) for n in names if n.startswith(f"{PREFIX_CHECKPOINT_DIR}-")]
        saved = found[0] if found and all(f is not None and f == found[0] for f in found) else None
    if saved is None:
        others = [n for n in names if n not in BEFORE_IDENTITY and not n.startswith(BEFORE_IDENTITY_PREFIXES)]
        runs = [n for n in others if n == STATE_FILE or n.startswith(f"{PREFIX_CHECKPOINT_DIR}-")]
        if others and not runs:
            raise OutputDirError(f"--output_dir {folder} holds files no training run of this tool wrote ({', '.join(others[:3])}"
                                 f"{', ...' if len(others) > 3 else ''}): nothing is written there, not even with "
                                 "--overwrite_output_dir; choose another --output_dir")
        if runs and not overwrite:
            raise OutputDirError(f"--output_dir {folder} holds a training run without a run identity (no {IDENTITY_FILE}: "
                                 "another tool or an older version): use another --output_dir, or --overwrite_output_dir "
                                 "to start afresh there")
    elif saved != identity and not overwrite:
        raise OutputDirError(f"--output_dir {folder} holds another run (differs in {', '.join(differing(saved, identity))}): "
                             "use another --output_dir, or --overwrite_output_dir to start afresh there")
    if overwrite:
        for name in names:
            if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-"):
                shutil.rmtree(folder / name, ignore_errors=True)
        discard_final_model_marker(folder)
    if overwrite or read_identity(folder) != identity:
        from llava.fileio import write_atomic

        try:
            folder.mkdir(parents=True, exist_ok=True)
            record = {"tool": "llava-mcmdpo train", "identity": identity}
            write_atomic(folder / IDENTITY_FILE, json.dumps(record, indent=1) + "\n")
        except OSError as e:
            raise SaveError(f"the run identity {folder / IDENTITY_FILE} was not saved ({e.strerror or e}): make room and "
                            "rerun the same command") from e
