"""Run settings the scripts rely on: no gradient clipping (released), wandb without a login."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llava.train.arguments import parse_args
from llava.train.reporting import prepare_wandb, wandb_has_credentials
from llava.train.train import prepare
from tests.test_train import argv, log_history, snapshot

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs_do_not_clip(config, tmp_path, preference_file):
    path = REPO / "scripts" / f"{config}.json"
    assert json.loads(path.read_text())["gradient_clipping"] == 0
    # The trainer's default agrees with the config (a clipping --max_grad_norm would be a stated mismatch).
    _, _, args = parse_args(["--model_name_or_path", "m", "--data_path", str(preference_file), "--output_dir", str(tmp_path),
                             "--deepspeed", str(path)])
    assert args.max_grad_norm == 0
    assert args.hf_deepspeed_config.config["gradient_clipping"] == 0


def test_the_trainer_does_not_clip(tiny_llava_dir, preference_file, tmp_path):
    """One plain SGD step: the parameters move by exactly lr x the full gradient, whose norm is above 1."""
    lr = 0.5
    trainer = prepare(argv(tiny_llava_dir, preference_file, tmp_path / "run", "--task", "DPO", "--beta", "20",
                           "--optim", "sgd", "--learning_rate", lr, "--lr_scheduler_type", "constant", "--max_steps", "1"))
    assert trainer.args.max_grad_norm == 0
    before = snapshot(trainer)
    trainer.train()
    trainer.save_state()
    after = snapshot(trainer)
    step = torch.sqrt(sum(((after[n] - before[n]).double() ** 2).sum() for n in before)).item()
    grad_norm = next(h["grad_norm"] for h in log_history(tmp_path / "run") if "grad_norm" in h)
    assert grad_norm > 1.5, "the test needs a gradient that clipping at 1.0 would shrink"
    assert step / lr == pytest.approx(grad_norm, rel=1e-4)


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """A home without wandb credentials; wandb's own files under tmp_path."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "home" / ".cache" / "wandb"))
    (tmp_path / "home").mkdir()
    return tmp_path


def test_wandb_goes_offline_without_a_login(no_wandb_login):
    out = no_wandb_login / "outputs" / "mcmdpo"
    args = SimpleNamespace(report_to=["wandb"], output_dir=str(out), run_name=None)
    note = prepare_wandb(args)
    wandb_dir = out.resolve() / "wandb"
    assert note == (f"wandb: no API key or login found, logging offline to {wandb_dir}; "
                    f"upload later with: wandb sync {wandb_dir}/offline-run-*")
    assert os.environ["WANDB_MODE"] == "offline"
    assert (os.environ["WANDB_PROJECT"], args.run_name) == ("llava-mcmdpo", "mcmdpo")
    assert out.is_dir()


@pytest.mark.parametrize("login", ["env", "netrc"])
def test_wandb_with_a_login_stays_as_set(login, no_wandb_login, monkeypatch):
    key = "0123456789abcdef0123456789abcdef01234567"
    if login == "env":
        monkeypatch.setenv("WANDB_API_KEY", key)
    else:
        (no_wandb_login / "home" / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {key}\n")
    assert wandb_has_credentials()
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    args = SimpleNamespace(report_to=["wandb"], output_dir=str(no_wandb_login / "out"), run_name="named")
    assert prepare_wandb(args) is None
    assert "WANDB_MODE" not in os.environ
    assert (os.environ["WANDB_PROJECT"], args.run_name) == ("mine", "named")


def test_wandb_mode_set_by_the_user_is_kept(no_wandb_login, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert prepare_wandb(SimpleNamespace(report_to=["wandb"], output_dir=str(no_wandb_login / "o"), run_name=None)) is None
    assert os.environ["WANDB_MODE"] == "disabled"
    assert prepare_wandb(SimpleNamespace(report_to=["none"], output_dir="o", run_name=None)) is None
