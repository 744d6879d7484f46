"""The stage scripts' environment (scripts/sft.sh, dpo.sh, mcmdpo.sh, pretrain.sh) turned into the launcher's call.

scripts/common.sh only chooses the interpreter and hands over; this module does the rest, in three steps:

    python -m llava.train.script_env help SCRIPT                      # --help: the variables and an example
    python -m llava.train.script_env prepare SCRIPT CALLER_DIR ARGS   # shell assignments, evaluated by common.sh
    python -m llava.train.script_env launch [--variable NAME=VALUE ...] -- WORDS   # the launcher (launch.py)

``prepare`` takes the published path flags out of the arguments into their variables, stops on a misspelled
variable, makes the caller's paths absolute and checks PARADIGM and RESUME; ``launch`` checks the default model,
the settings file and a model of the caller's on the sample data, turns the variables into the stage's trainer
flags and the launcher's options, and runs ``llava-mcmdpo train ... --nproc NUM_GPUS`` (``launch.main``).
Each refusal is one line on stderr and exit status 2; the messages are those the scripts printed in bash.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

from llava.train import launch as launcher
from llava.train.script_help import help_text

REPO = launcher.REPO
# The variables the scripts read (a name in the environment close to one of them is a misspelling).
SCRIPT_VARIABLES = ("CONFIG MODEL_PATH DATA_PATH IMAGE_FOLDER OUTPUT_DIR HOSTFILE VISION_TOWER EPOCHS LR BATCH_SIZE "
                    "GRAD_ACCUM GLOBAL_BATCH NUM_GPUS CUDA_VISIBLE_DEVICES NODE_RANK MASTER_ADDR MASTER_PORT ZERO PRECISION "
                    "PARADIGM SAVE_STEPS SAVE_TOTAL_LIMIT RESUME NAN_POLICY REPORT_TO WANDB_PROJECT NUM_WORKERS OMP_NUM_THREADS "
                    "PYTHON DRY_RUN SAMPLE_DATA BETA IMAGE_TYPE CL_REWARD_NUM TERMS STALE_LOCK_MINUTES").split()
# the shell's and launchers' own names, close to ours by chance
OTHER_VARIABLES = "TERM HOME PATH SHELL USER LANG PWD OLDPWD HOSTNAME LOGNAME MAIL RANK LOCAL_RANK WORLD_SIZE".split()
# The published flags, given as arguments, take the place of these variables.
PUBLISHED = {"--model_name_or_path": "MODEL_PATH", "--data_path": "DATA_PATH", "--image_folder": "IMAGE_FOLDER",
             "--output_dir": "OUTPUT_DIR", "--vision_tower": "VISION_TOWER", "--deepspeed": "ZERO"}
PATHS = ("CONFIG", "MODEL_PATH", "DATA_PATH", "IMAGE_FOLDER", "OUTPUT_DIR", "HOSTFILE", "VISION_TOWER")
ALWAYS_CALLERS = ("CONFIG", "IMAGE_FOLDER", "OUTPUT_DIR", "HOSTFILE")  # the others may be hub names
# VAR: the trainer's flag it sets when set (stage_flags), after the paths; unset, the YAML's value stands.
STAGE_VARIABLES = (("VISION_TOWER", "--vision_tower"), ("EPOCHS", "--num_train_epochs"), ("LR", "--learning_rate"),
                   ("BATCH_SIZE", "--per_device_train_batch_size"), ("GRAD_ACCUM", "--gradient_accumulation_steps"),
                   ("SAVE_STEPS", "--save_steps"), ("SAVE_TOTAL_LIMIT", "--save_total_limit"),
                   ("RESUME", "--resume_from_checkpoint"), ("REPORT_TO", "--report_to"), ("NAN_POLICY", "--nan_policy"))
# VAR: the launcher's option it sets when set.
LAUNCH_VARIABLES = (("NUM_GPUS", "--nproc"), ("ZERO", "--zero"), ("PRECISION", "--precision"),
                    ("NUM_WORKERS", "--num_workers"), ("HOSTFILE", "--hostfile"), ("NODE_RANK", "--node_rank"),
                    ("MASTER_ADDR", "--master_addr"), ("MASTER_PORT", "--master_port"))
# PARADIGM: does the vision tower train in (sft, align)? docs/method.md#paradigms
PARADIGMS = {"a": (False, False), "b": (False, True), "c": (True, False), "d": (True, True)}


class ScriptError(ValueError):
    """A script that cannot go on, said in one line (exit status 2)."""


def published_flags(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """({variable: value} of the published path flags, the other arguments in order)."""
    values, rest, i = {}, [], 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name not in PUBLISHED:
            rest.append(args[i])
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise ScriptError(f"{args[i]} needs a value")
            value, i = args[i + 1], i + 1
        values[PUBLISHED[name]] = value
        i += 1
    return values, rest


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def misspelled(name: str) -> str | None:
    """The variable ``name`` looks like a misspelling of: edit distance 1 for names of 4-5 letters, 2 for longer
    ones, any case; an unknown MODEL_*/DATA_* name (it would silently leave the bundled sample in place)."""
    if name in SCRIPT_VARIABLES or name in OTHER_VARIABLES:
        return None
    best, best_distance = None, 99
    for known in SCRIPT_VARIABLES:
        limit = 2 if len(known) >= 6 else 1 if len(known) >= 4 else 0
        distance = 0 if name.upper() == known else edit_distance(name, known) if limit else 99
        if distance <= limit and distance < best_distance:
            best, best_distance = known, distance
    if best is None and name.startswith(("MODEL_", "DATA_")):
        best = "MODEL_PATH" if name.startswith("MODEL_") else "DATA_PATH"
    return best


def check_variable_names(environ: dict[str, str], script: str) -> None:
    """Stop at the first misspelled name in the environment, in the shell's (sorted) order."""
    for name in sorted(n for n in environ if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)):
        if meant := misspelled(name):
            raise ScriptError(f"{name} is not a variable of scripts/{script}: did you mean {meant}? (unset {name} if it "
                              "is meant for something else; --help lists the variables)")


