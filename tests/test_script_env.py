"""The stage scripts' environment in Python (llava/train/script_env.py, script_help.py): the published flags,
misspelled variables, the caller's paths, the checks and their order, the launcher's words, and --help's parts.
Pure and fast: nothing is launched (bash only evaluates the assignments ``prepare`` writes)."""

import subprocess

import pytest

from llava.train.script_env import (REPO, ScriptError, build_parser, caller_paths, check_choices, check_variable_names,
                                    launcher_argv, misspelled, prepare, published_flags, vit_trains)
from llava.train.script_help import commented_variables, defaults, opening_comment


def test_published_flags_become_variables_and_leave_the_arguments():
    values, rest = published_flags(["--max_steps", "2", "--model_name_or_path", "m", "--data_path=d=1", "--output_dir=",
                                    "--deepspeed", "--x", "--seed", "0"])
    assert values == {"MODEL_PATH": "m", "DATA_PATH": "d=1", "OUTPUT_DIR": "", "ZERO": "--x"}
    assert rest == ["--max_steps", "2", "--seed", "0"]
    with pytest.raises(ScriptError, match="^--image_folder needs a value$"):
        published_flags(["--max_steps", "2", "--image_folder"])


@pytest.mark.parametrize("name,meant", [("DATA_PTAH", "DATA_PATH"), ("data_path", "DATA_PATH"), ("OUTPUTDIR", "OUTPUT_DIR"),
                                        ("MODEL_DIR", "MODEL_PATH"), ("DATA_ROOT", "DATA_PATH"), ("NUM_GPU", "NUM_GPUS"),
                                        ("lr", "LR"), ("Beta", "BETA"), ("ZER0", "ZERO"), ("PARADIM", "PARADIGM"),
                                        ("TERM", None), ("RANK", None), ("LD", None), ("Data_Pth", None), ("EPOCH", "EPOCHS"),
                                        ("DRYRUN", "DRY_RUN"), ("BETAS", "BETA"), ("ZEROS", "ZERO"), ("ABCD", None)])
def test_a_name_close_to_a_variable_is_a_misspelling(name, meant):
    # distance 1 for names of 4-5 letters, 2 for longer ones, equal in any case for shorter ones (LR)
    assert misspelled(name) == meant


def test_the_first_misspelling_in_the_shells_order_stops_the_script():
    with pytest.raises(ScriptError) as e:
        check_variable_names({"lr": "1", "MODEL_DIR": "x", "DATA_ROOT": "y", "A-B_PATH": "z", "HOME": "/"}, "sft.sh")
    assert str(e.value) == ("DATA_ROOT is not a variable of scripts/sft.sh: did you mean DATA_PATH? (unset DATA_ROOT if it "
                            "is meant for something else; --help lists the variables)")
    check_variable_names({"DATA-PATH": "x", "BASH_FUNC_f%%": "() { :; }", "TERM": "xterm"}, "sft.sh")  # not variables


def test_the_callers_paths_are_absolute_and_hub_names_stay(tmp_path):
    (tmp_path / "ckpt").mkdir()
    values = {"MODEL_PATH": "ckpt", "DATA_PATH": "org/data", "VISION_TOWER": "openai/clip", "OUTPUT_DIR": "out",
              "IMAGE_FOLDER": "/abs/images", "CONFIG": "", "HOSTFILE": "hosts"}
    assert caller_paths(values, str(tmp_path)) == {"MODEL_PATH": f"{tmp_path}/ckpt", "OUTPUT_DIR": f"{tmp_path}/out",
                                                   "HOSTFILE": f"{tmp_path}/hosts"}


def test_paradigm_and_resume_are_checked():
    check_choices({"PARADIGM": "", "RESUME": "never"})
    for values, message in (({"PARADIGM": "e", "RESUME": "x"}, "PARADIGM must be a, b, c or d (got e)"),
                            ({"RESUME": "maybe"}, "RESUME must be auto or never (got maybe)")):
        with pytest.raises(ScriptError) as e:
            check_choices(values)
        assert str(e.value) == message
    # (a) frozen, frozen (b) frozen, trained (c) trained, frozen (d, the default) trained, trained
    assert [vit_trains(p, s) for p in ("a", "b", "c", "d", None) for s in ("sft", "align")] == \
        ["False", "False", "False", "True", "True", "False", "True", "True", "True", "True"]


def test_prepare_writes_assignments_bash_reads_back(tmp_path):
    (tmp_path / "ckpt").mkdir()
    env = {"MODEL_PATH": "ckpt", "OUTPUT_DIR": "o u$t'", "NUM_GPUS": "2"}
    out = prepare("scripts/dpo.sh", str(tmp_path), ["--image_folder", "im", "--run_name", "a 'b'", "--x", ""], env)
    said = subprocess.run(["bash", "-c", 'eval "$1"; printf "<%s>\\n" "$MODEL_PATH" "$OUTPUT_DIR" "$IMAGE_FOLDER" '
                           '"$CALLER_SET" "$CALLER_ARGUMENTS" "${DATA_PATH-unset}" "$@"', "-", out],
                          capture_output=True, text=True, check=True).stdout
    assert said.splitlines() == [f"<{tmp_path}/ckpt>", f"<{tmp_path}/o u$t'>", f"<{tmp_path}/im>",
                                 "< MODEL_PATH IMAGE_FOLDER OUTPUT_DIR >", "<4>", "<unset>", "<--run_name>", "<a 'b'>",
                                 "<--x>", "<>"]
    with pytest.raises(ScriptError, match="^--output_dir needs a value$"):  # before the misspelling: the bash order
        prepare("scripts/dpo.sh", str(tmp_path), ["--output_dir"], {"DATA_PTAH": "x", "PARADIGM": "e"})
    with pytest.raises(ScriptError, match="^DATA_PTAH is not"):
        prepare("scripts/dpo.sh", str(tmp_path), [], {"DATA_PTAH": "x", "PARADIGM": "e"})


