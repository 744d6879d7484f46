"""The shipped scripts end to end: DeepSpeed on 2 CPU processes, checkpoints plain transformers loads."""

import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TERMS = ("response", "image", "context", "context_response", "image_response", "context_image", "all")

LOADS_IN_PLAIN_TRANSFORMERS = """
import sys
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1])
processor = AutoProcessor.from_pretrained(sys.argv[1])
assert "llava" not in sys.modules, "the project was imported"
print(type(model).__name__, type(processor).__name__)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script, out, model, data, steps=3, extra=(), **env):
    full_env = {**os.environ, "MODEL_PATH": str(model), "DATA_PATH": str(data), "IMAGE_FOLDER": str(data.parent),
                "OUTPUT_DIR": str(out), "NUM_GPUS": "2", "REPORT_TO": "none", "MASTER_PORT": str(free_port()),
                "PYTHON": sys.executable, **env}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: unset
    result = subprocess.run(["bash", f"scripts/{script}", "--max_steps", str(steps), "--gradient_accumulation_steps", "1",
                             "--save_strategy", "no", *extra], cwd=REPO, env=full_env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # DeepSpeed's CPU all-reduce makes a 67 MB /dev/shm file per rank and never unlinks it; the run does
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{full_env['MASTER_PORT']}_*"))
    assert not leaked, leaked
    return result


def check_run(out, script, result=None, report_to="none", steps=2):
    """Finite losses at each step, the stage's metrics, the logs asked for and a model plain transformers
    loads; for a stage script's run (``result``), also what it printed and left (``what_a_run_says``)."""
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["step"] for h in logs] == list(range(1, steps + 1))
    assert all(math.isfinite(h["loss"]) for h in logs)
    if result is not None:
        what_a_run_says(script, "zero3", out, result)
    if script != "sft.sh":
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(logs[0])
    if script == "mcmdpo.sh":
        assert {f"mcm/{t}/margin" for t in TERMS} <= set(logs[0])
        assert {f"mcm/{t}/accuracy" for t in TERMS} <= set(logs[0])
    if report_to == "tensorboard":
        assert list(out.rglob("events.out.tfevents.*"))
    if report_to == "wandb":
        assert f"wandb: no API key or login found, logging offline to {out}/wandb; " in result.stdout
        assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    loaded = subprocess.run([sys.executable, "-c", LOADS_IN_PLAIN_TRANSFORMERS, str(out)], cwd=out.parent,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    # an original-format LLaVA-1.6 stays a LLaVA-NeXT (trained here on one padded view, as the paper does)
    assert loaded.stdout.split() in (["LlavaForConditionalGeneration", "LlavaProcessor"],
                                     ["LlavaNextForConditionalGeneration", "LlavaNextProcessor"])


@pytest.mark.slow
def test_the_published_pipeline_on_an_original_format_llava_16(preference_file, tmp_path):
    """The released pipeline as a researcher runs it, on a tiny LLaVA-1.6 in LLaVA's original layout with the
    tower beside it (liuhaotian's layout), ZeRO-3 and bf16 on 2 CPU processes: sft.sh, then mcmdpo.sh and
    dpo.sh from the SFT and dpo.sh straight from the checkpoint; the released SFT command line verbatim
    (deepspeed llava/train/train_mem.py, only paths changed); then inference and scoring with the
    released flag names. Every step exits 0; each run logs finite losses and loads in plain transformers."""
    from llava.model.convert import main as convert
    from llava.model.tiny import write

    orig = tmp_path / "orig"
    convert(["to-original", "--src", str(write(tmp_path / "hf", arch="llava_next", seed=0)), "--out", str(orig),
             "--separate_vision_tower"])
    common = dict(ZERO="zero3", PRECISION="bf16")
    run = lambda script, model, out, **env: run_script(script, out, model, preference_file, steps=2,  # noqa: E731
                                                       extra=["--image_aspect_ratio", "pad"], **common, **env)
    check_run(tmp_path / "sft", "sft.sh", run("sft.sh", orig, tmp_path / "sft"))
    # wandb as on a compute node that was never logged in: no key, no netrc, WANDB_MODE unset
    home = tmp_path / "home"
    result = run("mcmdpo.sh", tmp_path / "sft", tmp_path / "mcmdpo", REPORT_TO="wandb", HOME=str(home),
                 NETRC=str(home / ".netrc"), WANDB_CONFIG_DIR=str(home / "wandb"), WANDB_CACHE_DIR=str(home / "cache"),
                 WANDB_MODE=None, WANDB_API_KEY=None, WANDB_DIR=None)
    check_run(tmp_path / "mcmdpo", "mcmdpo.sh", result, "wandb")
    check_run(tmp_path / "dpo", "dpo.sh", run("dpo.sh", tmp_path / "sft", tmp_path / "dpo", REPORT_TO="tensorboard"),
              "tensorboard")
    check_run(tmp_path / "dpo_from_orig", "dpo.sh", run("dpo.sh", orig, tmp_path / "dpo_from_orig"))

    # the released SFT line (scripts/v1_5/finetune_task.sh's flags), with a checkpoint and data of ours
    released = ["--deepspeed", "./scripts/zero3.json", "--model_name_or_path", str(orig), "--version", "v1",
                "--data_path", str(preference_file), "--image_folder", str(preference_file.parent),
                "--vision_tower", "openai/clip-vit-large-patch14-336", "--mm_projector_type", "mlp2x_gelu",
                "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
                "--image_aspect_ratio", "pad", "--group_by_modality_length", "True", "--bf16", "True",
                "--output_dir", str(tmp_path / "released"), "--num_train_epochs", "1", "--per_device_train_batch_size", "1",
                "--gradient_accumulation_steps", "2", "--learning_rate", "2e-5", "--weight_decay", "0.",
                "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--tf32", "True",
                "--model_max_length", "2048", "--gradient_checkpointing", "True", "--dataloader_num_workers", "0",
                "--lazy_preprocess", "True", "--report_to", "none", "--task", "LM", "--save_strategy", "no"]
    launcher = Path(sys.executable).parent / "deepspeed"
    done = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "llava/train/train_mem.py",
                           *released], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_run(tmp_path / "released", "sft.sh", steps=2)  # 6 records, 2 processes: 3 batches each, accumulation 2

    fixtures = REPO / "tests" / "fixtures" / "inference"
    infer = subprocess.run([sys.executable, "mcmdpo_inference.py", "--model_name", str(tmp_path / "mcmdpo"),
                            "--test_datasets", str(fixtures / "test.jsonl"), "--image_folder", str(fixtures / "images"),
                            "--eval_output", str(tmp_path / "answers.jsonl"), "--max_new_tokens", "8", "--no_progress"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert infer.returncode == 0, infer.stderr[-3000:]
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    answers = [a for a in answers if "response" in a]
    assert len(answers) == 7 and all(a["response"].strip() for a in answers)
    score = subprocess.run([sys.executable, "get_score.py", "--file", str(tmp_path / "answers.jsonl"), "--out_dir",
                            str(tmp_path / "scores")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert score.returncode == 0, score.stderr[-3000:]
    assert list((tmp_path / "scores").glob("*.json"))


def test_scripts_reject_a_bad_paradigm(tmp_path):
    result = subprocess.run(["bash", "scripts/mcmdpo.sh"], cwd=REPO, env={**os.environ, "PARADIGM": "e", "PYTHON": "true"},
                            capture_output=True, text=True)
    assert result.returncode == 2 and "PARADIGM must be a, b, c or d" in result.stderr


def test_scripts_refuse_an_abandoned_build_lock(tmp_path):
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = lock.stat().st_mtime - 3600
    os.utime(lock, (old, old))
    result = subprocess.run(["bash", "scripts/sft.sh"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHON": sys.executable,
                                 "MODEL_PATH": str(tmp_path), "SAMPLE_DATA": "1"})  # the trainer stops on the lock before it reads the model
    assert result.returncode == 2, result.stderr[-2000:]
    assert "build lock older than 10 minutes" in result.stderr and str(lock) in result.stderr
    assert lock.exists(), "the script must not delete a lock it did not create"


def what_a_run_says(script, zero, out, result):
    """The script's plan on the console, the trainer's in train.log (rank 0's log, with each step's metrics),
    no framework deprecation noise, and a model card whose command reproduces the run's arguments."""
    console = result.stdout + result.stderr
    assert f"plan of scripts/{script}:\n  model         " in result.stderr and f"\n  output dir    {out}\n" in result.stderr
    assert "plan of this run:" not in console  # the script printed one: the trainer's goes to the file
    assert "FutureWarning" not in console and "Gradient accumulation steps mismatch" not in console
    assert console.count("no complete checkpoint in") == 1  # rank 0 only
    log = (out / "train.log").read_text()
    assert "plan of this run:\n  model" in log and f"\n  output dir    {out}\n" in log
    assert f"\n  ZeRO config   {REPO}/scripts/{zero}.json\n" in log and "\n  processes     2 per node, 1 node(s) (CPU)" in log
    steps = [json.loads(line.split(": ", 2)[2]) for line in log.splitlines() if " llava.train.log: step " in line]
    assert [s["loss"] for s in steps if "loss" in s] == \
        [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert log.count(" llava.train.log: command: ") == 1 and log.rstrip().endswith(" llava.train.log: finished")
    card = (out / "README.md").read_text()
    command = card.split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert command.startswith(f"deepspeed --num_gpus 2 --module llava.train.train \\\n    configs/{script[:-3]}.yaml \\\n"
                              f"    --deepspeed scripts/{zero}.json \\\n")  # relative: the run's directory is the repository
    words = shlex.split(command.replace("\\\n", " "))
    import torch

    ran = torch.load(out / "training_args.bin", weights_only=False)
    with contextlib.chdir(REPO):  # the card's paths are relative to the run's directory
        _, _, again = parsed(words[words.index("llava.train.train") + 1:])
    for name in ("max_steps", "learning_rate", "gradient_accumulation_steps", "output_dir", "task", "report_to", "beta"):
        assert getattr(again, name) == getattr(ran, name), name


# -- preemption: kill, run the same command again -------------------------------------------------


def step_losses(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def weights(out):
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_losses_and_weights(tiny_llava_dir, tmp_path):
    """MCM-DPO under DeepSpeed (ZeRO-2, 2 CPU processes, grouped sampler, accumulation 2), killed
    inside its second epoch right after a checkpoint, run again with the same command from the
    caller's directory (relative paths): every step's loss and the final weights equal an
    uninterrupted run's."""
    from tests.conftest import write_preference_set

    write_preference_set(tmp_path / "data", n=8, seed=1)  # 2 processes x batch 1 x accumulation 2: 2 steps an epoch
    env = {**os.environ, "MODEL_PATH": str(tiny_llava_dir), "DATA_PATH": "data/preference.json", "IMAGE_FOLDER": "data",
           "NUM_GPUS": "2", "ZERO": "zero2", "REPORT_TO": "none", "PYTHON": sys.executable, "EPOCHS": "4",
           "BATCH_SIZE": "1", "GRAD_ACCUM": "2", "LR": "1e-3", "SAVE_STEPS": "3", "SAVE_TOTAL_LIMIT": "2"}

    def command(out):
        return dict(args=["bash", str(REPO / "scripts/mcmdpo.sh"), "--seed", "0", "--gradient_checkpointing", "False"],
                    cwd=tmp_path, env={**env, "OUTPUT_DIR": out, "MASTER_PORT": str(free_port())})

    full = subprocess.run(**command("full"), capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]

    log = open(tmp_path / "killed.log", "w")
    killed = subprocess.Popen(**command("run"), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    checkpoint = tmp_path / "run" / "checkpoint-3" / "trainer_state.json"  # step 3: the first step of epoch 2
    deadline = time.time() + 900
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert checkpoint.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    assert not (tmp_path / "run" / "trainer_state.json").exists(), "the run finished before it could be killed"

    again = subprocess.run(**command("run"), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from" in again.stderr
    # accumulation 2 under DeepSpeed: Accelerate and DeepSpeed agree from the start
    assert "Gradient accumulation steps mismatch" not in full.stdout + full.stderr + again.stdout + again.stderr
    log = (tmp_path / "run" / "train.log").read_text()  # appended across the kill and the resume
    assert log.count(" llava.train.log: command: ") == 2 and " llava.train: resuming from " in log
    assert "resume        afresh" in log and "resume        continues from " in log
    expected, resumed = step_losses(tmp_path / "full"), step_losses(tmp_path / "run")
    assert sorted(resumed) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    a, b = weights(tmp_path / "full"), weights(tmp_path / "run")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


# -- the launch command: paths from the caller's directory, GPUs from the mask ------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
# torch's answer on a host with 8 GPUs, of which CUDA_VISIBLE_DEVICES shows some; the rest goes to Python.
if [ "$1" = -c ] && [[ "$2" == *torch.cuda.device_count* ]]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then tr , '\\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .; else echo 8; fi
  exit 0
fi
exec %s "$@"
"""


def dry_run(caller_dir, script, gpu_host=True, **env):
    python = sys.executable
    if gpu_host:
        python = caller_dir / "bin" / "python"
        python.parent.mkdir(exist_ok=True)
        python.write_text(FAKE_PYTHON % sys.executable)
        python.chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", "HOSTFILE")}
    result = subprocess.run(["bash", str(REPO / "scripts" / script), "--max_steps", "2"], cwd=caller_dir,
                            env={**full_env, "DRY_RUN": "1", "PYTHON": str(python), **env}, capture_output=True, text=True, timeout=120)
    return result


def flag(argv, name):
    return argv[argv.index(name) + 1]


def trainer_argv(words):
    """What the launcher passes to the trainer: the words after llava/train/train.py."""
    return words[words.index(str(REPO / "llava/train/train.py")) + 1:]


def parsed(argv):
    """The trainer's argument dataclasses for ``argv``, without the DeepSpeed config (parsing one
    registers it process-wide, as if ZeRO-3 ran)."""
    from llava.train.arguments import parse_args

    if "--deepspeed" in argv:
        i = argv.index("--deepspeed")
        argv = argv[:i] + argv[i + 2:]
    return parse_args(argv)


@pytest.fixture
def caller_dir(tmp_path):
    """A user's directory with a model, data and images, away from the repository."""
    (tmp_path / "ckpt" / "sft").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "pref.json").write_text("[]")
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    return tmp_path


RELATIVE = {"MODEL_PATH": "ckpt/sft", "DATA_PATH": "pref.json", "IMAGE_FOLDER": "images", "OUTPUT_DIR": "runs/mcmdpo"}


def test_paths_are_the_callers_and_gpus_the_masks(caller_dir):
    import shlex

    result = dry_run(caller_dir, "mcmdpo.sh", CUDA_VISIBLE_DEVICES="2,3", **RELATIVE)
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    # DeepSpeed's --num_gpus N would run on GPUs 0..N-1 whatever the mask says: the launcher gets the mask itself.
    assert words[0] == "CUDA_VISIBLE_DEVICES=2,3" and "--num_gpus" not in words and "--include" not in words
    assert Path(words[1]).name == "deepspeed"
    assert flag(words, "--model_name_or_path") == str(caller_dir / "ckpt/sft")
    assert flag(words, "--data_path") == str(caller_dir / "pref.json")
    assert flag(words, "--image_folder") == str(caller_dir / "images")
    assert flag(words, "--output_dir") == str(caller_dir / "runs/mcmdpo")
    # the settings file first (the trainer reads it before the flags), the script's arguments last
    assert trainer_argv(words)[0] == str(REPO / "configs/mcmdpo.yaml")
    assert words[-2:] == ["--max_steps", "2"]
    # released settings, each said once: no clipping (config and trainer), batch 1 x 16, and saves
    assert json.loads(Path(flag(words, "--deepspeed")).read_text())["gradient_clipping"] == 0
    _, _, args = parsed(trainer_argv(words))
    assert args.max_grad_norm == 0
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1, 16)
    assert (args.save_strategy, args.save_steps, args.save_at_epoch_end, args.save_total_limit) == ("steps", 500, True, 2)
    assert args.resume_from_checkpoint == "auto" and args.max_steps == 2

    one = shlex.split(dry_run(caller_dir, "mcmdpo.sh", CUDA_VISIBLE_DEVICES="2,3", NUM_GPUS="1", **RELATIVE).stdout)
    assert one[0] == "CUDA_VISIBLE_DEVICES=2"
    too_many = dry_run(caller_dir, "mcmdpo.sh", CUDA_VISIBLE_DEVICES="2,3", NUM_GPUS="3", **RELATIVE)
    assert too_many.returncode == 2
    assert too_many.stderr.strip() == "NUM_GPUS=3 but CUDA_VISIBLE_DEVICES=2,3 lists 2 GPU(s)"


def test_launch_without_a_mask_with_a_hostfile_and_afresh(caller_dir):
    import shlex

    words = shlex.split(dry_run(caller_dir, "dpo.sh", **RELATIVE).stdout)
    assert flag(words, "--num_gpus") == "8" and "CUDA_VISIBLE_DEVICES" not in words[0]
    assert dry_run(caller_dir, "dpo.sh", NUM_GPUS="9", **RELATIVE).stderr.strip() == "NUM_GPUS=9 but this host has 8 GPU(s)"
    words = shlex.split(dry_run(caller_dir, "dpo.sh", HOSTFILE="hosts", **RELATIVE).stdout)
    assert flag(words, "--hostfile") == str(caller_dir / "hosts") and "--num_gpus" not in words
    words = shlex.split(dry_run(caller_dir, "dpo.sh", HOSTFILE="hosts", NODE_RANK="1", MASTER_ADDR="node-a", **RELATIVE).stdout)
    assert (flag(words, "--node_rank"), flag(words, "--master_addr")) == ("1", "node-a") and "--no_ssh" in words
    words = shlex.split(dry_run(caller_dir, "dpo.sh", RESUME="never", SAVE_STEPS="50", SAVE_TOTAL_LIMIT="3", **RELATIVE).stdout)
    from llava.train.checkpoints import resolve_resume

    _, _, args = parsed(trainer_argv(words))
    assert resolve_resume(args.resume_from_checkpoint, args.output_dir) is None
    assert (args.save_steps, args.save_total_limit) == (50, 3)
    # a host without CUDA: CPU processes, the mask means nothing there
    words = shlex.split(dry_run(caller_dir, "dpo.sh", gpu_host=False, CUDA_VISIBLE_DEVICES="2,3", NUM_GPUS="2", **RELATIVE).stdout)
    assert flag(words, "--num_gpus") == "2" and not words[0].startswith("CUDA_VISIBLE_DEVICES")


def test_sft_batch_and_the_default_model(caller_dir):
    import shlex

    words = shlex.split(dry_run(caller_dir, "sft.sh", **RELATIVE).stdout)
    _, _, args = parsed(trainer_argv(words))
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (1, 32)
    assert args.learning_rate == 2e-5
    env = {k: v for k, v in RELATIVE.items() if k != "MODEL_PATH"}
    if (REPO / "outputs/tiny-llava").exists():
        pytest.skip("outputs/tiny-llava exists in this checkout")
    missing = dry_run(caller_dir, "sft.sh", **env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "no model at" in missing.stderr and "python -m llava.model.tiny --out" in missing.stderr.replace(sys.executable, "python")


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_as_one_node(tiny_llava_dir, tmp_path):
    """Two "nodes" (two launchers, NODE_RANK 0 and 1, one process each, no ssh, a shared OUTPUT_DIR)
    train exactly as one node with two processes."""
    from tests.conftest import write_preference_set

    write_preference_set(tmp_path / "data", n=8, seed=1)
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    env = {**os.environ, "MODEL_PATH": str(tiny_llava_dir), "DATA_PATH": "data/preference.json", "IMAGE_FOLDER": "data",
           "ZERO": "zero2", "REPORT_TO": "none", "PYTHON": sys.executable, "EPOCHS": "1", "BATCH_SIZE": "1",
           "GRAD_ACCUM": "2", "LR": "1e-3", "SAVE_STEPS": "1", "OMP_NUM_THREADS": "1"}
    command = ["bash", str(REPO / "scripts/mcmdpo.sh"), "--seed", "0", "--gradient_checkpointing", "False"]
    one = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env={**env, "NUM_GPUS": "2", "OUTPUT_DIR": "one", "MASTER_PORT": str(free_port())})
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    port = str(free_port())
    nodes = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "HOSTFILE": "hostfile", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port, "OUTPUT_DIR": "two"}) for rank in (0, 1)]
    for node in nodes:
        output, _ = node.communicate(timeout=900)
        assert node.returncode == 0, output[-3000:]
        assert "dist_world_size=2" in output
    assert step_losses(tmp_path / "two") == pytest.approx(step_losses(tmp_path / "one"), rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
