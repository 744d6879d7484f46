"""``llava-mcmdpo train CONFIG --nproc N [--zero 2|3|3_offload]``: the trainer under DeepSpeed's launcher.

    llava-mcmdpo train configs/mcmdpo.yaml --nproc 4                        # ZeRO-3 (released), one node
    llava-mcmdpo train configs/sft.yaml --nproc 8 --zero 2 --max_steps 2    # trainer flags pass through
    llava-mcmdpo train configs/dpo.yaml --nproc 4 --nnodes 2 --node_rank 0 --master_addr node-a  # each node (SLURM)
    llava-mcmdpo train configs/dpo.yaml --nproc 4 --dry_run                 # print the command, start nothing

Under the launcher, ``--global_batch G`` (among the trainer's words) becomes the accumulation that keeps a
global batch of G whatever the process count (scripts/pretrain.sh's GLOBAL_BATCH).

Without ``--nproc`` (or with ``--nproc 1`` and no ``--zero``) the run stays in this process, without
DeepSpeed. This module assembles the launcher's command (which launcher, the DeepSpeed config, the
precision flags, the data-loader workers, the GPUs of ``CUDA_VISIBLE_DEVICES``) and replaces this
process with it (DeepSpeed's own ``deepspeed`` runner spawns the ranks). The stage scripts
(``scripts/*.sh``) call it with their environment variables as these flags; with ``--script`` it names
them in its messages and prints the script's plan first.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO / "llava" / "train" / "train.py"
ZERO_NAMES = {"2": "zero2", "3": "zero3", "3_offload": "zero3_offload"}  # --zero 2 means scripts/zero2.json
PRECISION_FLAGS = {"bf16": ["--bf16", "True", "--fp16", "False"], "fp16": ["--bf16", "False", "--fp16", "True"],
                   "fp32": ["--bf16", "False", "--fp16", "False"]}
# How an option is named in messages: its flag, or the stage scripts' variable (--script).
VARIABLES = {"nproc": "NUM_GPUS", "zero": "ZERO", "precision": "PRECISION", "node_rank": "NODE_RANK",
             "master_addr": "MASTER_ADDR", "hostfile": "HOSTFILE"}
TASKS = {"sft.sh": "SFT", "dpo.sh": "DPO", "mcmdpo.sh": "MCM-DPO", "pretrain.sh": "projector alignment (stage 1)"}
PLAN_PATHS = (("model", "MODEL_PATH", "--model_name_or_path"), ("data", "DATA_PATH", "--data_path"),
              ("image folder", "IMAGE_FOLDER", "--image_folder"), ("output dir", "OUTPUT_DIR", "--output_dir"))


class LaunchError(ValueError):
    """A launch that cannot start, said in one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llava-mcmdpo train", add_help=False, allow_abbrev=False,
                                usage="llava-mcmdpo train [SETTINGS.yaml] --nproc N [--zero 2|3|3_offload] "
                                      "[--nnodes N --node_rank R --master_addr A] [--flag value ...]")
    p.add_argument("--nproc", help="processes per node, one per GPU (CPU processes without CUDA); default: the GPUs "
                                   "torch sees, else 1")
    p.add_argument("--nnodes", type=int, default=1, help="nodes; without --hostfile each node starts its own launcher "
                                                           "(--node_rank, --master_addr: SLURM's srun)")
    p.add_argument("--node_rank", help="this node's rank (0 .. nnodes-1); no ssh")
    p.add_argument("--master_addr", help="address of node 0, with --node_rank")
    p.add_argument("--master_port", default="29500", help="rendezvous port")
    p.add_argument("--hostfile", help="DeepSpeed hostfile of a multi-node run")
    p.add_argument("--zero", help="2 | 3 | 3_offload (scripts/zeroN.json; default 3, as released) or a DeepSpeed config file")
    p.add_argument("--precision", help="bf16 | fp16 | fp32 (default: bf16 with CUDA, fp32 without); --tf32 on NVIDIA GPUs")
    p.add_argument("--num_workers", help="--dataloader_num_workers (default 4 with CUDA, 0 without)")
    p.add_argument("--python", default=sys.executable, help="the interpreter whose deepspeed runner and torch the run uses")
    p.add_argument("--dry_run", action="store_true", help="print the launch command (shell-quoted), start nothing")
    # The stage scripts' own: their name (plan, messages by variable), the path variables left at the
    # script's defaults, whether MODEL_PATH is a model of the caller's, how many trailing words are the caller's.
    p.add_argument("--script", help=argparse.SUPPRESS)
    p.add_argument("--defaulted", default="", help=argparse.SUPPRESS)  # comma-separated variable names
    p.add_argument("--own_model", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--caller_arguments", type=int, default=0, help=argparse.SUPPRESS)
    return p


LAUNCH_OPTIONS = {s for a in build_parser()._actions for s in a.option_strings}


def wants_launch(argv: list[str]) -> bool:
    """Does ``llava-mcmdpo train ARGV`` name the launcher? ``--nproc 1`` alone does not (one process runs here)."""
    names = {w.split("=", 1)[0] for w in argv if w.startswith("--")} & LAUNCH_OPTIONS
    return bool(names) and not (names == {"--nproc"} and build_parser().parse_known_args(argv)[0].nproc == "1")


def starts_processes(options: argparse.Namespace) -> bool:
    """Do the options ask for DeepSpeed's launcher (rather than only say how it would run)?"""
    return (options.nproc not in (None, "1") or options.zero is not None or options.nnodes > 1 or bool(options.hostfile)
            or bool(options.script))


def without_nproc_1(argv: list[str]) -> list[str]:
    """``argv`` without a ``--nproc 1`` (the in-process run)."""
    out, skip = [], False
    for i, w in enumerate(argv):
        if skip:
            skip = False
        elif w == "--nproc" and i + 1 < len(argv):
            skip = True
        elif not w.startswith("--nproc="):
            out.append(w)
    return out


@dataclass(frozen=True)
class Host:
    """What the launch depends on: the GPUs torch sees in the run's interpreter, the cores, the GPU mask."""

    gpus: int
    cpus: int
    visible: str | None = None

    @property
    def cuda(self) -> bool:
        return self.gpus > 0

    @classmethod
    def probe(cls, python: str) -> Host:
        return cls(gpu_count(python), len(os.sched_getaffinity(0)), os.environ.get("CUDA_VISIBLE_DEVICES") or None)


def gpu_count(python: str) -> int:
    """``torch.cuda.device_count()`` in ``python`` (another interpreter is asked); 0 when it cannot say."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        try:
            import torch

            return torch.cuda.device_count()
        except Exception:  # noqa: BLE001 -- no usable torch: a host without GPUs, as the launcher sees it
            return 0
    try:
        out = subprocess.run([python, "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True,
                             text=True, timeout=120).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 0
    return int(out) if out.isdigit() else 0


@dataclass
class Launch:
    """The launcher's options (``build_parser``) and the trainer's words; ``command`` assembles the launch."""

    options: argparse.Namespace
    trainer: list[str] = field(default_factory=list)
    cwd: Path = field(default_factory=Path.cwd)

    def settings(self) -> str | None:
        """The settings file, when the trainer's words start with one (the trainer reads it before the flags;
        arguments.is_config says the same, without importing transformers here)."""
        first = self.trainer[0] if self.trainer else ""
        return first if not first.startswith("-") and first.lower().endswith((".yaml", ".yml")) else None

    def said(self, key: str, value) -> str:
        """How the caller set an option: ``--nproc 3``, or ``NUM_GPUS=3`` from a stage script."""
        return f"{VARIABLES[key]}={value}" if self.options.script else f"--{key} {value}"

    def name(self, key: str) -> str:
        return VARIABLES[key] if self.options.script else f"--{key}"

    def nproc(self, host: Host) -> int:
        given = self.options.nproc
        if given is None:
            return host.gpus if host.cuda else 1
        if not given.isdigit() or int(given) == 0:
            raise LaunchError(f"{self.name('nproc')} must be a positive number (got {given})")
        return int(given)

    def zero_config(self) -> Path:
        zero = self.options.zero or "zero3"
        if zero.endswith(".json"):
            config = self.cwd / zero  # an absolute path stays as it is
        else:
            config = REPO / "scripts" / f"{ZERO_NAMES.get(zero, zero)}.json"
        if not config.is_file():
            raise LaunchError(f"no DeepSpeed config {config} ({self.said('zero', zero)})")
        return config

    def precision(self, host: Host) -> str:
        precision = self.options.precision or ("bf16" if host.cuda else "fp32")
        if precision not in PRECISION_FLAGS:
            raise LaunchError(f"{self.name('precision')} must be bf16, fp16 or fp32 (got {precision})")
        return precision

    def hostfile(self, nproc: int) -> str | None:
        """The hostfile: the one given, or for ``--nnodes N`` one of N lines (with --node_rank the names are not
        looked up: each node runs its own launcher)."""
        o = self.options
        if o.hostfile:
            return str(self.cwd / o.hostfile)
        if o.nnodes <= 1:
            return None
        if o.node_rank is None:
            raise LaunchError("--nnodes without --hostfile starts one launcher per node: give --node_rank and --master_addr")
        path = Path(tempfile.gettempdir()) / f"llava-mcmdpo-hostfile-{o.nnodes}x{nproc}"
        path.write_text("".join(f"node{i} slots={nproc}\n" for i in range(o.nnodes)))
        return str(path)

    def launcher(self, host: Host, nproc: int) -> tuple[list[str], list[str]]:
        """(environment assignments, the launcher's words up to the script)."""
        o = self.options
        runner = Path(o.python).parent / "deepspeed"
        words = [str(runner) if os.access(runner, os.X_OK) else "deepspeed"]
        env = []
        hostfile = self.hostfile(nproc)
        if hostfile:
            words += ["--hostfile", hostfile]
            if o.hostfile and o.nnodes > 1:
                words += ["--num_nodes", str(o.nnodes)]
            if o.node_rank is not None:  # each node starts its own launcher (srun): no ssh
                if not o.master_addr:
                    raise LaunchError(f"{self.name('master_addr')} is needed with {self.name('node_rank')}")
                words += ["--no_ssh", "--node_rank", o.node_rank, "--master_addr", o.master_addr]
        elif host.cuda and host.visible:
            # DeepSpeed's --num_gpus would take GPUs 0..N-1 whatever the mask says; without it the
            # launcher runs on the GPUs CUDA_VISIBLE_DEVICES lists.
            visible = [gpu.strip() for gpu in host.visible.split(",") if gpu.strip()]  # "2,3," lists two
            if nproc > len(visible):
                raise LaunchError(f"{self.said('nproc', nproc)} but CUDA_VISIBLE_DEVICES={host.visible} lists "
                                  f"{len(visible)} GPU(s)")
            env = [f"CUDA_VISIBLE_DEVICES={','.join(visible[:nproc])}"]
        elif host.cuda and nproc > host.gpus:
            raise LaunchError(f"{self.said('nproc', nproc)} but this host has {host.gpus} GPU(s)")
        else:
            words += ["--num_gpus", str(nproc)]
        return env, words + ["--master_port", o.master_port]

    def command(self, host: Host) -> tuple[list[str], list[str]]:
        """(environment assignments, the command): the launcher, the trainer, the settings file first (the
        trainer reads it before the flags), then the DeepSpeed config, precision and workers, then the
        trainer's words (later words win)."""
        nproc = self.nproc(host)
        flags = PRECISION_FLAGS[self.precision(host)] + (["--tf32", "True"] if host.cuda else [])
        config = self.zero_config()
        env, launcher = self.launcher(host, nproc)
        workers = self.options.num_workers or ("4" if host.cuda else "0")
        settings, rest = (self.trainer[:1], self.trainer[1:]) if self.settings() else ([], self.trainer)
        flags += ["--dataloader_num_workers", workers]
        return env, [*launcher, str(TRAIN_PY), *settings, "--deepspeed", str(config), *flags, *global_batch(rest, nproc)]

    def plan(self, host: Host) -> list[str]:
        """The stage script's plan: what the run is about to use, before anything heavy starts."""
        o, nproc = self.options, self.nproc(host)
        marks = {}
        for _, variable, _ in PLAN_PATHS:
            if variable in o.defaulted.split(","):
                marks[variable] = ("   <- THE BUNDLED SAMPLE'S DEFAULT, not your data (SAMPLE_DATA=1)" if o.own_model
                                   else "   (default)")
        task = TASKS.get(o.script, "see the settings") + (f", settings {self.settings()}" if self.settings() else "")
        hostfile = self.hostfile(nproc)
        nodes = (sum(1 for line in open(hostfile) if line.strip()) if os.path.isfile(hostfile) else "?") if hostfile else 1
        lines = [f"plan of scripts/{o.script}:"]
        lines += [f"  {label:<14}{last_value(self.trainer, flag)}{marks.get(variable, '')}" for label, variable, flag in PLAN_PATHS]
        lines += [f"  task          {task}", f"  ZeRO config   {self.zero_config()}", f"  precision     {self.precision(host)}",
                  f"  processes     {nproc} {'GPU' if host.cuda else 'CPU'} process(es) per node, {nodes} node(s)",
                  f"  resume        {resume_plan(last_value(self.trainer, '--resume_from_checkpoint') or 'auto', last_value(self.trainer, '--output_dir'))}"]
        caller = self.trainer[len(self.trainer) - o.caller_arguments:] if o.caller_arguments else []
        return lines + ([f"  arguments     {' '.join(caller)}"] if caller else [])


def global_batch(words: list[str], nproc: int) -> list[str]:
    """``words`` with ``--global_batch G`` (scripts/pretrain.sh's GLOBAL_BATCH) in its place as the accumulation
    that keeps it whatever the process count: ``--gradient_accumulation_steps G / (per-device batch x nproc)``,
    at least 1."""
    batch, out, i = last_value(words, "--per_device_train_batch_size") or "1", [], 0
    while i < len(words):
        if words[i] == "--global_batch" and i + 1 < len(words):
            if not (words[i + 1].isdigit() and batch.isdigit() and int(batch) > 0):
                raise LaunchError(f"--global_batch {words[i + 1]} needs whole numbers (per-device batch {batch})")
            out += ["--gradient_accumulation_steps", str(max(1, int(words[i + 1]) // (int(batch) * nproc)))]
            i += 2
        else:
            out.append(words[i])
            i += 1
    return out


def last_value(argv: list[str], flag: str) -> str | None:
    """The value of the last ``flag value`` (or ``flag=value``) in ``argv``."""
    value = None
    for i, w in enumerate(argv):
        if w == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif w.startswith(flag + "="):
            value = w.split("=", 1)[1]
    return value


def resume_plan(resume: str, output_dir: str | None) -> str:
    if resume in ("never", "none", "false", "no"):
        return "afresh (RESUME=never)"
    if resume not in ("auto", "true", "latest", "newest", "yes"):
        return f"from {resume}"
    steps = [int(m.group(1)) for p in Path(output_dir or ".").glob("checkpoint-*/trainer_state.json")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.parent.name))]
    if steps:
        return f"continues from {output_dir}/checkpoint-{max(steps)} (RESUME=auto; RESUME=never starts afresh)"
    return "afresh: no checkpoint in OUTPUT_DIR (RESUME=auto)"


def shell_quote(word: str) -> str:
    """``word`` as bash's ``printf %q`` writes it (the stage scripts' DRY_RUN output before the launcher was
    Python); shlex's quoting for the rare word with characters it writes in $'...' form."""
    if not word:
        return "''"
    if not word.isprintable():
        import shlex

        return shlex.quote(word)
    out = []
    for i, c in enumerate(word):
        if c in " \t\n'\"\\|&;()<>!{}*[?]^$`," or (c == "~" and (i == 0 or word[i - 1] in "=:")) or (c == "#" and i == 0):
            out.append("\\")
        out.append(c)
    return "".join(out)


def main(argv: list[str]) -> int:
    parser = build_parser()
    options, trainer = parser.parse_known_args(argv)
    if "-h" in trainer or "--help" in trainer:
        sys.stdout.write(parser.format_help() + "\nThe other words go to the trainer: llava-mcmdpo train --help.\n")
        return 0
    if not starts_processes(options):
        given = sorted({w.split("=", 1)[0] for w in argv if w.startswith("--")} & LAUNCH_OPTIONS)
        sys.stderr.write(f"error: {', '.join(given)}: for DeepSpeed's launcher only; add --nproc N (N > 1) or --zero\n")
        return 2
    launch = Launch(options, trainer)
    try:
        host = Host.probe(options.python)
        env, command = launch.command(host)
        plan = launch.plan(host) if options.script else []
    except (LaunchError, OSError) as e:
        sys.stderr.write(f"{e}\n")
        return 2
    if plan:
        sys.stderr.write("\n".join(plan) + "\n")
    if options.dry_run:
        sys.stdout.write("".join(shell_quote(w) + " " for w in env + command) + "\n")
        return 0
    environ = dict(os.environ, **dict(e.split("=", 1) for e in env))
    if not host.cuda and "OMP_NUM_THREADS" not in environ:
        # CPU processes share the cores: more threads than cores makes OpenMP spin in the kernel.
        environ["OMP_NUM_THREADS"] = str(max(1, host.cpus // launch.nproc(host)))
    if plan:
        environ["LLAVA_MCMDPO_PLAN_SHOWN"] = "1"  # the trainer's own plan then goes to OUTPUT_DIR/train.log only
    sys.stderr.write("+ " + " ".join(shell_quote(w) for w in env + command) + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os.execvpe(command[0], command, environ)  # DeepSpeed's runner takes this process's place
