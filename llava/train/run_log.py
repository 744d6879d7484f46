"""What a training run says and keeps: its plan, its log file, and the frameworks' noise left out.

* ``plan_lines``: what the run is about to use (model, data, images, output, task, settings file, ZeRO
  config, precision, processes, resume), logged by rank 0 before anything heavy starts.
* ``quiet_frameworks``: warnings that tell the user nothing (deprecations inside transformers, torch and
  DeepSpeed) are dropped; the other frameworks' records are shown once per run, by rank 0 only (every
  rank used to print each one).
* ``TrainLog``: rank 0's log records, from the start of the process, appended to ``OUTPUT_DIR/train.log``
  once the run has begun (an input error before that leaves no directory behind). A resumed run
  appends to the same file. The logged metrics of each step go to the file too, not to the console
  (the progress bar shows them there).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TRAIN_LOG = "train.log"
REPO = Path(__file__).resolve().parents[2]
SAMPLE_DATA = REPO / "data" / "sample"

# Warnings about names used inside the frameworks (or the published flag --gradient_checkpointing, which
# this toolkit accepts as it is): nothing a user can act on.
NOISE = (
    r"`gradient_checkpointing` is deprecated",
    r"`torch\.distributed\.\w+` is deprecated",
)
FRAMEWORKS = ("DeepSpeed", "accelerate", "transformers", "torch")
# setuptools' compiler probes, which DeepSpeed runs on import (gcc command lines)
DROPPED = ("compilers",)
# set by the launcher (llava.train.launch), which printed the plan before launching: the trainer's goes to train.log only
PLAN_SHOWN = "LLAVA_MCMDPO_PLAN_SHOWN"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OncePerRun(logging.Filter):
    """Rank 0: each framework message once. Other ranks: errors only (rank 0 says the rest)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank, self.seen = rank, set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if self.rank != 0 or record.name.startswith(DROPPED):
            return False
        if not record.name.startswith(FRAMEWORKS):
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextmanager
def quiet_frameworks(rank: int) -> Iterator[OncePerRun]:
    """The filters, for the length of a run (``main`` may run more than once in a process: tests, notebooks);
    yields the logging filter, for handlers made later."""
    from transformers.utils import logging as hf_logging

    once = OncePerRun(rank)
    # DeepSpeed logs to its own "DeepSpeed" logger, which does not propagate: filtered at the logger, which
    # exists (and keeps its filters) before DeepSpeed adds its handler on import; transformers' library
    # logger does not propagate either.
    targets = [logging.getLogger("DeepSpeed"), *logging.getLogger().handlers, *hf_logging.get_logger().handlers]
    with warnings.catch_warnings():
        for message in NOISE:
            warnings.filterwarnings("ignore", message=message)
        if rank != 0:
            warnings.simplefilter("ignore")  # rank 0 shows them
        for target in targets:
            target.addFilter(once)
        try:
            yield once
        finally:
            for target in targets:
                target.removeFilter(once)


class TrainLog(logging.Handler):
    """Rank 0's records, held until ``open`` names the run's directory, then appended to ``train.log`` there."""

    def __init__(self, once: OncePerRun | None = None):
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))
        if once is not None:
            self.addFilter(once)
        self.pending: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self.loggers: list[logging.Logger] = []

    def attach(self) -> TrainLog:
        """Receive the records of the root logger and of transformers' and DeepSpeed's (which do not propagate)."""
        from transformers.utils import logging as hf_logging

        self.loggers = [logging.getLogger(), hf_logging.get_logger(), logging.getLogger("DeepSpeed"), metrics_logger()]
        for logger in self.loggers:
            logger.addHandler(self)
        return self

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        elif len(self.pending) < 100_000:
            self.pending.append(record)

    def open(self, output_dir: str | Path) -> Path:
        path = Path(output_dir) / TRAIN_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(path, mode="a", encoding="utf-8")
        self.file.setFormatter(self.formatter)
        for record in self.pending:
            self.file.emit(record)
        self.pending.clear()
        return path

    def close(self) -> None:
        """Leave the loggers and close the file."""
        for logger in self.loggers:
            logger.removeHandler(self)
        if self.file is not None:
            self.file.close()
        super().close()


def metrics_logger() -> logging.Logger:
    """The log file's own logger (no console): the command, each step's metrics, the run's end."""
    logger = logging.getLogger("llava.train.log")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def log_metrics(step: int, logs: dict) -> None:
    metrics_logger().info("step %d: %s", step, json.dumps(logs, default=str))


def precision_of(args) -> str:
    kind = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return kind + (" (TF32 matmuls)" if args.tf32 else "")


def settings_file(argv: list[str]) -> str | None:
    from llava.train.arguments import is_config

    return next((a for a in argv if is_config(a)), None)


def resume_decision(args) -> str:
    from llava.train.checkpoints import resolve_resume

    checkpoint = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if checkpoint is not None:
        return f"continues from {checkpoint} (--resume_from_checkpoint {args.resume_from_checkpoint})"
    return f"afresh (--resume_from_checkpoint {args.resume_from_checkpoint}: no complete checkpoint in the output dir)"


def plan_lines(model_args, data_args, args, argv: list[str]) -> tuple[list[str], str | None]:
    """``(lines, warning)``: the run's plan, and a loud line when a model given on the command line meets the
    bundled sample data of a settings file."""
    from llava.train.arguments import given_flags
    from llava.train.model_card import stage_of

    per_node = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or args.world_size)
    nodes = max(1, args.world_size // max(1, per_node))
    config = settings_file(argv)
    sample = Path(data_args.data_path).resolve().is_relative_to(SAMPLE_DATA)
    lines = [
        "plan of this run:",
        f"  model         {model_args.model_name_or_path}",
        f"  data          {data_args.data_path}" + ("   (the bundled sample)" if sample else ""),
        f"  image folder  {data_args.image_folder}",
        f"  output dir    {args.output_dir}",
        f"  task          {stage_of(args)}" + (f", settings {config}" if config else ""),
        f"  ZeRO config   {args.deepspeed or 'none (no DeepSpeed)'}",
        f"  precision     {precision_of(args)}",
        f"  processes     {per_node} per node, {nodes} node(s) ({'GPU' if args.device.type == 'cuda' else 'CPU'})",
        f"  resume        {resume_decision(args)}",
    ]
    given = given_flags(argv)
    warning = None
    if sample and config and "model_name_or_path" in given and "data_path" not in given:
        warning = (f"--model_name_or_path {model_args.model_name_or_path} trains on THE BUNDLED SAMPLE DATA "
                   f"({data_args.data_path}, from {config}): give --data_path, --image_folder and --output_dir for your data")
    return lines, warning
