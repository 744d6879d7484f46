"""``llava-mcmdpo``: its subcommands, the YAML settings files, the scripts that use them, one name per flag."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llava import cli
from llava.train.arguments import config_argv, expand_config, parse_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"sft.sh": "configs/sft.yaml", "dpo.sh": "configs/dpo.yaml", "mcmdpo.sh": "configs/mcmdpo.yaml"}


def run_cli(argv, capsys):
    """(exit status, stdout + stderr) of ``llava-mcmdpo argv``."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code if isinstance(code, int) else (0 if code is None else 1), out.out + out.err


# -- the command and its subcommands ---------------------------------------------------------------


def test_the_console_script_is_declared():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["llava-mcmdpo"] == "llava.cli:main"
    assert project["scripts"]["llava-check"] == "llava.data.check:main"
    assert any(d.startswith("pyyaml") for d in project["dependencies"])


def test_help_lists_the_subcommands_and_a_bad_one_is_refused(capsys):
    code, out = run_cli(["--help"], capsys)
    assert code == 0
    for name in ("train", "infer", "score", "report", "check", "show", "convert", "merge", "curves"):
        assert f"\n    {name} " in out
    code, out = run_cli(["nope"], capsys)
    assert code == 2 and "invalid choice: 'nope' (choose from 'train', 'infer'," in out
    code, out = run_cli([], capsys)
    assert code == 2 and "required: COMMAND" in out


@pytest.mark.parametrize("argv,choices", [
    (["infer", "--help"], ["--dtype {auto,float32,bfloat16,float16}", "--image_aspect_ratio {pad,square,anyres}",
                           "--version {"]),
    (["score", "--help"], ["--metrics {coco,published,all}"]),
    (["check", "--help"], ["--task {sft,preference,test}"]),
    (["show", "--help"], ["--task {sft,preference,test}", "--image_aspect_ratio {pad,square,anyres}"]),
    (["convert", "to-hf", "--help"], ["--dtype {auto,float32,bfloat16,float16}"]),
    (["convert", "--help"], ["{to-hf,to-original}"]),
    (["merge", "--help"], ["--dtype {auto,float32,bfloat16,float16}"]),
    (["report", "--help"], ["--data_path JSONL", "--output HTML"]),
    (["curves", "--help"], ["--output OUT"]),
    (["train", "--help"], ["--lr_scheduler_type {", "--report_to"]),
])
def test_each_subcommand_help_lists_its_choices(argv, choices, capsys):
    code, out = run_cli(argv, capsys)
    assert code == 0, out
    text = " ".join(out.split())  # argparse wraps long choice lists
    for choice in choices:
        assert " ".join(choice.split()) in text, (choice, out[:2000])