def caller_paths(values: dict[str, str], caller_dir: str) -> dict[str, str]:
    """The path variables the caller set, absolute against the caller's directory. A model, data set or tower that
    does not exist there may be a hub name: it is left as given (the trainer runs in the caller's directory)."""
    out = {}
    for var in PATHS:
        value = values.get(var, "")
        if not value or value.startswith("/"):
            continue
        if var in ALWAYS_CALLERS or os.path.exists(f"{caller_dir}/{value}"):
            out[var] = f"{caller_dir}/{value}"
    return out


def check_choices(values: dict[str, str]) -> None:
    paradigm, resume = values.get("PARADIGM") or "d", values.get("RESUME") or "auto"
    if paradigm not in PARADIGMS:
        raise ScriptError(f"PARADIGM must be a, b, c or d (got {values['PARADIGM']})")
    if resume not in ("auto", "never"):
        raise ScriptError(f"RESUME must be auto or never (got {values['RESUME']})")


def vit_trains(paradigm: str | None, stage: str) -> str:
    """``--unfreeze_mm_vision_tower``'s value in ``stage`` (sft | align) under ``paradigm`` (default d)."""
    if (paradigm or "d") not in PARADIGMS:
        raise ScriptError(f"PARADIGM must be a, b, c or d (got {paradigm})")
    return str(PARADIGMS[paradigm or "d"][stage == "align"])


def prepare(script: str, caller_dir: str, args: list[str], environ: dict[str, str]) -> str:
    """The shell assignments that give the script its variables: the published flags' values, the caller's paths
    made absolute, CALLER_SET (the path variables the caller set), SCRIPT_VARIABLES, and the other arguments
    (CALLER_ARGUMENTS of them: the trainer gets them after the stage's flags)."""
    flags, rest = published_flags(args)
    check_variable_names(environ, Path(script).name)
    values = {**environ, **flags}
    changed = {**flags, **caller_paths(values, caller_dir)}
    check_choices(values)
    caller_set = " " + "".join(f"{var} " for var in PATHS if values.get(var))
    lines = [f"{var}={shlex.quote(value)}" for var, value in changed.items()]
    lines += [f"CALLER_SET={shlex.quote(caller_set)}", f"SCRIPT_VARIABLES={shlex.quote(' '.join(SCRIPT_VARIABLES))}",
              f"CALLER_ARGUMENTS={len(rest)}", "set -- " + " ".join(shlex.quote(w) for w in rest)]
    return "\n".join(lines) + "\n"


def script_default(script: str, var: str) -> str:
    """The default the stage script writes for ``var`` (its line ``VAR=${VAR:-default}``)."""
    for line in Path(script).read_text().splitlines():
        if m := re.match(rf"{var}=\$\{{{var}:-([^}}]*)\}}", line):
            return m.group(1)
    return ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="script_env launch", allow_abbrev=False)
    p.add_argument("--script", required=True, help="the stage script's path ($0)")
    p.add_argument("--caller_dir", required=True)
    p.add_argument("--repo_root", default=str(REPO), help="the repository as the script reached it (links kept)")
    p.add_argument("--caller_set", default=" ", help="the path variables the caller set, space-separated")
    p.add_argument("--caller_arguments", type=int, default=0, help="how many trailing words are the caller's")
    p.add_argument("--variable", action="append", default=[], help="NAME=VALUE of each script variable that is set")
    p.add_argument("--default_model_hint", help="how to make the default model (require_default_model)")
    p.add_argument("--stage", choices=("sft", "align"), help="with --stage_config: the trainer's flags of the stage")
    p.add_argument("--stage_config", help="the stage's settings file, relative to the repository")
    p.add_argument("--set_flag", action="append", default=[], help="VAR=--flag: --flag VAR's value when VAR is set")
    return p


