"""The trainer in-process on tiny models: paradigms, learning, reference modes, resume, bad input."""

import json
import shutil

import pytest
import torch

from llava.train.train import main, prepare, train
from tests.conftest import write_preference_set


def argv(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--image_folder", str(data.parent),
            "--output_dir", str(out), "--report_to", "none", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--save_strategy", "no", "--seed", "0", "--dataloader_num_workers", "0", *map(str, extra)]


def log_history(out):
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


# The three parts by the LLaVA model's own module names, written out here rather than taken from
# llava.train.params.part_of, which decides what trains.
PARTS = {"vision": ("model.vision_tower.",), "projector": ("model.multi_modal_projector.", "model.image_newline"),
         "language": ("model.language_model.", "lm_head.")}


def part_of(name: str) -> str:
    (part,) = [part for part, prefixes in PARTS.items() if name.startswith(prefixes)]
    return part


def snapshot(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.llava.named_parameters()}


# -- paradigms -------------------------------------------------------------------------------

PARADIGMS = {  # stage flags -> which parts train
    "default": ([], {"language", "projector", "vision"}),  # the released code trains the tower whatever its flags say
    "frozen_tower": (["--unfreeze_mm_vision_tower", "False"], {"language", "projector"}),
    "projector_only": (["--tune_mm_mlp_adapter", "True"], {"projector"}),
    "projector_and_tower": (["--tune_mm_mlp_adapter", "True", "--unfreeze_mm_vision_tower", "True"], {"projector", "vision"}),
    "freeze_backbone": (["--freeze_backbone", "True"], {"projector", "vision"}),
    "frozen_projector": (["--freeze_mm_mlp_adapter", "True"], {"language", "vision"}),
}
# the paradigms (docs/method.md#paradigms): whether the ViT trains in (SFT, alignment)
METHOD_PARADIGMS = {"a": (False, False), "b": (False, True), "c": (True, False), "d": (True, True)}


def run_one_step(trainer):
    before = snapshot(trainer)
    trainer.args.max_steps = 1
    trainer.train()
    after = snapshot(trainer)
    return {n for n in before if not torch.equal(before[n], after[n])}


@pytest.mark.parametrize("name", sorted(PARADIGMS))
def test_exactly_the_expected_parameters_train(name, tiny_llava_dir, preference_file, tmp_path):
    flags, parts = PARADIGMS[name]
    trainer = prepare(argv(tiny_llava_dir, preference_file, tmp_path, "--task", "LM", "--learning_rate", "1e-2",
                           "--max_steps", "1", *flags))
    llava = trainer.model.llava
    trainable = {n for n, p in llava.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in llava.named_parameters() if part_of(n) in parts}
    changed = run_one_step(trainer)
    assert changed <= trainable
    assert {part_of(n) for n in changed} == parts


@pytest.mark.parametrize("paradigm", sorted(METHOD_PARADIGMS))
def test_method_paradigms_per_stage(paradigm, tiny_llava_dir, preference_file, tmp_path):
    """The stage scripts' PARADIGM mapping (llava/train/script_env.py's vit_trains) gives, stage by stage, the flag
    that trains the tower or not.

    That the flag trains exactly those parameters is test_exactly_the_expected_parameters_train's job;
    here the flag is parsed as the trainer parses it (no model is built).
    """
    from llava.train.arguments import parse_args
    from llava.train.params import Trainable
    from llava.train.script_env import vit_trains

    for stage, task, expect in (("sft", "LM", METHOD_PARADIGMS[paradigm][0]), ("align", "DPO", METHOD_PARADIGMS[paradigm][1])):
        flag = vit_trains(paradigm, stage)
        assert flag == str(expect)
        model_args, _, _ = parse_args(argv(tiny_llava_dir, preference_file, tmp_path / stage, "--task", task,
                                           "--unfreeze_mm_vision_tower", flag))
        assert Trainable.from_flags(unfreeze_mm_vision_tower=model_args.unfreeze_mm_vision_tower).vision is expect


@pytest.mark.parametrize("vision", [False, True])
def test_lora_trains_adapters_and_projector_only(vision, tiny_llava_dir, preference_file, tmp_path):
    flags = ["--lora_enable", "True", "--lora_r", "4", "--unfreeze_mm_vision_tower", str(vision)]
    trainer = prepare(argv(tiny_llava_dir, preference_file, tmp_path, "--task", "DPO", "--learning_rate", "1e-2",
                           "--max_steps", "1", *flags))
    llava = trainer.model.llava
    trainable = {n for n, p in llava.named_parameters() if p.requires_grad}
    for n in trainable:
        assert "lora_" in n or "modules_to_save" in n, n
        assert "lora_" not in n or "language_model" in n
    assert {part_of(n) for n in trainable} == {"language", "projector"} | ({"vision"} if vision else set())
    changed = run_one_step(trainer)
    assert changed <= trainable and any("modules_to_save" in n and "multi_modal_projector" in n for n in changed)


def test_lora_checkpoint_loads_and_merges(tiny_llava_dir, preference_file, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "lora"
    trainer = prepare(argv(tiny_llava_dir, preference_file, out, "--task", "LM", "--max_steps", "2", "--learning_rate", "1e-2",
                           "--lora_enable", "True", "--lora_r", "4", "--merge_lora", "True"))
    train(trainer)
    assert (out / "adapter_config.json").is_file()
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")
    trained = trainer.model.merge_and_unload().llava  # the peft model holds the ScoringModel, which holds the LLaVA model
    for (n, p), (m, q) in zip(sorted(merged.state_dict().items()), sorted(trained.state_dict().items()), strict=True):
        assert n == m and torch.allclose(p, q, atol=1e-6), n


def test_lora_on_an_original_format_checkpoint_records_its_base_and_merges(tiny_llava_dir, preference_file, tmp_path):
    """The adapter names the directory its base loads from (an original-format one here, built from a state dict),
    so --merge_lora and a later load find it; it used to record the string "None"."""
    from transformers import AutoModelForImageTextToText

    from llava.model.convert import main as convert
    from llava.model.load import load_model

    original = tmp_path / "original"
    convert(["to-original", "--src", str(tiny_llava_dir), "--out", str(original)])
    out = tmp_path / "lora"
    trainer = prepare(argv(original, preference_file, out, "--task", "LM", "--max_steps", "1", "--learning_rate", "1e-2",
                           "--lora_enable", "True", "--lora_r", "4", "--merge_lora", "True"))
    train(trainer)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(original)
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged")
    adapted, _ = load_model(out, merge_lora=True)  # the base found from the adapter alone
    trained = trainer.model.merge_and_unload().llava
    for (n, p), (m, q), (k, r) in zip(sorted(merged.state_dict().items()), sorted(trained.state_dict().items()),
                                      sorted(adapted.state_dict().items()), strict=True):
        assert n == m == k and torch.allclose(p, q, atol=1e-6) and torch.equal(p, r), n


def test_merge_lora_on_a_composed_model_is_refused_before_it_loads(tmp_path, preference_file):
    from transformers import LlamaForCausalLM

    from llava.model.tiny import build

    model, processor = build("llava", seed=4)
    LlamaForCausalLM(model.config.text_config).save_pretrained(tmp_path / "lm")
    processor.tokenizer.save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"--merge_lora True: a model composed from .*lm and --vision_tower is saved nowhere"):
        prepare(argv(tmp_path / "lm", preference_file, tmp_path / "out", "--task", "LM", "--vision_tower", tmp_path / "clip",
                     "--lora_enable", "True", "--merge_lora", "True"))
    assert not (tmp_path / "out").exists()


# -- learning ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_mcm_dpo_learns_every_term(tiny_llava_dir, tmp_path):
    """40 MCM-DPO steps drive every term's margin above zero (fails for a wrong sign or a missing term)."""
    data = write_preference_set(tmp_path / "data", n=8, seed=5)
    out = tmp_path / "run"
    trainer = prepare(argv(tiny_llava_dir, data, out, "--task", "DPO", "--use_cross_modal_loss", "True", "--max_steps", "40",
                           "--learning_rate", "5e-4", "--lr_scheduler_type", "constant", "--beta", "0.5",
                           "--unfreeze_mm_vision_tower", "True", "--use_image_type", "diffusion"))
    train(trainer)
    logs = [h for h in log_history(out) if "loss" in h]
    last = logs[-8:]
    mean = lambda k: sum(h[k] for h in last) / len(last)  # noqa: E731
    assert mean("rewards/accuracies") > 0.5
    assert mean("rewards/margins") > 0
    for term in ("response", "image", "context", "context_response", "image_response", "context_image", "all"):
        assert mean(f"mcm/{term}/margin") > 0, term
    assert logs[-1]["loss"] < logs[0]["loss"]


# -- reference modes ---------------------------------------------------------------------------


def test_reference_modes_agree_and_cache_is_reused(tiny_llava_dir, preference_file, tmp_path):
    common = ["--task", "DPO", "--use_cross_modal_loss", "True", "--lora_enable", "True", "--lora_r", "4", "--max_steps", "1"]
    refs = {}
    for mode in ("cached", "live", "adapters_off"):
        trainer = prepare(argv(tiny_llava_dir, preference_file, tmp_path / mode, *common, "--reference_mode", mode))
        for n, p in trainer.model.llava.named_parameters():  # a policy that differs from its reference
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        if mode == "cached":  # the cache is computed at step 0, where LoRA is still the identity
            for n, p in trainer.model.llava.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.zeros_(p)
        trainer.prepare_references()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        logps = trainer.reference.logps(batch)
        assert logps.names == trainer.objective.conditions  # labelled by condition, in the objective's order
        refs[mode] = logps.values
        policy = trainer.model(**batch).detach()
        if mode != "cached":
            assert not torch.allclose(policy, refs[mode], rtol=1e-3)
    # tolerance: the three are the same model on the same inputs, up to float32 summation order
    torch.testing.assert_close(refs["live"], refs["cached"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(refs["adapters_off"], refs["cached"], rtol=1e-5, atol=1e-4)

    again = prepare(argv(tiny_llava_dir, preference_file, tmp_path / "cached", *common, "--reference_mode", "cached"))
    again.prepare_references()
    assert again.reference.reused
    torch.testing.assert_close(again.reference.table, torch.load(again.reference.path)["logps"])


# -- resume -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_equals_uninterrupted(tiny_llava_dir, tmp_path):
    data = write_preference_set(tmp_path / "data", n=8, seed=1)
    common = ["--task", "DPO", "--use_cross_modal_loss", "True", "--max_steps", "6", "--learning_rate", "1e-3",
              "--offline_ref_logits", tmp_path / "cache", "--group_by_modality_length", "True"]
    full = tmp_path / "full"
    train(prepare(argv(tiny_llava_dir, data, full, *common, "--save_strategy", "steps", "--save_steps", "3")))
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    train(prepare(argv(tiny_llava_dir, data, resumed, *common, "--resume_from_checkpoint", resumed / "checkpoint-3")))
    losses = lambda out: {h["step"]: h["loss"] for h in log_history(out) if "loss" in h}  # noqa: E731
    a, b = losses(full), losses(resumed)
    assert [4, 5, 6] == [s for s in sorted(b) if s > 3]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6), step


def test_resume_without_the_reference_cache_is_refused(tiny_llava_dir, preference_file, tmp_path):
    out = tmp_path / "run"
    train(prepare(argv(tiny_llava_dir, preference_file, out, "--task", "DPO", "--max_steps", "2", "--save_strategy", "steps",
                       "--save_steps", "1")))
    shutil.rmtree(out / "ref_logps")
    trainer = prepare(argv(tiny_llava_dir, preference_file, out, "--task", "DPO", "--max_steps", "2",
                           "--resume_from_checkpoint", out / "checkpoint-1"))
    with pytest.raises(ValueError, match="reference cache .* is missing"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-1"))


# -- bad input ------------------------------------------------------------------------------------


def run_main(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_missing_data_file(tiny_llava_dir, tmp_path, capsys):
    err = run_main(argv(tiny_llava_dir, tmp_path / "nope.json", tmp_path / "o", "--task", "LM"), capsys)
    assert "nope.json" in err and "file not found" in err


def test_record_without_an_image(tiny_llava_dir, tmp_path, capsys):
    data = write_preference_set(tmp_path, n=3)
    records = json.loads(data.read_text())
    del records[1]["image"], records[1]["image_path"]
    data.write_text(json.dumps(records))
    err = run_main(argv(tiny_llava_dir, data, tmp_path / "o", "--task", "DPO"), capsys)
    assert f"{data}, record 1, field 'image'" in err


def test_missing_image_file(tiny_llava_dir, tmp_path, capsys):
    data = write_preference_set(tmp_path, n=3)
    (tmp_path / "images" / "img_2.png").unlink()
    err = run_main(argv(tiny_llava_dir, data, tmp_path / "o", "--task", "DPO"), capsys)
    assert "record 2, field 'image'" in err and "img_2.png" in err


def test_unknown_image_type(tiny_llava_dir, preference_file, tmp_path, capsys):
    err = run_main(argv(tiny_llava_dir, preference_file, tmp_path / "o", "--task", "DPO", "--use_cross_modal_loss", "True",
                        "--use_image_type", "blur"), capsys)
    assert "argument --use_image_type" in err and "invalid choice: 'blur'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("n", ["0", "8"])
def test_use_cl_reward_num_out_of_range(n, tiny_llava_dir, preference_file, tmp_path, capsys):
    err = run_main(argv(tiny_llava_dir, preference_file, tmp_path / "o", "--task", "DPO", "--use_cross_modal_loss", "True",
                        "--use_cl_reward_num", n), capsys)
    assert "--use_cl_reward_num must be in 1..7" in err


def test_one_record_with_context_swapping(tiny_llava_dir, tmp_path, capsys):
    data = write_preference_set(tmp_path, n=1)
    err = run_main(argv(tiny_llava_dir, data, tmp_path / "o", "--task", "DPO", "--use_cross_modal_loss", "True"), capsys)
    assert "context swapping needs at least two records" in err and str(data) in err


def test_missing_model_path(preference_file, tmp_path, capsys):
    err = run_main(argv(tmp_path / "no_model", preference_file, tmp_path / "o", "--task", "LM"), capsys)
    assert "model path not found" in err


def test_published_spellings_are_accepted(tiny_llava_dir, preference_file, tmp_path):
    trainer = prepare(argv(tiny_llava_dir, preference_file, tmp_path, "--task", "LM", "--warmup_ratio", "0.03",
                           "--evaluation_strategy", "no", "--lazy_preprocess", "True", "--mm_use_im_start_end", "False",
                           "--version", "v1", "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
                           "--group_by_modality_length", "True", "--mm_projector_lr", "2e-5"))
    assert trainer.args.warmup_steps == 0.03
    groups = {g["name"]: g["lr"] for g in trainer.create_optimizer().param_groups}
    assert groups["projector/decay"] == 2e-5 and groups["language/decay"] == trainer.args.learning_rate


def test_linear_projector_keeps_its_identity_layer_frozen(tmp_path, preference_file):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from llava.model.tiny import build

    model, processor = build("llava", seed=4)
    CLIPVisionModel(model.config.vision_config).save_pretrained(tmp_path / "clip")
    LlamaForCausalLM(model.config.text_config).save_pretrained(tmp_path / "lm")
    processor.tokenizer.save_pretrained(tmp_path / "lm")
    trainer = prepare(argv(tmp_path / "lm", preference_file, tmp_path / "out", "--task", "LM", "--max_steps", "1",
                           "--vision_tower", tmp_path / "clip", "--mm_projector_type", "linear", "--tune_mm_mlp_adapter", "True",
                           "--learning_rate", "1e-2"))
    trainable = {n for n, p in trainer.model.llava.named_parameters() if p.requires_grad}
    assert trainable == {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias"}
    changed = run_one_step(trainer)
    assert changed == trainable


def test_abandoned_build_locks_are_old_locks_in_either_layout(tmp_path, monkeypatch):
    import os
    import time

    from llava.train.deepspeed_host import abandoned_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    flat, nested, fresh = tmp_path / "op_a" / "lock", tmp_path / "py311_cpu" / "op_b" / "lock", tmp_path / "op_c" / "lock"
    for path, age_minutes in ((flat, 30), (nested, 11), (fresh, 2)):
        path.parent.mkdir(parents=True)
        path.touch()
        then = time.time() - 60 * age_minutes
        os.utime(path, (then, then))
    assert abandoned_build_locks(10) == sorted([flat, nested])
    assert abandoned_build_locks(20) == [flat]
    assert abandoned_build_locks(60) == []


@pytest.mark.slow
def test_bf16_without_deepspeed_trains_float32_master_weights(tiny_llava_dir, preference_file, tmp_path):
    """The README's no-DeepSpeed form at the published MCM-DPO learning rate: --bf16 is mixed precision
    (float32 weights under autocast), so 8 steps at 5e-7 move the weights; bf16 weights would round
    most such updates away."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "mcmdpo.yaml"
    trainer = prepare([str(config), *argv(tiny_llava_dir, preference_file, tmp_path, "--bf16", "True", "--max_steps", "8",
                                          "--learning_rate", "5e-7", "--per_device_train_batch_size", "1",
                                          "--gradient_accumulation_steps", "1", "--warmup_ratio", "0")])
    assert {p.dtype for p in trainer.model.llava.parameters()} == {torch.float32}
    before = snapshot(trainer)
    trainer.train()
    after = snapshot(trainer)
    changed = sum(int((before[n] != after[n]).sum()) for n in before)
    total = sum(t.numel() for t in before.values())
    assert changed / total > 0.5, changed / total
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in log_history_of(trainer))


def log_history_of(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_fp16_without_deepspeed_trains_with_a_grad_scaler(tiny_llava_dir, preference_file, tmp_path):
    """--fp16 without DeepSpeed: float32 weights under fp16 autocast (fp16 weights stopped at the first step on a
    GPU: "Attempting to unscale FP16 gradients")."""
    trainer = prepare(argv(tiny_llava_dir, preference_file, tmp_path, "--task", "DPO", "--fp16", "True", "--max_steps", "2",
                           "--learning_rate", "1e-3"))
    assert {p.dtype for p in trainer.model.llava.parameters()} == {torch.float32}
    before = snapshot(trainer)
    trainer.train()
    assert trainer.accelerator.mixed_precision == "fp16"  # autocast; accelerate adds its grad scaler on GPUs
    losses = [h["loss"] for h in log_history_of(trainer)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.llava.named_parameters())
