"""Held-out evaluation during training (``--eval_data_path``): keys, values against naive computations, caches."""

import json
import math

import pytest
import torch

from llava.constants import IGNORE_INDEX
from llava.data.collate import PreferenceCollator
from llava.model.forward import response_logps_naive
from llava.method import TERM_NAMES as TERMS
from llava.train.losses import mcm_dpo_loss
from llava.train.train import main, prepare, train
from tests.conftest import write_preference_set
from tests.test_train import argv, log_history, run_main

EVAL = ["--eval_strategy", "steps", "--eval_steps", "1", "--eval_on_start", "True"]
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    """Four held-out records (other texts and images than the training set's), images beside the training ones."""
    return write_preference_set(tmp_path_factory.mktemp("evaldata"), n=4, seed=7, name="eval.json")


def eval_logs(out):
    return {h["step"]: h for h in log_history(out) if "eval_loss" in h}


def naive_logps(llava, dataset, conditions, image_token_id, pad_token_id):
    """``[N, C]`` summed response log-probs, one full sequence per condition through the native forward."""
    collate = PreferenceCollator(conditions, pad_token_id, image_token_id, packed=False)
    with torch.no_grad():
        return torch.cat([response_logps_naive(llava.eval(), collate([dataset[i]])) for i in range(len(dataset))])