def flags_of(pairs, values: dict[str, str]) -> list[str]:
    """``--flag value`` for each (VAR, --flag) whose VAR is set (not empty); unset, the YAML's or the default stands."""
    return [w for var, flag in pairs if values.get(var) for w in (flag, values[var])]


def launcher_argv(o: argparse.Namespace, words: list[str]) -> list[str]:
    """``llava-mcmdpo train``'s words for the stage script: its checks in the scripts' order, then the stage's
    flags (settings file, paths, the variables set) before ``words`` and the launcher's options from the variables."""
    values = dict(v.split("=", 1) for v in o.variable)
    caller_set, repo = set(o.caller_set.split()), o.repo_root
    if o.default_model_hint is not None and "MODEL_PATH" not in caller_set:
        model = values.get("MODEL_PATH", "")
        if not os.path.isdir(os.path.join(repo, model)):
            raise ScriptError(f"no model at {repo}/{model} (the default MODEL_PATH): {o.default_model_hint}")
    own_flags = [tuple(pair.split("=", 1)) for pair in o.set_flag]  # the stage script's set_flags, after the stage's
    if unknown := [var for var, _ in own_flags if var not in SCRIPT_VARIABLES]:
        raise ScriptError(f"set_flags {' '.join(unknown)}: not in SCRIPT_VARIABLES (llava/train/script_env.py)")
    if o.stage:
        values.setdefault("CONFIG", o.stage_config)
        for var in ("CONFIG", "MODEL_PATH", "DATA_PATH", "IMAGE_FOLDER", "OUTPUT_DIR", "VISION_TOWER"):
            if var not in caller_set and values.get(var) and not values[var].startswith("/"):
                values[var] = f"{repo}/{values[var]}"  # the defaults are the repository's
        if not os.path.isfile(values["CONFIG"]):
            raise ScriptError(f"no settings file {values['CONFIG']} (CONFIG)")
        stage = [values["CONFIG"], "--model_name_or_path", values.get("MODEL_PATH", ""), "--data_path",
                 values.get("DATA_PATH", ""), "--image_folder", values.get("IMAGE_FOLDER", ""), "--output_dir",
                 values.get("OUTPUT_DIR", "")]
        if values.get("PARADIGM"):
            stage += ["--unfreeze_mm_vision_tower", vit_trains(values["PARADIGM"], o.stage)]
        words = stage + flags_of(STAGE_VARIABLES, values) + flags_of(own_flags, values) + words
    else:
        words = flags_of(own_flags, values) + words
    default = script_default(o.script, "MODEL_PATH")
    model = values.get("MODEL_PATH", "")
    own_model = "MODEL_PATH" in caller_set and model not in (default, f"{repo}/{default}")
    missing = [f"{var} (default {script_default(o.script, var)})" for var in ("DATA_PATH", "IMAGE_FOLDER", "OUTPUT_DIR")
               if var not in caller_set]
    if own_model and values.get("SAMPLE_DATA") != "1" and missing:
        raise ScriptError(f"MODEL_PATH is a model of yours ({model}), but these are unset and would be the bundled "
                          f"sample's: {', '.join(missing)}. Set them (or pass --data_path, --image_folder, --output_dir), "
                          "or SAMPLE_DATA=1 to train on the sample on purpose")
    argv = ["--script", Path(o.script).name, "--python", values.get("PYTHON", "python3"), "--caller_arguments",
            str(o.caller_arguments)]
    argv += flags_of(LAUNCH_VARIABLES, values)
    argv += ["--defaulted", ",".join(v for v in ("MODEL_PATH", "DATA_PATH", "IMAGE_FOLDER", "OUTPUT_DIR") if v not in caller_set)]
    argv += ["--own_model"] * own_model + ["--dry_run"] * (values.get("DRY_RUN") == "1")
    return argv + words


def main(argv: list[str]) -> int:
    try:
        if not argv:
            raise ScriptError("a step is needed: help, prepare or launch")
        if argv[0] == "help":
            sys.stdout.write(help_text(argv[1]))
        elif argv[0] == "prepare":
            sys.stdout.write(prepare(argv[1], argv[2], argv[3:], dict(os.environ)))
        elif argv[0] == "launch":
            split = argv.index("--")
            return launcher.main(launcher_argv(build_parser().parse_args(argv[1:split]), argv[split + 1:]))
        else:
            raise ScriptError(f"unknown step {argv[0]} (help, prepare or launch)")
    except ScriptError as e:
        sys.stderr.write(f"{e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
