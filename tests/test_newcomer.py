"""A newcomer's first hour (issue 25), through the real entry points: the scripts' --help, plan and
refusals, `llava-mcmdpo train`'s help and flag checks, image messages of `mcmdpo_inference.py`."""

import os
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import run_cli

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("sft.sh", "dpo.sh", "mcmdpo.sh", "pretrain.sh")
# what the stage scripts read: the caller's environment must not set them for these tests
OURS = ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", "HOSTFILE", "TERMS", "CL_REWARD_NUM", "EPOCHS", "LR", "BATCH_SIZE",
        "GRAD_ACCUM", "BETA", "IMAGE_TYPE", "PARADIGM", "REPORT_TO", "RESUME", "SAVE_STEPS", "SAVE_TOTAL_LIMIT", "CONFIG",
        "MODEL_PATH", "DATA_PATH", "IMAGE_FOLDER", "OUTPUT_DIR", "VISION_TOWER", "PRECISION", "NUM_WORKERS", "SAMPLE_DATA",
        "ZERO", "DRY_RUN")


def script(name, cwd, *args, python="true", **env):
    """``bash scripts/NAME ARGS`` in ``cwd`` with ``env`` (PYTHON ``true`` by default: a host without CUDA,
    and nothing can start)."""
    base = {k: v for k, v in os.environ.items() if k not in OURS}
    return subprocess.run(["bash", str(REPO / "scripts" / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**base, "PYTHON": python, **env})


@pytest.fixture
def caller_dir(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "pref.json").write_text("[]")
    return tmp_path


# -- 3. --help: the variables and an example, nothing started ---------------------------------------


@pytest.mark.parametrize("name,own", [("sft.sh", "VISION_TOWER"), ("dpo.sh", "BETA"), ("mcmdpo.sh", "CL_REWARD_NUM"),
                                      ("pretrain.sh", "GLOBAL_BATCH")])
def test_script_help_lists_its_variables_and_an_example_and_starts_nothing(name, own, tmp_path):
    start = time.monotonic()
    # PYTHON=false: any Python (torch's GPU count, the trainer) would fail the script
    result = script(name, tmp_path, "--max_steps", "2", "--help", python="false")
    took = time.monotonic() - start
    assert result.returncode == 0 and result.stderr == "", result.stderr
    help_text = result.stdout
    assert help_text.startswith(f"bash scripts/{name} [--flag value ...]\n")
    for variable in ("MODEL_PATH", "DATA_PATH", "IMAGE_FOLDER", "OUTPUT_DIR", "ZERO", "NUM_GPUS", "PRECISION", "RESUME",
                     "SAMPLE_DATA", own):
        assert f"\n  {variable} " in help_text or f"\n   {variable} " in help_text, variable
    assert f"OUTPUT_DIR=outputs/my_{name[:-3]} bash scripts/{name} --max_steps 2" in help_text
    assert f"bash scripts/{name} --model_name_or_path " in help_text
    assert "plan of" not in help_text and not list(tmp_path.iterdir())
    assert took < 2, took  # the bound for a help that starts nothing


# -- 1. misspelled variables, the plan, a model of yours ---------------------------------------------


@pytest.mark.parametrize("variable,meant", [("DATA_PTAH", "DATA_PATH"), ("data_path", "DATA_PATH"),
                                            ("OUTPUTDIR", "OUTPUT_DIR"), ("MODEL_DIR", "MODEL_PATH"),
                                            ("DATA_ROOT", "DATA_PATH"), ("NUM_GPU", "NUM_GPUS")])
def test_a_misspelled_variable_stops_with_did_you_mean(variable, meant, caller_dir):
    result = script("mcmdpo.sh", caller_dir, DRY_RUN="1", **{variable: "x"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"{variable} is not a variable of scripts/mcmdpo.sh: did you mean {meant}? (unset {variable} "
                             "if it is meant for something else; --help lists the variables)\n")


def plan_of(stderr: str) -> dict[str, str]:
    lines = stderr.split("plan of scripts/", 1)[1].splitlines()[1:]
    return {line[2:16].strip(): line[16:] for line in lines if line.startswith("  ")}


def test_the_plan_says_what_the_run_uses_and_the_published_flags_replace_the_variables(caller_dir):
    (caller_dir / "out" / "checkpoint-2").mkdir(parents=True)
    (caller_dir / "out" / "checkpoint-10").mkdir()
    for step in (2, 10):
        (caller_dir / "out" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    result = script("mcmdpo.sh", caller_dir, "--model_name_or_path", "ckpt", "--data_path=pref.json", "--image_folder",
                    "images", "--output_dir", "out", "--deepspeed", "zero2.json", "--version", "v1", "--max_steps", "2",
                    DRY_RUN="1", NUM_GPUS="2")
    (caller_dir / "zero2.json").write_text("{}")
    assert result.returncode == 2 and result.stderr.strip() == f"no DeepSpeed config {caller_dir}/zero2.json (ZERO=zero2.json)"
    result = script("mcmdpo.sh", caller_dir, "--model_name_or_path", "ckpt", "--data_path=pref.json", "--image_folder",
                    "images", "--output_dir", "out", "--deepspeed", "zero2.json", "--version", "v1", "--max_steps", "2",
                    DRY_RUN="1", NUM_GPUS="2")
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    trainer = words[words.index(str(REPO / "llava/train/train.py")) + 1:]
    # each path flag once, the caller's; the DeepSpeed config the one given; the other arguments passed on
    for flag, value in (("--model_name_or_path", "ckpt"), ("--data_path", "pref.json"), ("--image_folder", "images"),
                        ("--output_dir", "out"), ("--deepspeed", "zero2.json")):
        assert trainer.count(flag) == 1 and trainer[trainer.index(flag) + 1] == str(caller_dir / value), flag
    assert trainer[-4:] == ["--version", "v1", "--max_steps", "2"]
    assert plan_of(result.stderr) == {
        "model": str(caller_dir / "ckpt"), "data": str(caller_dir / "pref.json"), "image folder": str(caller_dir / "images"),
        "output dir": str(caller_dir / "out"), "task": f"MCM-DPO, settings {REPO}/configs/mcmdpo.yaml",
        "ZeRO config": str(caller_dir / "zero2.json"), "precision": "fp32",
        "processes": "2 CPU process(es) per node, 1 node(s)",
        "resume": f"continues from {caller_dir}/out/checkpoint-10 (RESUME=auto; RESUME=never starts afresh)",
        "arguments": "--version v1 --max_steps 2"}
    never = script("mcmdpo.sh", caller_dir, "--model_name_or_path", "ckpt", "--data_path", "pref.json", "--image_folder",
                   "images", "--output_dir", "out", DRY_RUN="1", RESUME="never")
    assert plan_of(never.stderr)["resume"] == "afresh (RESUME=never)"


def test_a_model_of_yours_is_not_trained_on_the_sample_without_a_word(caller_dir):
    refused = script("dpo.sh", caller_dir, "--model_name_or_path", "ckpt", "--data_path", "pref.json", DRY_RUN="1")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (
        f"MODEL_PATH is a model of yours ({caller_dir}/ckpt), but these are unset and would be the bundled sample's: "
        "IMAGE_FOLDER (default data/sample), OUTPUT_DIR (default outputs/dpo). Set them (or pass --data_path, "
        "--image_folder, --output_dir), or SAMPLE_DATA=1 to train on the sample on purpose\n")
    on_purpose = script("dpo.sh", caller_dir, DRY_RUN="1", MODEL_PATH="ckpt", SAMPLE_DATA="1")
    assert on_purpose.returncode == 0, on_purpose.stderr
    plan = plan_of(on_purpose.stderr)
    loud = "   <- THE BUNDLED SAMPLE'S DEFAULT, not your data (SAMPLE_DATA=1)"
    assert (plan["data"], plan["image folder"], plan["output dir"]) == (
        f"{REPO}/data/sample/preference.json{loud}", f"{REPO}/data/sample{loud}", f"{REPO}/outputs/dpo{loud}")
    # the stage's own default model is no model of yours: the sample is what it is for
    default = script("dpo.sh", REPO, DRY_RUN="1", MODEL_PATH="outputs/sft")
    assert default.returncode == 0 and plan_of(default.stderr)["data"] == f"{REPO}/data/sample/preference.json   (default)"


# -- 3 and 4: llava-mcmdpo train's help, flags and settings files -------------------------------------



def test_train_help_shows_the_settings_file_and_grouped_flags_and_help_all_the_rest(capsys):
    code, short = run_cli(["train", "--help"], capsys)
    assert code == 0
    short = short[short.index("usage: "):]  # after any line an earlier test's wandb set-up prints on import
    assert short.startswith("usage: llava-mcmdpo train [SETTINGS.yaml] [--flag value ...]\n\nSETTINGS.yaml (optional, first)")
    groups = [line for line in short.splitlines() if line.endswith(" flags:")]
    assert groups == ["model flags:", "data flags:", "method flags:", "run flags:"]
    for flag in ("--model_name_or_path", "--data_path", "--image_folder", "--use_cl_reward_num", "--beta", "--para_r7",
                 "--output_dir", "--learning_rate", "--deepspeed", "--nan_policy"):
        assert f"\n  {flag} " in short, flag
    assert "--adam_beta1" not in short and "--model-name-or-path" not in short and "required" not in short
    code, full = run_cli(["train", "--help-all"], capsys)
    assert code == 0 and "--adam_beta1" in full and "--use_cl_reward_num" in full
    assert short.count("\n") < full.count("\n") / 3


@pytest.mark.parametrize("argv,message", [
    (["--max_step", "2"], "unknown flag --max_step; did you mean --max_steps? (see --help)"),
    (["--learnig_rate", "1e-5"], "unknown flag --learnig_rate; did you mean --learning_rate? (see --help)"),
    (["--use_cl_reward=3"], "unknown flag --use_cl_reward; did you mean --use_cl_reward_num? (see --help)"),
    (["--frobnicate", "1"], "unknown flag --frobnicate (see --help)"),
])
def test_an_unknown_flag_stops_before_the_model_loads_naming_the_closest(argv, message, tmp_path, capsys):
    # the model does not exist: the flag is what stops the run, not a missing model
    code, out = run_cli(["train", "configs/mcmdpo.yaml", "--model_name_or_path", str(tmp_path / "none"),
                         "--output_dir", str(tmp_path / "out"), *argv], capsys)
    assert code == 2 and out.strip().splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,message", [
    ("beta: 0.1\ntask: DPO\nbeta: 0.2\n", "key 'beta' is given twice (lines 1 and 3)"),
    ("beta: [0.2, 0.3]\n", "beta: a list ([0.2, 0.3]), but --beta takes one value"),
    ("report_to: [wandb, tensorboard]\n", "report_to: a list (['wandb', 'tensorboard']), but --report_to takes one value"),
    ("learnig_rate: 1.0e-5\n", "'learnig_rate' is not a training flag; did you mean 'learning_rate'? (see --help)"),
])
def test_a_settings_file_with_a_duplicate_a_list_or_a_misspelling_stops_naming_file_and_key(text, message, tmp_path,
                                                                                           capsys):
    f = tmp_path / "mine.yaml"
    f.write_text(text)
    code, out = run_cli(["train", str(f), "--model_name_or_path", str(tmp_path / "none")], capsys)
    last = out.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"error: {f}: ") and message in last, out


