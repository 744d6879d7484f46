"""``llava-mcmdpo``: one command for the toolkit, a subcommand per job.

    llava-mcmdpo train configs/mcmdpo.yaml [--flag value ...]   train (SFT, DPO, MCM-DPO); flags win over the file
    llava-mcmdpo train configs/mcmdpo.yaml --nproc 4 [--zero 2|3|3_offload] [--nnodes N --node_rank R --master_addr A]
                                                                 the same under DeepSpeed's launcher (llava/train/launch.py)
    llava-mcmdpo infer --model_name_or_path M --data_path TEST.jsonl --output OUT.jsonl
    llava-mcmdpo score --data_path OUT.jsonl [...] [--output_dir DIR]
    llava-mcmdpo COMMAND --help                                  the command's flags and their choices

Each subcommand runs the ``main`` of the module that does the job, with the words after it; the
module forms (``python -m llava.eval.inference``, ``mcmdpo_inference.py``, ``get_score.py`` ...) take
the same flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # its ``main(argv)`` runs the command
    help: str


COMMANDS = {
    "train": Command("llava.train.train", "train: SFT, DPO or MCM-DPO from a YAML settings file (configs/) and flags"),
    "infer": Command("llava.eval.inference", "write alt-text for test records (JSON Lines, resumable, multi-GPU)"),
    "score": Command("llava.eval.score", "score inference outputs: BLEU, METEOR, ROUGE-L, CIDEr ... (as get_score.py)"),
    "report": Command("llava.eval.report", "an HTML page comparing systems' alt-text record by record"),
    "check": Command("llava.data.check", "check data files and list every problem with its record and field"),
    "show": Command("llava.data.show", "print the token sequences a record becomes in training or inference"),
    "convert": Command("llava.model.convert", "convert checkpoints: original LLaVA layout <-> transformers"),
    "merge": Command("llava.model.merge", "merge a saved LoRA adapter into its base model"),
    "curves": Command("llava.eval.curves", "draw training curves (losses, margins, accuracies) of runs"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="llava-mcmdpo",
        description="Train LLaVA models to write context-aware alt-text (SFT, DPO, MCM-DPO), and run, score "
                    "and inspect them.",
        epilog="`llava-mcmdpo COMMAND --help` lists a command's flags.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        # no command, --help, or an unknown name: argparse prints the usage (and the choices)
        build_parser().parse_args(argv[:1])
    name, rest = argv[0], argv[1:]
    if name == "train":
        from llava.train import launch

        if launch.wants_launch(rest):  # --nproc N, --zero ...: DeepSpeed's launcher starts the trainer
            return launch.main(rest)
        rest = launch.without_nproc_1(rest)  # one process: the trainer runs here, as without --nproc
    code = importlib.import_module(COMMANDS[name].module).main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
