"""Resuming: which checkpoint ``--resume_from_checkpoint`` means, finished runs, epoch-end saves, epoch order."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler
from accelerate.data_loader import BatchSamplerShard, DataLoaderShard, skip_first_batches

from llava.data.sampler import ModalityLengthGroupedSampler
from llava.train.checkpoints import (ReplayEpochOrder, ResumeError, copy_final_model, newest_complete_checkpoint, publish,
                                     remove_unfinished_saves, resolve_resume, staging_dir)
from llava.train.train import prepare, train
from tests.conftest import write_preference_set
from tests.test_train import argv, log_history


def checkpoint(out, step, complete=True, deepspeed=None):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if deepspeed is not None:
        (path / f"global_step{step}").mkdir()
        if deepspeed == "tagged":
            (path / "latest").write_text(f"global_step{step}")
    return path


def test_resume_means_the_newest_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert resolve_resume("auto", out) is None  # no output directory yet: a fresh start
    with pytest.raises(ResumeError, match=r"--resume_from_checkpoint True: no complete checkpoint in .*run"):
        resolve_resume("True", out)
    good = checkpoint(out, 2)
    checkpoint(out, 10, deepspeed="tagged")
    checkpoint(out, 11, complete=False)  # killed before its trainer_state.json
    checkpoint(out, 12, deepspeed="untagged")  # killed before DeepSpeed's `latest` tag
    (out / "checkpoint-x").mkdir()
    assert newest_complete_checkpoint(out) == out / "checkpoint-10"
    for word in ("True", "true", "auto", "latest"):
        assert resolve_resume(word, out) == out / "checkpoint-10"
    for word in (None, False, "", "False", "never"):
        assert resolve_resume(word, out) is None
    assert resolve_resume(str(good), out) == good
    with pytest.raises(ResumeError, match="checkpoint-11: not a complete checkpoint"):
        resolve_resume(str(out / "checkpoint-11"), out)
    with pytest.raises(ResumeError, match="nowhere: no such directory"):
        resolve_resume(str(tmp_path / "nowhere"), out)


def test_a_checkpoint_appears_whole_under_its_name(tmp_path):
    """Written under .tmp-checkpoint-N, renamed when complete; an older checkpoint-N (a run resumed from an
    earlier checkpoint saves step N again) is replaced whole."""
    out = tmp_path / "run"
    checkpoint(out, 4)
    staging = staging_dir(out / "checkpoint-4")
    assert staging == out / ".tmp-checkpoint-4"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"new")
    assert newest_complete_checkpoint(out) == out / "checkpoint-4"  # the old one, still whole
    (staging / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    publish(staging, out / "checkpoint-4")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"]
    assert (out / "checkpoint-4" / "model.safetensors").read_bytes() == b"new"


def test_unfinished_saves_are_never_taken_and_go_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    checkpoint(out, 2)
    checkpoint(out, 4).rename(staging_dir(out / "checkpoint-4"))  # a save killed at any moment, even its very last
    (out / ".tmp-checkpoint-3.old").mkdir()  # killed while an older checkpoint-3 was being replaced
    (out / ".tmp-notes").mkdir()
    assert newest_complete_checkpoint(out) == out / "checkpoint-2"
    assert resolve_resume("auto", out) == out / "checkpoint-2"
    assert remove_unfinished_saves(out) == [out / ".tmp-checkpoint-3.old", out / ".tmp-checkpoint-4"]
    assert sorted(p.name for p in out.iterdir()) == [".tmp-notes", "checkpoint-2"]


def test_a_final_model_copy_cut_short_is_not_marked_finished(tmp_path):
    """The final model's trainer_state.json goes first: a copy (or save) that fails midway leaves none."""
    out = tmp_path / "run"
    last = checkpoint(out, 4)
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 2}))  # an earlier, shorter run's final model
    (last / "model.safetensors").unlink()
    (last / "model.safetensors").symlink_to(tmp_path / "gone")  # the copy of the weights fails
    with pytest.raises(OSError):
        copy_final_model(last, out)
    assert not (out / "trainer_state.json").exists()
    (last / "model.safetensors").unlink()
    (last / "model.safetensors").write_bytes(b"weights")
    copy_final_model(last, out)
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_sampler_epoch_reaches_a_sharded_sampler_after_a_skip():
    """accelerate's skip wrapper does not pass ``set_epoch`` on to a sampler under ``BatchSamplerShard``
    (several processes): the callback sets it, so the resumed epoch has that epoch's order."""
    lengths = [5, -3, 7, 2, -8, 4, 6, 1, -2, 9, 3, 8]

    def loader(process):
        sampler = ModalityLengthGroupedSampler(lengths, batch_size=1, world_size=2 * 2, seed=3)
        shard = BatchSamplerShard(BatchSampler(sampler, 1, False), num_processes=2, process_index=process)
        return DataLoaderShard(list(range(len(lengths))), batch_sampler=shard)

    for process in (0, 1):
        uninterrupted = loader(process)
        uninterrupted.set_epoch(1)
        expected = [b.tolist() for b in uninterrupted][2:]
        resumed = loader(process)
        skipped = skip_first_batches(resumed, 2)
        ReplayEpochOrder().on_epoch_begin(None, type("S", (), {"epoch": 1.5})(), None, train_dataloader=resumed)
        skipped.set_epoch(1)
        assert [b.tolist() for b in skipped] == expected
        assert expected != [b.tolist() for b in loader(process)][2:]  # epoch 0's order differs