# -- 5. image messages: where it looked, and the folder that works ------------------------------------


def test_inference_without_image_folder_names_the_path_tried_and_the_folder_that_works(tiny_llava_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    """The authors' bare file names, no --image_folder: the images sit in the data file's images/ folder."""
    fixtures = REPO / "tests" / "fixtures" / "inference"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mcmdpo_inference.py", "--model_name", str(tiny_llava_dir), "--test_datasets",
                                      str(fixtures / "test.jsonl"), "--eval_output", "o.jsonl", "--no_progress"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "mcmdpo_inference.py"), run_name="__main__")
    assert e.value.code == 2
    err = capsys.readouterr().err
    n = len((fixtures / "test.jsonl").read_text().splitlines())
    assert "0 images verified in " in err and f"(0 opened, 0 unchanged since verified before); {n} records with a " \
        "missing, unreadable or refused image" in err
    assert (f"{fixtures}/test.jsonl, record 0, line 1, field 'image_path': image file not found: {tmp_path}/img0.png "
            f"(no --image_folder: from the current directory); it is in {fixtures}/images: "
            f"pass --image_folder {fixtures}/images") in err


# -- 6. a line before DeepSpeed's first CPU-op build -------------------------------------------------


def test_a_deepspeed_cpu_op_build_is_announced_unless_this_installation_built_it(tmp_path, monkeypatch):
    import deepspeed

    from llava.train.deepspeed_host import SHM_OP, cpu_op_build_note

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cpu_op_build_note().startswith("building DeepSpeed's CPU op once, about a minute")  # nothing built
    build = tmp_path / SHM_OP
    build.mkdir()
    (build / f"{SHM_OP}.so").write_bytes(b"")
    sources = Path(deepspeed.__file__).parent / "ops" / "csrc" / "cpu" / "comm" / "shm.cpp"
    (build / "build.ninja").write_text("build shm.o: compile /another/env/site-packages/deepspeed/ops/csrc/cpu/comm/shm.cpp\n")
    assert cpu_op_build_note() is not None  # another environment's build: ninja rebuilds it for this one
    (build / "build.ninja").write_text(f"build shm.o: compile {sources}\n")
    assert cpu_op_build_note() is None
    setup = subprocess.run(["make", "-n", "setup"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert "-m llava.train.deepspeed_host" in setup.stdout  # make setup builds it ahead
