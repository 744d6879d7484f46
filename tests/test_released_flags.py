"""The released command lines run unchanged: every field of the released argument dataclasses is
accepted, those without effect are named in one warning line, ``--bits`` needs CUDA, and
``deepspeed llava/train/train_mem.py`` runs the trainer."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava.train.arguments import NO_EFFECT, parse_args
from llava.train.params import Trainable
from llava.train.train import main

REPO = Path(__file__).resolve().parents[1]

# Every field of ModelArguments, DataArguments and TrainingArguments in LVUGAI/MCM-DPO's
# llava/train/train.py (those beyond transformers.TrainingArguments), each at its released default
# (model_name_or_path and data_path aside: given by every command line), or, where that default is
# None, at a value of the released scripts or README. `--version`'s released default v0 is not offered
# (tests/test_arguments.py: a one-line error); the scripts' v1 stands in.
RELEASED_FIELDS = {
    "version": "v1", "freeze_backbone": False, "tune_mm_mlp_adapter": False,
    "vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -1, "pretrain_mm_mlp_adapter": "mm_projector.bin",
    "mm_projector_type": "linear", "mm_use_im_start_end": False, "mm_use_im_patch_token": True,
    "mm_patch_merge_type": "flat", "mm_vision_select_feature": "patch",
    "lazy_preprocess": False, "is_multimodal": False, "image_folder": "/", "image_aspect_ratio": "square",
    "offline_ref_logits": "", "use_image_type": "diffusion", "diffusion_step": 700,
    "cache_dir": "hf_cache", "optim": "adamw_torch", "remove_unused_columns": False, "freeze_mm_mlp_adapter": False,
    "mpt_attn_impl": "triton", "model_max_length": 512, "double_quant": True, "quant_type": "nf4", "bits": 16,
    "lora_enable": False, "lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.05, "lora_weight_path": "", "lora_bias": "none",
    "mm_projector_lr": 2e-5, "group_by_modality_length": False, "task": "LM", "dpo_token_weighted": False,
    "dpo_token_weight": 1.1, "use_cross_modal_loss": False, "use_cross_modal_gama": 0.3, "tok_beta": 0.1, "use_tdpo": True,
    "use_cl_reward_num": 7, "para_norm": 2.8, "para_r3": 1.0, "para_r1": 0.5, "para_r2": 0.5, "para_r4": 0.2, "para_r5": 0.2,
    "para_r6": 0.2, "para_r7": 0.2,
}


def command_line(fields: dict, tmp_path) -> list[str]:
    argv = ["--model_name_or_path", str(tmp_path / "model"), "--data_path", str(tmp_path / "data.json"),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    for name, value in fields.items():
        argv += [f"--{name}", str(value)]
    return argv


def test_every_released_field_is_accepted_with_its_value(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llava.train"):
        parsed = parse_args(command_line(RELEASED_FIELDS, tmp_path))
    values = {k: v for args in parsed for k, v in vars(args).items()}
    for name, value in RELEASED_FIELDS.items():
        assert values[name] == value, name
    # one line names every given flag that changes nothing here, and only those
    idle = [r.getMessage() for r in caplog.records if "without effect" in r.getMessage()]
    assert len(idle) == 1
    assert set(idle[0].split(": ", 1)[1].split(", ")) == {f"--{n}" for n in NO_EFFECT}
    assert any("--mm_use_im_patch_token True" in r.getMessage() for r in caplog.records)


def test_flags_left_out_raise_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llava.train"):
        parse_args(command_line({"task": "LM"}, tmp_path))
    assert not [r for r in caplog.records if "without effect" in r.getMessage() or "im_patch" in r.getMessage()]


def test_a_released_flag_without_effect_is_named_alone(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="llava.train"):
        parse_args(command_line({"tok_beta": 0.5, "lora_r": 8}, tmp_path))
    lines = [r.getMessage() for r in caplog.records if "without effect" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith(": --tok_beta")


def test_tf32_is_ignored_without_a_gpu_that_has_it(tmp_path):
    import transformers

    if transformers.utils.is_torch_tf32_available():
        pytest.skip("this machine has TF32")
    _, _, args = parse_args(command_line({"tf32": True}, tmp_path))
    assert args.tf32 is None


def test_image_start_end_tokens_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(command_line({"mm_use_im_start_end": True}, tmp_path))
    assert e.value.code == 2
    assert "--mm_use_im_start_end True is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("bits", ["4", "8"])
def test_quantized_training_without_cuda_stops_with_one_line(bits, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: --bits trains")
    with pytest.raises(SystemExit) as e:
        main(command_line({"bits": bits, "lora_enable": True}, tmp_path))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: --bits {bits} quantizes with bitsandbytes, which needs a CUDA GPU: none is available here\n"


@pytest.mark.parametrize("flags,message", [
    ({"bits": 3}, "--bits must be 4 or 8 (QLoRA) or 16"),
    ({"quant_type": "int4"}, "argument --quant_type/--quant-type: invalid choice: 'int4'"),
])
def test_bad_quantization_values(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(command_line(flags, tmp_path))
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_loads_the_language_model_only_in_bits(bits):
    import torch

    from llava.train.params import quantization

    kwargs = quantization(bits, quant_type="fp4", double_quant=False, compute_dtype=torch.bfloat16, device="cuda:1")
    config = kwargs["quantization_config"]
    assert (config.load_in_4bit, config.load_in_8bit) == (bits == 4, bits == 8)
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant, config.bnb_4bit_compute_dtype) == ("fp4", False, torch.bfloat16)
    assert {"vision_tower", "multi_modal_projector", "lm_head"} <= set(config.llm_int8_skip_modules)
    assert kwargs["device_map"] == {"": "cuda:1"}


# (tune_mm_mlp_adapter, freeze_backbone, unfreeze_mm_vision_tower, freeze_mm_mlp_adapter) -> (language, projector, vision)
TRAINABLE_RULES = [
    ((False, False, None, False), (True, True, True)),  # released: everything, the tower included
    ((False, False, False, False), (True, True, False)),
    ((True, False, None, False), (False, True, False)),  # LLaVA's projector pre-training
    ((True, False, True, False), (False, True, True)),
    ((False, True, None, False), (False, True, True)),
    ((False, True, False, False), (False, True, False)),
    ((False, False, None, True), (True, False, True)),
    ((False, True, True, True), (False, False, True)),
]


@pytest.mark.parametrize("flags,parts", TRAINABLE_RULES)
def test_trainable_parts_from_flags(flags, parts):
    tune, freeze_backbone, vision, freeze_projector = flags
    t = Trainable.from_flags(tune_mm_mlp_adapter=tune, freeze_backbone=freeze_backbone, unfreeze_mm_vision_tower=vision,
                             freeze_mm_mlp_adapter=freeze_projector)
    assert (t.language, t.projector, t.vision) == parts


def test_flags_that_freeze_everything_are_refused():
    with pytest.raises(ValueError, match="nothing would train"):
        Trainable.from_flags(tune_mm_mlp_adapter=True, freeze_mm_mlp_adapter=True)


def test_train_mem_runs_as_a_script(tmp_path):
    """``python llava/train/train_mem.py`` (what deepspeed launches) reaches the trainer's own checks."""
    result = subprocess.run([sys.executable, "llava/train/train_mem.py", *command_line({"task": "DPO"}, tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr[-2000:]
    # the data are checked before the model loads: the missing data file is named first
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'data.json'}: file not found"


# The released scripts/mcmdpo.sh, flag for flag; only the placeholders are filled (and the run is
# cut to one step, reported nowhere).
RELEASED_MCMDPO = """
    --deepspeed ./scripts/zero3.json --model_name_or_path {model} --version v1 --data_path {data} --image_folder /
    --vision_tower openai/clip-vit-large-patch14-336 --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2
    --mm_use_im_start_end False --mm_use_im_patch_token False --image_aspect_ratio pad --group_by_modality_length True
    --bf16 True --num_train_epochs 2 --per_device_train_batch_size 1 --per_device_eval_batch_size 4
    --gradient_accumulation_steps 16 --evaluation_strategy no --save_strategy epoch --save_steps 35 --save_total_limit 10
    --learning_rate 5e-7 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 --tf32 True
    --model_max_length 2048 --gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True
    --output_dir {out} --report_to none --task DPO --use_image_type diffusion --diffusion_step 700 --use_cl_reward_num 7
    --use_cross_modal_loss True --para_norm 2.8 --para_r3 1.0 --para_r1 0.5 --para_r2 0.5 --para_r4 0.2 --para_r5 0.2
    --para_r6 0.2 --para_r7 0.2 --max_steps 1
"""


@pytest.mark.slow
def test_released_mcmdpo_command_line_runs_under_deepspeed(tiny_llava_dir, tmp_path):
    import json
    import math

    from tests.conftest import write_preference_set
    from tests.test_scripts import free_port

    data = write_preference_set(tmp_path / "data")
    records = json.loads(data.read_text())
    for r in records:  # --image_folder / : absolute image paths, as the released data has them
        r["image"]["path"] = r["image_path"] = str(data.parent / r["image_path"])
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    flags = RELEASED_MCMDPO.format(model=tiny_llava_dir, data=data, out=out).split()
    launcher = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(launcher), "--num_gpus", "1", "--master_port", str(free_port()), "llava/train/train_mem.py",
                             *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["step"] for h in logs] == [1] and math.isfinite(logs[0]["loss"])
    assert "mcm/all/margin" in logs[0]


# -- the released method flags are aliases of --loss and --term_weights (llava.train.released_flags) --

MCM_WEIGHTS = {"response": 1.0, "image": 0.5, "context": 0.5, "context_response": 0.2, "image_response": 0.2,
               "context_image": 0.2, "all": 0.2}
SAME_RUN = [
    (["--task", "DPO"], ["--loss", "dpo"]),
    (["--task", "DPO", "--use_cross_modal_loss", "True", "--para_r1", "0.5", "--para_r2", "0.5", "--para_r3", "1.0",
      "--para_r4", "0.2", "--para_r5", "0.2", "--para_r6", "0.2", "--para_r7", "0.2"],
     ["--loss", "mcm_dpo", "--term_weights", json.dumps(MCM_WEIGHTS)]),
    (["--task", "DPO", "--use_cross_modal_loss", "True", "--use_cl_reward_num", "4"],
     ["--loss", "mcm_dpo", "--term_weights", '{"response": 1.0, "image": 0.5, "context": 0.5, "context_response": 0.2}']),
]


def run_of(argv: list[str], tmp_path):
    from llava.train.train import RESULT_FLAGS, make_objective

    args = parse_args(command_line({}, tmp_path) + argv)[2]
    objective = make_objective(args)
    return ({name: getattr(args, name) for name in RESULT_FLAGS}, type(objective).__name__, objective.conditions,
            getattr(objective, "weights", None))


@pytest.mark.parametrize("released,new", SAME_RUN, ids=["dpo", "mcm_dpo_7", "use_cl_reward_num_4"])
def test_released_flags_and_the_new_config_are_the_same_run(released, new, tmp_path):
    flags, kind, conditions, weights = run_of(released, tmp_path)
    assert (flags, kind, conditions, weights) == run_of(new, tmp_path)
    assert flags["loss"] == new[1] and "task" not in flags and "para_r1" not in flags
    if new[1] == "mcm_dpo":
        given = json.loads(new[3])
        assert flags["term_weights"] == {t: given.get(t, 0.0) for t in MCM_WEIGHTS}  # terms left out weigh 0
        assert len(conditions) == 1 + len(given)  # the chosen condition and each term's loser


def test_the_yaml_mapping_is_the_released_mcmdpo_run(tmp_path):
    from llava.train.arguments import config_argv

    argv = config_argv(str(REPO / "configs/mcmdpo.yaml"))
    assert argv[argv.index("--term_weights") + 1] == json.dumps(MCM_WEIGHTS)  # a mapping travels as one JSON word
    loss = argv.index("--loss")
    assert run_of(argv[loss:loss + 2] + ["--term_weights", json.dumps(MCM_WEIGHTS)], tmp_path) == run_of(SAME_RUN[1][0], tmp_path)


@pytest.mark.parametrize("argv,message", [
    (["--loss", "dpo", "--task", "DPO", "--use_cross_modal_loss", "True"],
     "--loss dpo disagrees with --task DPO --use_cross_modal_loss True (which mean --loss mcm_dpo): give one of them"),
    (["--loss", "mcm_dpo", "--term_weights", '{"response": 1.0}', "--para_r2", "0.3"],
     "--para_r2 0.3 disagrees with --term_weights image: 0: give one of them"),
    (["--loss", "mcm_dpo", "--term_weights", '{"respons": 1.0}'],
     "--term_weights: unknown term 'respons'; the terms are response, image, context, context_response, "
     "image_response, context_image, all"),
])
def test_released_and_new_flags_that_disagree_stop_with_one_line(argv, message, tmp_path):
    with pytest.raises(ValueError) as e:
        parse_args(command_line({}, tmp_path) + argv)
    assert str(e.value) == message