@pytest.mark.slow
def test_a_finished_run_run_again_trains_nothing(tiny_llava_dir, tmp_path):
    """Two epochs of two steps, a save every 3 steps and at each epoch end; the same command again
    leaves the model, its state and its checkpoints as they were (it used to log a 5th step)."""
    data = write_preference_set(tmp_path / "data", n=4, seed=1)
    out = tmp_path / "run"
    args = argv(tiny_llava_dir, data, out, "--task", "DPO", "--use_cross_modal_loss", "True", "--num_train_epochs", "2",
                "--learning_rate", "1e-3", "--group_by_modality_length", "True", "--save_strategy", "steps",
                "--save_steps", "3", "--save_at_epoch_end", "True", "--save_total_limit", "10", "--resume_from_checkpoint", "auto")
    train(prepare(args))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert [h["step"] for h in log_history(out) if "loss" in h] == [1, 2, 3, 4]

    def snapshot():
        return {p.relative_to(out): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*")) if p.is_file()}

    before = snapshot()
    train(prepare(args))
    assert snapshot() == before

    # killed after its last checkpoint, before the final save: the rerun takes the final model from it
    losses = [(h["step"], h["loss"]) for h in log_history(out) if "loss" in h]
    (out / "trainer_state.json").unlink()
    (out / "model.safetensors").unlink()
    train(prepare(args))
    # all but the state and the model card, which are the checkpoint's (its card's metrics stop at that step)
    rewritten = {Path("trainer_state.json"), Path("README.md")}
    assert {k: v for k, v in snapshot().items() if k not in rewritten} == {k: v for k, v in before.items() if k not in rewritten}
    assert (out / "README.md").is_file()
    assert [(h["step"], h["loss"]) for h in log_history(out) if "loss" in h] == losses


@pytest.mark.slow
def test_a_lora_run_cut_after_a_checkpoint_ends_with_the_adapters_of_one_not_cut(tiny_llava_dir, tmp_path):
    """LoRA without DeepSpeed: the Trainer's own resume reloads the adapters (and the projector trained beside
    them) from checkpoint-2, with the optimizer's state, so the run ends bit for bit where one not cut ends."""
    from safetensors.torch import load_file

    data = write_preference_set(tmp_path / "data", n=8, seed=1)
    out = tmp_path / "run"
    args = argv(tiny_llava_dir, data, out, "--task", "DPO", "--use_cross_modal_loss", "True", "--max_steps", "4",
                "--learning_rate", "1e-2", "--lora_enable", "True", "--lora_r", "4", "--save_strategy", "steps",
                "--save_steps", "2", "--resume_from_checkpoint", "auto")
    train(prepare(args))
    whole = load_file(out / "adapter_model.safetensors")
    losses = [(h["step"], h["loss"]) for h in log_history(out) if "loss" in h]
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in whole.items())  # the adapters trained

    # cut after checkpoint-2: no checkpoint-4, no final model
    shutil.rmtree(out / "checkpoint-4")
    for name in ("adapter_model.safetensors", "trainer_state.json"):
        (out / name).unlink()
    train(prepare(args))
    resumed = load_file(out / "adapter_model.safetensors")
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole), [k for k in whole if not torch.equal(resumed[k], whole[k])]
    assert [(h["step"], h["loss"]) for h in log_history(out) if "loss" in h] == losses
