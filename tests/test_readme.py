"""The README as a newcomer reads it: short, its sections in order, every relative link resolving, and
its quickstart commands still what the scripts and parsers take. The GPU quickstart runs as written,
with DRY_RUN=1 on a host that reports GPUs (the stage scripts print their launch command; `python` is
a shell function that prints its arguments), and each command line is read back by the parser that
would run it. The CPU quickstart's first step runs for real; the scripts after it run dry."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_scripts import FAKE_PYTHON, REPO

README = REPO / "README.md"
SECTIONS = ["Install", "Quickstart on a GPU node", "Quickstart on a CPU", "Your own data",
            "Supported models and setups", "Results", "Documentation", "Citation", "License"]
# Variables a user's shell may carry that would change what the scripts print.
SCRIPT_VARIABLES = ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", "HOSTFILE", "NODE_RANK", "ZERO", "PRECISION", "CONFIG", "MODEL_PATH",
                    "DATA_PATH", "IMAGE_FOLDER", "OUTPUT_DIR", "VISION_TOWER", "EPOCHS", "LR", "BATCH_SIZE", "GRAD_ACCUM",
                    "BETA", "TERMS", "CL_REWARD_NUM", "IMAGE_TYPE", "PARADIGM", "REPORT_TO", "RESUME", "SAVE_STEPS",
                    "SAVE_TOTAL_LIMIT", "NAN_POLICY", "NUM_WORKERS", "DRY_RUN")


def prose_and_code(text):
    """(line, fenced) for each line of ``text``: fenced is True inside ``` blocks (fence lines included)."""
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            yield line, True
        else:
            yield line, fenced


def sections():
    """{heading: body} of the README's ``## `` sections, in order."""
    out, current = {}, None
    for line, fenced in prose_and_code(README.read_text()):
        if not fenced and line.startswith("## "):
            current = line[3:].strip()
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def bash_blocks(section):
    return re.findall(r"^```bash\n(.*?)^```$", sections()[section], re.S | re.M)


def commands(block):
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def clean_env(**extra):
    return {**{k: v for k, v in os.environ.items() if k not in SCRIPT_VARIABLES}, **extra}


def launches(stdout):
    """The trainer argv of each launch line a dry run printed, with the launcher's words before it."""
    out = []
    for line in stdout.splitlines():
        words = shlex.split(line)
        if str(REPO / "llava/train/train.py") in words:
            i = words.index(str(REPO / "llava/train/train.py"))
            out.append((words[:i], words[i + 1:]))
    return out


def parsed_trainer(argv):
    """The trainer's parsed arguments for ``argv``, the DeepSpeed config left out (parsing one registers
    ZeRO-3 process-wide) and the precision too (this host has no GPU for bf16)."""
    from llava.train.arguments import parse_args

    drop = {"--deepspeed", "--bf16", "--fp16", "--tf32"}
    keep, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in drop:
            skip = True
        else:
            keep.append(word)
    return parse_args(keep)


def test_the_readme_is_short_and_its_sections_are_in_order():
    text = README.read_text()
    assert len(text.splitlines()) <= 320
    assert list(sections()) == SECTIONS
    intro = text.split("\n## ", 1)[0]
    assert "https://arxiv.org/abs/2510.00647" in intro
    picture = re.search(r"!\[[^\]]*\]\((images/[^)]+)\)", intro)
    assert picture and (REPO / picture.group(1)).is_file()


def test_every_relative_link_of_the_readme_resolves():
    links = [m.group(1) for line, fenced in prose_and_code(README.read_text()) if not fenced
             for m in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", line)]
    relative = [link for link in links if not re.match(r"^[a-z]+:", link)]
    assert len(relative) > 20
    missing = [link for link in relative if not (REPO / link).exists()]
    assert not missing


@pytest.mark.slow
def test_the_gpu_quickstart_runs_as_written_with_dry_run(tmp_path):
    """The GPU quickstart, verbatim, on a host that reports 8 GPUs: three launches (SFT from the 7B hub
    checkpoint, MCM-DPO and DPO from the SFT output) under ZeRO-3 and bf16 on the README's 4 GPUs, each
    trainer command line parsed by the trainer; inference on the three outputs and scores on the
    three answer files, parsed by their own parsers."""
    from llava.eval.inference import build_parser as inference_parser
    from llava.eval.score import build_parser as score_parser

    (block,) = bash_blocks("Quickstart on a GPU node")
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON % sys.executable)
    python.chmod(0o755)
    prelude = "set -euo pipefail\npython() { printf 'PYTHON-CALL'; printf ' %q' \"$@\"; echo; }\n"
    result = subprocess.run(["bash", "-c", prelude + block], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=clean_env(DRY_RUN="1", PYTHON=str(python)))
    assert result.returncode == 0, result.stderr[-3000:]

    runs = launches(result.stdout)
    assert len(runs) == 3
    parsed = {}
    for launcher, argv in runs:
        assert launcher[-4:-2] == ["--num_gpus", "4"], launcher
        assert argv[argv.index("--deepspeed") + 1] == str(REPO / "scripts/zero3.json")
        assert argv[argv.index("--bf16") + 1] == "True" and argv[argv.index("--tf32") + 1] == "True"
        model, data, training = parsed_trainer(argv)
        assert data.image_aspect_ratio == "pad" and data.image_folder == str(REPO / "data/alt/images")
        stage = Path(training.output_dir).relative_to(REPO).as_posix()
        parsed[stage] = (model, data, training)
    assert sorted(parsed) == ["ckpt/dpo", "ckpt/mcmdpo", "ckpt/sft"]
    sft_model, sft_data, sft = parsed["ckpt/sft"]
    assert sft_model.model_name_or_path == "liuhaotian/llava-v1.6-vicuna-7b" and sft.loss == "sft"
    assert sft_data.data_path == "data/alt/sft.json"
    for stage, loss in (("ckpt/mcmdpo", "mcm_dpo"), ("ckpt/dpo", "dpo")):
        model, data, training = parsed[stage]
        assert training.loss == loss
        assert (REPO / model.model_name_or_path).resolve() == Path(sft.output_dir)  # the SFT output, as the trainer resolves it
        assert data.data_path == "data/alt/preference.json"

    calls = [shlex.split(line)[1:] for line in result.stdout.splitlines() if line.startswith("PYTHON-CALL")]
    assert [c[0] for c in calls] == ["mcmdpo_inference.py"] * 3 + ["get_score.py"]
    inferences = [inference_parser().parse_args(call[1:]) for call in calls[:3]]
    assert sorted(args.model_name for args in inferences) == sorted(parsed)  # each trained model, as trained
    assert all(args.test_datasets == ["data/alt/test.jsonl"] for args in inferences)
    answers = [args.eval_output for args in inferences]
    scores = score_parser().parse_args(calls[3][1:])
    assert scores.file == answers


@pytest.mark.slow
def test_the_cpu_quickstart_first_steps(tmp_path):
    """`make demo` and `make test` are targets of the Makefile; the step-by-step block's tiny model is built
    as written (into a scratch directory), and the scripts after it print launches of the trainer that
    parse, with the README's flags."""
    from llava.cli import COMMANDS
    from llava.model.tiny import main as tiny

    makefile = (REPO / "Makefile").read_text()
    first, steps = bash_blocks("Quickstart on a CPU")
    for command in commands(first):
        assert command[0] == "make" and re.search(rf"^{command[1]}:", makefile, re.M), command

    lines = commands(steps)
    assert lines[0][:3] == [".venv/bin/python", "-m", "llava.model.tiny"]
    out = lines[0][lines[0].index("--out") + 1]
    tiny([*lines[0][3:lines[0].index("--out")], "--out", str(tmp_path / out), *lines[0][lines[0].index("--out") + 2:]])
    assert (tmp_path / out / "config.json").is_file() and (tmp_path / out / "tokenizer_config.json").is_file()

    models = {"sft.sh": tmp_path / out, "mcmdpo.sh": tmp_path / "outputs" / "sft"}  # the stages' default inputs
    (tmp_path / "outputs" / "sft").mkdir()
    for line in lines[1:]:
        if line[0] == "bash":
            script = Path(line[1]).name
            result = subprocess.run(line, cwd=REPO, capture_output=True, text=True, timeout=120,
                                    # the scratch model stands where the README's default model is: the
                                    # sample data is meant (SAMPLE_DATA=1), as the default MODEL_PATH means it
                                    env=clean_env(DRY_RUN="1", PYTHON=sys.executable, MODEL_PATH=str(models[script]),
                                                  SAMPLE_DATA="1"))
            assert result.returncode == 0, result.stderr[-2000:]
            ((_, argv),) = launches(result.stdout)
            _, data, training = parsed_trainer(argv)
            assert training.max_steps == 2 and Path(data.data_path).is_file()
        else:
            assert Path(line[0]).name == "llava-mcmdpo" and line[1] in COMMANDS
            _, data, training = parsed_trainer([str(REPO / line[2]), *line[3:]])
            assert training.loss in ("dpo", "mcm_dpo") and training.max_steps == 2
