"""``bash scripts/STAGE.sh --help``: the script's own notes and variables, the shared ones and an example.

The text is read from the scripts themselves, so that it says what they do: the stage script's opening comment,
its ``VAR=${VAR:-default}  # note`` lines and ``# VAR  note`` comments, and scripts/common.sh's table of the
variables every stage script reads.
"""

from __future__ import annotations

import re
from pathlib import Path

COMMON = Path(__file__).resolve().parents[2] / "scripts" / "common.sh"
# a stage script's own example: (model, data) of yours
EXAMPLES = {"sft.sh": ("models/llava-v1.6-vicuna-7b", "data/my_posts/sft.json"),
            "pretrain.sh": ("models/vicuna-7b-v1.5", "data/my_captions/pretrain.json")}
DEFAULT_EXAMPLE = ("outputs/my_sft", "data/my_posts/preference.json")


def opening_comment(lines: list[str]) -> list[str]:
    """The comment lines from the second line to the first line of code, their ``# `` made an indent."""
    out = []
    for i, line in enumerate(lines[1:]):
        if i and line[:1] not in ("#", ""):  # the second line itself is read whatever it is
            break
        if line.startswith("#"):
            out.append("  " + re.sub(r"^# ?", "", line))
    return out


def defaults(lines: list[str]) -> list[str]:
    """``VAR  (default: D)  note`` for each ``VAR=${VAR:-D}  # note`` line whose default is not another variable."""
    out = []
    for line in lines:
        if not re.match(r"[A-Z_]+=\$\{[A-Z_]+:-[^$]", line):
            continue
        m = re.fullmatch(r"([A-Z_]+)=\$\{[A-Z_]+:-([^}]*)\}[ \t\r\f\v]*(# )?(.*)", line)
        if m:
            line = f"  {m.group(1)}  (default: {m.group(2)})  {m.group(4)}"
        out.append(line.rstrip(" \t\r\f\v"))
    return out


def commented_variables(lines: list[str]) -> list[str]:
    """The ``# VAR  note`` comments after the first line of code, with their ``#   `` continuation lines."""
    out, code, more = [], False, False
    for line in lines:
        if not line.startswith("#"):
            code = True
        if code and re.match(r"# [A-Z_][A-Z_0-9]+ ", line):
            out.append("  " + line[2:])
            more = True
        elif code and more and line.startswith("#   "):
            out.append("  " + line[2:])
        else:
            more = False
    return out


def shared_variables(lines: list[str]) -> list[str]:
    """common.sh's table, ``#   CONFIG`` to the end of ``#   SAMPLE_DATA``'s note, and its note on the published flags."""
    start = next(i for i, line in enumerate(lines) if line.startswith("#   CONFIG "))
    sample = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("#   SAMPLE_DATA"))
    end = next(i for i in range(sample + 1, len(lines)) if lines[i] == "#")
    first = next(i for i, line in enumerate(lines) if line.startswith("# The published flags"))
    last = next(i for i in range(first + 1, len(lines)) if lines[i].startswith("# like a misspelling"))
    return ([line[1:] for line in lines[start:end]] + [""] + [re.sub(r"^# ", "", line) for line in lines[first:last + 1]])


def help_text(script: str) -> str:
    name = Path(script).name
    lines = Path(script).read_text().splitlines()
    model, data = EXAMPLES.get(name, DEFAULT_EXAMPLE)
    out, images = f"outputs/my_{name.removesuffix('.sh')}", data.rsplit("/", 1)[0] + "/images"
    text = [f"bash scripts/{name} [--flag value ...]", *opening_comment(lines), "",
            f"Variables of {name} (environment; paths relative to your directory):", *defaults(lines),
            *commented_variables(lines), "", "Variables of every stage script (scripts/common.sh):",
            *shared_variables(COMMON.read_text().splitlines()), "",
            "Example: your model on your data, two steps to try it (DRY_RUN=1 prints the plan and command only):",
            f"  MODEL_PATH={model} DATA_PATH={data} IMAGE_FOLDER={images} \\",
            f"    OUTPUT_DIR={out} bash scripts/{name} --max_steps 2",
            "The same with the published flags:",
            f"  bash scripts/{name} --model_name_or_path {model} --data_path {data} \\",
            f"    --image_folder {images} --output_dir {out} --max_steps 2"]
    return "\n".join(text) + "\n"