def test_the_module_runs_as_the_command():
    result = subprocess.run([sys.executable, "-m", "llava.cli", "merge", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and "--model_name_or_path ADAPTER" in result.stdout


# -- YAML settings files ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted(CONFIGS.values()))
def test_every_setting_of_a_file_reaches_the_parsed_arguments(config):
    """Each key of the YAML, read with yaml alone, equals the field it names after parsing."""
    settings = yaml.safe_load((REPO / config).read_text())
    parsed = {k: v for dc in parse_args([str(REPO / config)]) for k, v in vars(dc).items()}
    for key, value in settings.items():
        expected = [value] if key == "report_to" else value
        assert parsed[key] == expected, key


def test_flags_after_the_file_win(tmp_path):
    """argparse keeps the last value of a repeated flag: the command line overrides the file."""
    _, _, base = parse_args(["configs/mcmdpo.yaml"])
    model, data, args = parse_args(["configs/mcmdpo.yaml", "--learning_rate", "1e-3", "--gradient_checkpointing", "False",
                                    "--report_to", "none", "--use_cl_reward_num", "3", "--data_path", "x.json"])
    assert (base.learning_rate, base.gradient_checkpointing, base.report_to) == (5e-7, True, ["wandb"])
    assert (args.learning_rate, args.gradient_checkpointing, args.report_to, args.use_cl_reward_num) == (1e-3, False, [], 3)
    assert data.data_path == "x.json" and model.model_name_or_path == "outputs/sft"
    assert args.term_weights["context"] == 0.5 and args.term_weights["context_response"] == 0.0


def test_a_file_after_deepspeeds_local_rank_is_read():
    argv = ["--local_rank=0", "configs/dpo.yaml", "--beta", "0.2"]
    expanded = expand_config(argv)
    assert expanded[:2] == ["--model_name_or_path", "outputs/sft"] and expanded[-3:] == ["--local_rank=0", "--beta", "0.2"]
    assert expand_config(["--beta", "0.2"]) == ["--beta", "0.2"]  # no file: unchanged


def test_values_become_flag_words(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("bf16: true\nlearning_rate: 1.0e-5\nlabel_names: [labels, ids]\nreport_to: [wandb]\nversion: v1\n")
    assert config_argv(str(f)) == ["--bf16", "True", "--learning_rate", "1e-05", "--label_names", "labels", "ids",
                                   "--report_to", "wandb", "--version", "v1"]
    f.write_text("")
    assert config_argv(str(f)) == []


@pytest.mark.parametrize("text,message", [
    ("learning_rat: 1.0e-5\n", "'learning_rat' is not a training flag"),
    ("- a\n- b\n", "expected a mapping of flag names to values, got a list"),
    ("beta: null\n", "beta: expected a value or a list of values, got None"),
    ("beta: {a: 1}\n", "beta: expected a value or a list of values"),
    ("beta: [1\n", "not valid YAML"),
])
def test_bad_files_stop_with_one_line_naming_file_and_key(text, message, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        parse_args([str(f)])
    assert str(e.value).startswith(f"{f}: ") and message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="settings file not found"):
        parse_args([str(tmp_path / "none.yaml")])


def test_train_reports_a_bad_file_in_one_line(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("learning_rat: 1\n")
    code, out = run_cli(["train", str(f)], capsys)
    assert code == 2 and out.strip().splitlines()[-1] == \
        f"error: {f}: 'learning_rat' is not a training flag; did you mean 'learning_rate'? (see --help)"


# -- the scripts run the files' settings -------------------------------------------------------------


def script_argv(script, tmp_path, **env):
    """The trainer's words in the command ``bash scripts/SCRIPT --max_steps 2`` prints with DRY_RUN=1
    (on this host: no CUDA), the DeepSpeed config left out (host-specific, and parsing it registers ZeRO-3
    process-wide)."""
    keep = {k: v for k, v in os.environ.items()
            if k not in ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", "HOSTFILE", "TERMS", "CL_REWARD_NUM", "EPOCHS", "LR",
                         "BATCH_SIZE", "GRAD_ACCUM", "BETA", "IMAGE_TYPE", "PARADIGM", "REPORT_TO", "RESUME",
                         "SAVE_STEPS", "SAVE_TOTAL_LIMIT", "CONFIG", "MODEL_PATH", "DATA_PATH", "IMAGE_FOLDER",
                         "OUTPUT_DIR", "VISION_TOWER", "PRECISION", "NUM_WORKERS")}
    # MODEL_PATH as the stage's default, set so that its absence does not stop the dry run
    default_model = "outputs/tiny-llava" if script == "sft.sh" else "outputs/sft"
    result = subprocess.run(["bash", f"scripts/{script}", "--max_steps", "2"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**keep, "DRY_RUN": "1", "PYTHON": sys.executable, "MODEL_PATH": default_model,
                                              **env})
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    argv = words[words.index(str(REPO / "llava/train/train.py")) + 1:]
    i = argv.index("--deepspeed")
    assert argv[i + 1] == str(REPO / "scripts/zero3.json")
    return argv[:i] + argv[i + 2:]


def as_fields(parsed):
    """Every field of the parsed dataclasses; paths the scripts make absolute taken relative to the repository."""
    from dataclasses import fields

    out = {}
    for dc in parsed:
        for key, value in ((f.name, getattr(dc, f.name)) for f in fields(dc)):
            if isinstance(value, str) and value.startswith(f"{REPO}/"):
                value = value[len(f"{REPO}/"):]
            out[key] = value
    return out


@pytest.mark.parametrize("script", sorted(CONFIGS))
def test_the_script_and_the_command_run_the_same_flags(script, tmp_path):
    """``bash scripts/X.sh --max_steps 2`` and ``llava-mcmdpo train configs/X.yaml --max_steps 2``: the same
    parsed arguments, field for field (the scripts add only the launcher, the DeepSpeed config and the
    host's precision and workers, which on this CPU host are the trainer's defaults)."""
    from_script = as_fields(parse_args(script_argv(script, tmp_path)))
    from_command = as_fields(parse_args([CONFIGS[script], "--max_steps", "2"]))
    differ = {k for k in from_script if from_script[k] != from_command[k]}
    assert not differ, {k: (from_script[k], from_command[k]) for k in differ}
    assert from_script["max_steps"] == 2


def test_the_scripts_say_no_released_number():
    """The released settings are written in configs/ only: the stage scripts and common.sh (comments
    aside) hold none of their values and pass none of the files' flags, bar the paths and the flags of
    the variables that override the files (``VAR=--flag`` in set_flags, PARADIGM's tower flag)."""
    import re

    keys = set().union(*(yaml.safe_load((REPO / c).read_text()) for c in CONFIGS.values()))
    for script in ("common.sh", *CONFIGS):
        code = "\n".join(line.split("#")[0] for line in (REPO / "scripts" / script).read_text().splitlines())
        for value in ("2e-5", "5e-7", "2.8", "0.03", "0.1", "700", "cosine", "mlp2x_gelu", "diffusion"):
            assert value not in code, (script, value)
        named = set(re.findall(r"(?<![=\w-])--(\w+)", code))
        assert named & keys <= {"model_name_or_path", "data_path", "image_folder", "output_dir",
                                "unfreeze_mm_vision_tower", "resume_from_checkpoint"}, script  # the last: RESUME's, in the plan


def test_variables_override_the_file(tmp_path):
    env = {"EPOCHS": "3", "LR": "1e-4", "BATCH_SIZE": "2", "GRAD_ACCUM": "4", "BETA": "0.3", "IMAGE_TYPE": "black",
           "CL_REWARD_NUM": "4", "SAVE_STEPS": "7", "SAVE_TOTAL_LIMIT": "5", "REPORT_TO": "none", "RESUME": "never",
           "PARADIGM": "a"}
    model, data, args = parse_args(script_argv("mcmdpo.sh", tmp_path, **env))
    assert (args.num_train_epochs, args.learning_rate, args.per_device_train_batch_size, args.gradient_accumulation_steps,
            args.beta, args.use_image_type, args.use_cl_reward_num, args.save_steps, args.save_total_limit,
            args.report_to, args.resume_from_checkpoint) == (3, 1e-4, 2, 4, 0.3, "black", 4, 7, 5, [], "never")
    assert model.unfreeze_mm_vision_tower is False
    # TERMS, CL_REWARD_NUM's old name, is still read; the new name wins when both are set
    assert parse_args(script_argv("mcmdpo.sh", tmp_path, TERMS="3"))[2].use_cl_reward_num == 3
    assert parse_args(script_argv("mcmdpo.sh", tmp_path, TERMS="3", CL_REWARD_NUM="5"))[2].use_cl_reward_num == 5
    # another settings file, relative to the caller's directory
    (tmp_path / "mine.yaml").write_text("beta: 0.5\ntask: DPO\n")
    result = subprocess.run(["bash", str(REPO / "scripts/dpo.sh")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "CONFIG": "mine.yaml",
                                 "MODEL_PATH": "m", "SAMPLE_DATA": "1"})
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[shlex.split(result.stdout).index(str(REPO / "llava/train/train.py")) + 1] == \
        str(tmp_path / "mine.yaml")
    missing = subprocess.run(["bash", str(REPO / "scripts/dpo.sh")], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable,
                                               "CONFIG": "none.yaml", "MODEL_PATH": "m", "SAMPLE_DATA": "1"})
    assert missing.returncode == 2 and missing.stderr.strip() == f"no settings file {tmp_path}/none.yaml (CONFIG)"


@pytest.mark.slow
def test_train_from_a_file_with_overrides(tiny_llava_dir, preference_file, tmp_path, capsys, caplog):
    """``llava-mcmdpo train configs/mcmdpo.yaml --flag value ...`` trains: MCM-DPO's seven terms logged,
    the overrides in the saved arguments; train.log holds the plan, the command and the steps, and the
    model card's command is the one that ran, settings file first."""
    import logging

    caplog.set_level(logging.INFO)  # as the command's own logging set-up does
    out = tmp_path / "out"
    code, log = run_cli(["train", "configs/mcmdpo.yaml", "--model_name_or_path", str(tiny_llava_dir),
                         "--data_path", str(preference_file), "--image_folder", str(preference_file.parent),
                         "--output_dir", str(out), "--max_steps", "1", "--gradient_accumulation_steps", "1",
                         "--report_to", "none", "--save_strategy", "no", "--gradient_checkpointing", "False",
                         "--resume_from_checkpoint", "never"], capsys)
    assert code == 0, log[-3000:]
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["step"] for h in logs] == [1] and "mcm/all/margin" in logs[0]
    saved = torch.load(out / "training_args.bin", weights_only=False)
    assert (saved.learning_rate, saved.num_train_epochs, saved.use_cl_reward_num, saved.diffusion_step) == (5e-7, 2, 7, 700)
    train_log = (out / "train.log").read_text()
    assert "plan of this run:\n" in train_log and "\n  task          MCM-DPO, settings configs/mcmdpo.yaml\n" in train_log
    assert "\n  ZeRO config   none (no DeepSpeed)\n" in train_log and "\n  resume        afresh (" in train_log
    assert train_log.count(" llava.train.log: step 1: ") == 2  # the step, and the run's summary
    card = (out / "README.md").read_text()
    assert "```bash\npython -m llava.train.train \\\n    configs/mcmdpo.yaml \\\n    --model_name_or_path " in card


# -- merge ---------------------------------------------------------------------------------------------


def test_merge_folds_a_lora_adapter_into_a_plain_checkpoint(tiny_llava_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from llava.model.load import checkpoint_kind, load_model

    model, _ = load_model(tiny_llava_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 23, 42]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    code, out = run_cli(["merge", "--model_name_or_path", str(tmp_path / "adapter"), "--model_base", str(tiny_llava_dir),
                         "--output_dir", str(tmp_path / "merged")], capsys)
    assert code == 0 and f"wrote {tmp_path / 'merged'}" in out.splitlines(), out
    assert checkpoint_kind(tmp_path / "merged") == "hf" and not (tmp_path / "merged/adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        plain, _ = load_model(tiny_llava_dir)
        unadapted = plain(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unadapted, atol=1e-4)  # the adapter changed something: the merge shows it

    code, out = run_cli(["merge", "--model_name_or_path", str(tiny_llava_dir), "--output_dir", str(tmp_path / "x")], capsys)
    assert code == 2 and f"error: {tiny_llava_dir}: not a LoRA adapter" in out and not (tmp_path / "x").exists()


# -- one name per thing; the old names still work ----------------------------------------------------


def namespace(build_parser, argv):
    return vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("new,old", [
    (["--model_name_or_path", "m", "--data_path", "a", "b", "--output", "o.jsonl", "--version", "v1", "--dtype", "float16"],
     ["--model_name", "m", "--test_datasets", "a", "b", "--eval_output", "o.jsonl", "--conv_mode", "v1", "--dtype", "float16"]),
    (["--model_name_or_path", "m", "--data_path", "a", "--output", "o.jsonl"],
     ["--model-path", "m", "--test_datasets", "a", "--eval_output", "o.jsonl"]),
    (["--model_name_or_path", "m", "--data_path", "a", "--output", "o.jsonl"],
     ["--model_path", "m", "--test_datasets", "a", "--eval_output", "o.jsonl"]),
])
def test_infer_new_and_old_names(new, old):
    from llava.eval.inference import build_parser

    assert namespace(build_parser, new) == namespace(build_parser, old)
    assert namespace(build_parser, new)["test_datasets"] == new[3:4] + (["b"] if "b" in new else [])


def test_score_report_curves_alt_text_new_and_old_names():
    from llava.eval import alt_text, report, score

    assert namespace(score.build_parser, ["--data_path", "a", "b", "--output_dir", "d"]) == \
        namespace(score.build_parser, ["--file", "a", "b", "--out_dir", "d"]) == \
        {"file": ["a", "b"], "dir": None, "out_dir": "d", "metrics": "all", "overwrite": False}
    assert namespace(report.build_parser, ["--data_path", "a", "--output", "p.html"]) == \
        namespace(report.build_parser, ["--files", "a", "--out", "p.html"])
    assert namespace(alt_text.build_parser, ["--model_name_or_path", "m", "--image", "i"]) == \
        namespace(alt_text.build_parser, ["--model_name", "m", "--image", "i"])


def test_curves_and_convert_take_output_and_out(tmp_path, capsys):
    from llava.eval import curves

    assert curves.main(["--runs", f"a={tmp_path}", "--output", str(tmp_path / "c.png")]) == 2
    new = capsys.readouterr().err
    assert curves.main(["--runs", f"a={tmp_path}", "--out", str(tmp_path / "c.png")]) == 2
    assert capsys.readouterr().err == new and new.startswith("curves: error:")
    for argv in (["convert", "to-hf", "--model_name_or_path", str(tmp_path / "no"), "--output_dir", str(tmp_path / "o")],
                 ["convert", "to-hf", "--src", str(tmp_path / "no"), "--out", str(tmp_path / "o")]):
        with pytest.raises(Exception) as e:  # the converter's own error: the flags were accepted
            cli.main(argv)
        assert not isinstance(e.value, SystemExit) and str(tmp_path / "no") in str(e.value)


def test_check_and_show_take_data_path_or_the_positional_file(tmp_path, capsys):
    data = REPO / "data/sample/sft.json"
    if not data.is_file():
        pytest.skip("data/sample/sft.json is not in this checkout")
    flags = ["--image_folder", str(data.parent), "--no_image_open", "--task", "sft"]
    code, positional = run_cli(["check", str(data), *flags], capsys)
    code2, named = run_cli(["check", "--data_path", str(data), *flags], capsys)
    assert code == code2 == 0 and positional == named and "result: OK" in named
    code, out = run_cli(["check"], capsys)
    assert code == 2 and "no data file: give FILE ... or --data_path FILE ..." in out
    code, out = run_cli(["show", "--model_name_or_path", "m"], capsys)
    assert code == 2 and "give the data file once: FILE or --data_path FILE" in out
    code, out = run_cli(["show", str(data), "--data_path", str(data), "--model", "m"], capsys)
    assert code == 2 and "give the data file once" in out


@pytest.mark.parametrize("module, argv, message", [
    ("llava.eval.inference", ["--model_name", "m", "--test_datasets", "t", "--eval_output", "o", "--num_beam", "3"],
     "unrecognized arguments: --num_beam 3 (--num_beam: did you mean --num_beams?)"),
    ("llava.eval.score", ["--file", "a.jsonl", "--out_dirr", "s"], "(--out_dirr: did you mean --out_dir"),
    ("llava.eval.inference", ["--model_name", "m", "--test_datasets", "t", "--eval_output", "o", "--max_new", "3"],
     "unrecognized arguments: --max_new 3"),  # never a prefix of --max_new_tokens
])
def test_unknown_flags_of_the_other_commands_name_the_closest(module, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).build_parser().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