def launched(*variables, caller_set="", hint=None, stage=("align", "configs/dpo.yaml"), script="dpo.sh", words=(),
             set_flags=()):
    options = ["--script", str(REPO / "scripts" / script), "--caller_dir", "/c", "--caller_set", caller_set,
               "--caller_arguments", "1", *[w for v in variables for w in ("--variable", v)],
               *[w for pair in set_flags for w in ("--set_flag", pair)]]
    options += ["--default_model_hint", hint] if hint is not None else []
    options += ["--stage", stage[0], "--stage_config", stage[1]] if stage else []
    return launcher_argv(build_parser().parse_args(options), list(words))


DEFAULTS = ("MODEL_PATH=outputs/sft", "DATA_PATH=data/sample/preference.json", "IMAGE_FOLDER=data/sample",
            "OUTPUT_DIR=outputs/dpo", "PYTHON=py")


def test_the_stage_flags_and_the_launchers_options_from_the_variables():
    argv = launched(*DEFAULTS[1:], "MODEL_PATH=/m", "PARADIGM=c", "LR=1e-4", "RESUME=never", "NUM_GPUS=2", "ZERO=zero2",
                    "MASTER_PORT=7", "DRY_RUN=1", "SAMPLE_DATA=1", "BETA=0.3", caller_set=" MODEL_PATH ", words=["--x"],
                    set_flags=["BETA=--beta", "IMAGE_TYPE=--use_image_type"])
    assert argv == ["--script", "dpo.sh", "--python", "py", "--caller_arguments", "1", "--nproc", "2", "--zero", "zero2",
                    "--master_port", "7", "--defaulted", "DATA_PATH,IMAGE_FOLDER,OUTPUT_DIR", "--own_model", "--dry_run",
                    f"{REPO}/configs/dpo.yaml", "--model_name_or_path", "/m", "--data_path",
                    f"{REPO}/data/sample/preference.json", "--image_folder", f"{REPO}/data/sample", "--output_dir",
                    f"{REPO}/outputs/dpo", "--unfreeze_mm_vision_tower", "False", "--learning_rate", "1e-4",
                    "--resume_from_checkpoint", "never", "--beta", "0.3", "--x"]
    # pretrain.sh writes its own flags: no stage's; the default model given as an absolute path is not the caller's own
    argv = launched(f"MODEL_PATH={REPO}/outputs/tiny-llama", "PYTHON=py", caller_set=" MODEL_PATH ", stage=None,
                    script="pretrain.sh", words=["--task", "LM"])
    assert argv == ["--script", "pretrain.sh", "--python", "py", "--caller_arguments", "1", "--defaulted",
                    "DATA_PATH,IMAGE_FOLDER,OUTPUT_DIR", "--task", "LM"]
    with pytest.raises(ScriptError, match=r"^set_flags FOO: not in SCRIPT_VARIABLES \(llava/train/script_env.py\)$"):
        launched(*DEFAULTS, set_flags=["FOO=--foo"])


def refusal(*variables, **kwargs):
    with pytest.raises(ScriptError) as e:
        launched(*variables, **kwargs)
    return str(e.value)


def test_the_launchers_refusals_in_the_scripts_order(tmp_path):
    no_model = f"MODEL_PATH={tmp_path.relative_to(tmp_path.anchor)}/none"  # relative: the repository's
    assert refusal(no_model, *DEFAULTS[1:], "CONFIG=/no.yaml", hint="run sft.sh") == \
        f"no model at {REPO}/{no_model[11:]} (the default MODEL_PATH): run sft.sh"
    assert refusal(*DEFAULTS, "CONFIG=/no.yaml", "MODEL_PATH=/m", caller_set=" CONFIG MODEL_PATH ", hint="h") == \
        "no settings file /no.yaml (CONFIG)"
    assert refusal("MODEL_PATH=/m", *DEFAULTS[1:], caller_set=" MODEL_PATH DATA_PATH ", hint="h") == (
        "MODEL_PATH is a model of yours (/m), but these are unset and would be the bundled sample's: IMAGE_FOLDER "
        "(default data/sample), OUTPUT_DIR (default outputs/dpo). Set them (or pass --data_path, --image_folder, "
        "--output_dir), or SAMPLE_DATA=1 to train on the sample on purpose")


def test_help_reads_the_scripts_notes_and_variables():
    script = ["#!/usr/bin/env bash", "# What it does.", "#", "#   bash x.sh", "", "# still the opening", "set -e",
              "# not the opening", "A=${A:-1}   # one", "B_C=${B_C:-}", "D=${D:-${E:-}}", "F=${F:-x y}#tight",
              "# GG    g's note", "#      more of it", "#  not more", "# lower case: no", "# HH  h"]
    assert opening_comment(script) == ["  What it does.", "  ", "    bash x.sh", "  still the opening"]
    assert defaults(script) == ["  A  (default: 1)  one", "  B_C  (default: )", "  F  (default: x y)  #tight"]
    assert commented_variables(script) == ["  GG    g's note", "       more of it", "  HH  h"]