def test_mcm_dpo_evaluates_every_term_and_matches_a_naive_computation(tiny_llava_dir, preference_file, eval_file, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    trainer = prepare(argv(tiny_llava_dir, preference_file, out, "--task", "DPO", "--use_cross_modal_loss", "True",
                           "--max_steps", "2", "--learning_rate", "1e-3", "--eval_data_path", eval_file, *EVAL,
                           "--per_device_eval_batch_size", "3"))
    train(trainer)
    logs = eval_logs(out)
    assert sorted(logs) == [0, 1, 2]
    keys = {"eval_loss", *(f"eval_{k}" for k in REWARDS)}
    keys |= {f"eval_mcm/{t}/{m}" for t in TERMS for m in ("margin", "accuracy")}
    for step, entry in logs.items():
        assert keys <= set(entry), (step, keys - set(entry))
        assert all(math.isfinite(entry[k]) for k in keys), step
    # step 0: the policy is its own reference, every reward is 0 and the loss -log sigmoid(0)
    assert logs[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # policy = reference at step 0; the reference table is computed a record at a time and evaluation
    # runs padded batches, which moves a float32 log-prob by ~1e-7
    assert all(abs(logs[0][f"eval_mcm/{t}/margin"]) < 1e-5 for t in TERMS)
    assert logs[2]["eval_loss"] != pytest.approx(math.log(2), abs=1e-4)

    # step 2 (after the last update) against the saved model and the starting model, scored naively
    conditions = trainer.objective.conditions
    tok = trainer.processing_class.tokenizer
    ids = (tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    policy = naive_logps(AutoModelForImageTextToText.from_pretrained(out), trainer.eval_dataset, conditions, *ids)
    reference = naive_logps(AutoModelForImageTextToText.from_pretrained(tiny_llava_dir), trainer.eval_dataset, conditions, *ids)
    by_name = lambda t: {c: t[:, j] for j, c in enumerate(conditions)}  # noqa: E731
    losses, metrics = mcm_dpo_loss(by_name(policy), by_name(reference), weights=trainer.args.term_weights)
    assert logs[2]["eval_loss"] == pytest.approx(losses.mean().item(), abs=1e-5)
    for t in TERMS:
        assert logs[2][f"eval_mcm/{t}/margin"] == pytest.approx(metrics[f"mcm/{t}/margin"].mean().item(), abs=1e-5), t
        assert logs[2][f"eval_mcm/{t}/accuracy"] == pytest.approx(metrics[f"mcm/{t}/accuracy"].mean().item()), t
    for k in REWARDS:
        assert logs[2][f"eval_{k}"] == pytest.approx(metrics[k].mean().item(), abs=1e-5), k


def test_dpo_eval_loss_is_log_2_at_step_0_and_the_eval_set_has_its_own_cache(tiny_llava_dir, preference_file, eval_file,
                                                                              tmp_path):
    out = tmp_path / "run"
    trainer = prepare(argv(tiny_llava_dir, preference_file, out, "--task", "DPO", "--max_steps", "1", "--learning_rate", "1e-3",
                           "--eval_data_path", eval_file, *EVAL))
    train(trainer)
    logs = eval_logs(out)
    assert logs[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(logs[0]["eval_rewards/margins"]) < 1e-5  # policy = reference (up to batch padding, ~1e-7)
    assert not any(k.startswith("eval_mcm/") for k in logs[0])
    assert logs[1]["eval_rewards/margins"] != 0
    # two caches: the training records' and the held-out records', each of its own length
    train_ref, eval_ref = trainer.reference, trainer.eval_reference
    assert train_ref.path != eval_ref.path and train_ref.path.parent == eval_ref.path.parent
    assert torch.load(train_ref.path)["logps"].shape == (len(trainer.train_dataset), 2)
    assert torch.load(eval_ref.path)["logps"].shape == (len(trainer.eval_dataset), 2) == (4, 2)
    # a rerun reads both caches back
    again = prepare(argv(tiny_llava_dir, preference_file, out, "--task", "DPO", "--max_steps", "1", "--learning_rate", "1e-3",
                         "--eval_data_path", eval_file, *EVAL))
    again.prepare_references()
    assert again.reference.reused and again.eval_reference.reused
    torch.testing.assert_close(again.eval_reference.table, eval_ref.table)


def test_the_training_file_as_eval_set_still_gets_a_separate_cache(tiny_llava_dir, preference_file, tmp_path):
    trainer = prepare(argv(tiny_llava_dir, preference_file, tmp_path, "--task", "DPO", "--max_steps", "1",
                           "--eval_data_path", preference_file, "--eval_strategy", "steps", "--eval_steps", "1"))
    assert trainer.eval_reference.key == {**trainer.reference.key, "split": "eval"}
    assert trainer.eval_reference.path != trainer.reference.path


def test_sft_eval_loss_is_the_mean_token_cross_entropy(tiny_llava_dir, preference_file, eval_file, tmp_path):
    """Step 0's eval loss against transformers' own loss (``labels=``) of the starting model, record by record."""
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    trainer = prepare(argv(tiny_llava_dir, preference_file, out, "--task", "LM", "--max_steps", "1",
                           "--eval_data_path", eval_file, *EVAL, "--per_device_eval_batch_size", "1"))
    train(trainer)
    logs = eval_logs(out)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir).eval()
    losses = []
    for i in range(len(trainer.eval_dataset)):
        example = trainer.eval_dataset[i]
        batch = trainer.data_collator([example])
        labels = []
        for t, label in zip(example.input_ids, example.labels):  # the image token stands for its expanded tokens
            labels += [IGNORE_INDEX] * example.image.num_tokens if t == trainer.eval_dataset.image_token_id else [label]
        with torch.no_grad():
            losses.append(model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                                labels=torch.tensor([labels])).loss.item())
    assert logs[0]["eval_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert math.isfinite(logs[1]["eval_loss"]) and logs[1]["eval_loss"] != logs[0]["eval_loss"]


def test_eval_flags_must_come_together(tiny_llava_dir, preference_file, eval_file, tmp_path, capsys):
    err = run_main(argv(tiny_llava_dir, preference_file, tmp_path, "--task", "DPO", "--eval_data_path", eval_file), capsys)
    assert f"--eval_data_path {eval_file}" in err and "--eval_strategy steps" in err
    err = run_main(argv(tiny_llava_dir, preference_file, tmp_path, "--task", "DPO", "--eval_strategy", "steps"), capsys)
    assert "--eval_strategy steps: give the held-out data with --eval_data_path" in err
    bad = eval_file.parent / "bad.json"
    bad.write_text(json.dumps([{"image": "images/img_0.png", "text": json.dumps({"question": "Q", "chosen": "A"})}]))
    err = run_main(argv(tiny_llava_dir, preference_file, tmp_path, "--task", "DPO", "--eval_data_path", bad, *EVAL), capsys)
    assert str(bad) in err and "rejected" in err
