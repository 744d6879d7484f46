"""The launcher (llava/train/launch.py): the command it assembles from its flags and the host, its one-line
refusals, and the stage scripts' DRY_RUN output, which is its command."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llava.train.launch import (REPO, TRAIN_PY, Host, Launch, LaunchError, build_parser, shell_quote, wants_launch,
                                without_nproc_1)
from tests.test_cli import run_cli

GPU_HOST = Host(gpus=8, cpus=32)
CPU_HOST = Host(gpus=0, cpus=2)
RUNNER = str(Path(sys.executable).parent / "deepspeed")  # the deepspeed runner beside the interpreter


def launch(*argv, cwd=REPO):
    options, trainer = build_parser().parse_known_args(list(argv))
    return Launch(options, trainer, Path(cwd))


def test_a_gpu_node_the_settings_first_then_config_precision_workers_then_the_trainer_flags():
    env, command = launch("configs/dpo.yaml", "--nproc", "4", "--zero", "2", "--max_steps", "2").command(GPU_HOST)
    assert env == []
    assert command == [RUNNER, "--num_gpus", "4", "--master_port", "29500", str(TRAIN_PY), "configs/dpo.yaml",
                       "--deepspeed", str(REPO / "scripts/zero2.json"), "--bf16", "True", "--fp16", "False", "--tf32", "True",
                       "--dataloader_num_workers", "4", "--max_steps", "2"]
    # without --nproc: every GPU torch sees; ZeRO-3 as released; fp16 and own workers on request
    _, command = launch("configs/sft.yaml", "--zero", "3_offload", "--precision", "fp16", "--num_workers", "2").command(GPU_HOST)
    assert command[1:3] == ["--num_gpus", "8"]
    i = command.index("--deepspeed")
    assert command[i:i + 10] == ["--deepspeed", str(REPO / "scripts/zero3_offload.json"), "--bf16", "False", "--fp16",
                                 "True", "--tf32", "True", "--dataloader_num_workers", "2"]


def test_a_cpu_host_runs_one_fp32_process_without_tf32_or_workers():
    _, command = launch("configs/mcmdpo.yaml", "--zero", "zero3").command(CPU_HOST)
    assert command[1:3] == ["--num_gpus", "1"] and "--tf32" not in command
    i = command.index("--deepspeed")
    assert command[i + 2:] == ["--bf16", "False", "--fp16", "False", "--dataloader_num_workers", "0"]


def test_the_gpu_mask_is_the_launchers_and_counts_are_checked_in_the_callers_words():
    masked = Host(gpus=2, cpus=32, visible="2,3")
    env, command = launch("configs/dpo.yaml", "--nproc", "1", "--zero", "3").command(masked)
    # DeepSpeed's --num_gpus N would run on GPUs 0..N-1 whatever the mask says
    assert env == ["CUDA_VISIBLE_DEVICES=2"] and "--num_gpus" not in command
    with pytest.raises(LaunchError, match=r"^--nproc 3 but CUDA_VISIBLE_DEVICES=2,3 lists 2 GPU\(s\)$"):
        launch("--nproc", "3").command(masked)
    with pytest.raises(LaunchError, match=r"^NUM_GPUS=3 but CUDA_VISIBLE_DEVICES=2,3 lists 2 GPU\(s\)$"):
        launch("--nproc", "3", "--script", "dpo.sh").command(masked)
    with pytest.raises(LaunchError, match=r"^--nproc 3 but CUDA_VISIBLE_DEVICES=2,3, lists 2 GPU\(s\)$"):
        launch("--nproc", "3").command(Host(gpus=2, cpus=32, visible="2,3,"))  # a trailing comma is no third GPU
    assert launch("--nproc", "2").command(Host(gpus=2, cpus=32, visible="2, 3,"))[0] == ["CUDA_VISIBLE_DEVICES=2,3"]
    with pytest.raises(LaunchError, match=r"^--nproc 9 but this host has 8 GPU\(s\)$"):
        launch("--nproc", "9").command(GPU_HOST)
    for bad, message in ((["--nproc", "0"], "--nproc must be a positive number (got 0)"),
                         (["--precision", "fp8"], "--precision must be bf16, fp16 or fp32 (got fp8)"),
                         (["--zero", "4"], f"no DeepSpeed config {REPO}/scripts/4.json (--zero 4)"),
                         (["--zero", "mine.json", "--script", "sft.sh"], f"no DeepSpeed config {REPO}/mine.json (ZERO=mine.json)")):
        with pytest.raises(LaunchError) as e:
            launch(*bad).command(CPU_HOST)
        assert str(e.value) == message


def test_nodes_from_a_hostfile_or_one_launcher_per_node(tmp_path):
    (tmp_path / "hosts").write_text("a slots=4\nb slots=4\n")
    _, command = launch("--nproc", "4", "--hostfile", "hosts", cwd=tmp_path).command(GPU_HOST)
    assert command[:5] == [RUNNER, "--hostfile", str(tmp_path / "hosts"), "--master_port", "29500"]
    _, command = launch("--hostfile", "hosts", "--node_rank", "1", "--master_addr", "a", "--master_port", "1234",
                        cwd=tmp_path).command(GPU_HOST)
    assert command[3:10] == ["--no_ssh", "--node_rank", "1", "--master_addr", "a", "--master_port", "1234"]
    with pytest.raises(LaunchError, match="^MASTER_ADDR is needed with NODE_RANK$"):
        launch("--hostfile", "hosts", "--node_rank", "1", "--script", "dpo.sh", cwd=tmp_path).command(GPU_HOST)
    # --nnodes without a hostfile (SLURM: srun starts one launcher per node): DeepSpeed reads the node count
    # from a hostfile of as many lines; with --no_ssh the names are never looked up
    _, command = launch("--nproc", "2", "--nnodes", "3", "--node_rank", "2", "--master_addr", "n0").command(GPU_HOST)
    assert Path(command[2]).read_text() == "node0 slots=2\nnode1 slots=2\nnode2 slots=2\n"
    assert command[3:8] == ["--no_ssh", "--node_rank", "2", "--master_addr", "n0"]
    with pytest.raises(LaunchError, match="give --node_rank and --master_addr"):
        launch("--nnodes", "2").command(GPU_HOST)


def test_a_global_batch_becomes_the_accumulation_in_place():
    _, command = launch("--nproc", "2", "--per_device_train_batch_size", "4", "--global_batch", "256", "--lr", "1").command(GPU_HOST)
    assert command[-6:] == ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "32", "--lr", "1"]
    _, command = launch("--per_device_train_batch_size", "32", "--global_batch", "256").command(GPU_HOST)
    assert command[-2:] == ["--gradient_accumulation_steps", "1"]  # 8 GPUs x 32: at least 1


def test_which_command_lines_launch(capsys):
    assert not wants_launch(["configs/sft.yaml", "--max_steps", "2"])
    assert not wants_launch(["configs/sft.yaml", "--nproc", "1", "--max_steps", "2"])  # one process: in-process
    assert wants_launch(["configs/sft.yaml", "--nproc", "1", "--zero", "2"]) and wants_launch(["--nproc=2"])
    assert without_nproc_1(["configs/sft.yaml", "--nproc", "1", "--max_steps", "2"]) == ["configs/sft.yaml", "--max_steps", "2"]
    code, out = run_cli(["train", "--nproc", "1", "--help"], capsys)  # the trainer's help: it runs here
    assert code == 0 and "usage: llava-mcmdpo train [SETTINGS.yaml]" in out
    code, out = run_cli(["train", "--nproc", "2", "--help"], capsys)  # the launcher's
    assert code == 0 and "--zero ZERO" in out and "--nnodes NNODES" in out
    code, out = run_cli(["train", "configs/sft.yaml", "--precision", "bf16", "--dry_run"], capsys)
    assert (code, out) == (2, "error: --dry_run, --precision: for DeepSpeed's launcher only; add --nproc N (N > 1) or --zero\n")


def test_words_are_quoted_as_bash_printf_q_quotes_them():
    words = ["plain/path-1.0_x", "2,3", '{"image":1.0}', "a b", "~home", "x=~y", "#c", "d#", "it's", "$HOME", ""]
    bash = subprocess.run(["bash", "-c", 'printf "%q\\n" "$@"', "-", *words], capture_output=True, text=True, check=True)
    assert [shell_quote(w) for w in words] == bash.stdout.split("\n")[:-1]


def test_the_plan_names_the_newest_checkpoint_and_the_callers_arguments(tmp_path):
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    plan = launch("configs/mcmdpo.yaml", "--script", "mcmdpo.sh", "--nproc", "2", "--defaulted", "DATA_PATH",
                  "--caller_arguments", "2", "--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path),
                  "--max_steps", "2").plan(CPU_HOST)
    assert plan == ["plan of scripts/mcmdpo.sh:", "  model         m", "  data          d   (default)",
                    "  image folder  None", f"  output dir    {tmp_path}", "  task          MCM-DPO, settings configs/mcmdpo.yaml",
                    f"  ZeRO config   {REPO}/scripts/zero3.json", "  precision     fp32",
                    "  processes     2 CPU process(es) per node, 1 node(s)",
                    f"  resume        continues from {tmp_path}/checkpoint-10 (RESUME=auto; RESUME=never starts afresh)",
                    "  arguments     --max_steps 2"]


def test_a_stage_script_prints_the_launchers_command(tmp_path, capsys):
    """``DRY_RUN=1 bash scripts/mcmdpo.sh`` with its variables prints what ``llava-mcmdpo train CONFIG --nproc 2
    --zero 2 --dry_run`` with the same paths prints: the script is the launcher with its variables as flags."""
    (tmp_path / "ckpt").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "HOSTFILE", "NODE_RANK", "PRECISION",
                                                             "NUM_WORKERS", "MASTER_PORT", "CONFIG", "RESUME")}
    script = subprocess.run(["bash", str(REPO / "scripts/mcmdpo.sh"), "--max_steps", "2"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**env, "DRY_RUN": "1", "PYTHON": sys.executable, "NUM_GPUS": "2",
                                                         "ZERO": "zero2", "MODEL_PATH": "ckpt", "DATA_PATH": "p.json",
                                                         "IMAGE_FOLDER": ".", "OUTPUT_DIR": "out", "BETA": "0.2"})
    assert script.returncode == 0, script.stderr
    paths = ["--model_name_or_path", f"{tmp_path}/ckpt", "--data_path", "p.json", "--image_folder", f"{tmp_path}/.",
             "--output_dir", f"{tmp_path}/out"]  # p.json does not exist here: left as given (a hub name)
    code, out = run_cli(["train", str(REPO / "configs/mcmdpo.yaml"), "--nproc", "2", "--zero", "2", "--dry_run", *paths,
                         "--beta", "0.2", "--max_steps", "2"], capsys)
    assert code == 0 and script.stdout == out
    words = shlex.split(out)
    assert words[:3] == [RUNNER, "--num_gpus", "2"] and words[-4:] == ["--beta", "0.2", "--max_steps", "2"]
    assert "plan of scripts/mcmdpo.sh:\n  model         " + f"{tmp_path}/ckpt\n" in script.stderr
