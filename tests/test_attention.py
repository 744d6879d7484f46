"""The attention kernel (``llava.model.attention``): flash-attention 2 only where the masks are ordinary."""

import itertools

import pytest
import torch

from llava.model import attention
from llava.model.attention import AttentionError, choose_attention
from llava.train.arguments import parse_args
from llava.train.train import attention_for, prepare
from tests.test_train import argv, run_main

FLAGS = ("ordinary_masks", "half_precision", "flash_installed", "cuda")
WHY = {  # the flag that fails -> words of the one-line error
    "ordinary_masks": "tree-packed preference rows (--preference_forward packed) need a 4-D mask",
    "half_precision": "bf16 or fp16 only",
    "flash_installed": "flash_attn package is not installed",
    "cuda": "no CUDA device is visible",
}


def machines():
    """Every combination of the four conditions."""
    for values in itertools.product((True, False), repeat=len(FLAGS)):
        yield dict(zip(FLAGS, values))


@pytest.mark.parametrize("here", list(machines()), ids=lambda h: "-".join(k for k, v in h.items() if not v) or "all")
def test_auto_is_flash_exactly_when_everything_allows_it(here):
    assert choose_attention("auto", **here) == ("flash_attention_2" if all(here.values()) else "sdpa")


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("here", list(machines()), ids=lambda h: "-".join(k for k, v in h.items() if not v) or "all")
def test_sdpa_and_eager_are_taken_as_given(kernel, here):
    assert choose_attention(kernel, **here) == kernel


def test_explicit_flash_where_it_can_run():
    assert choose_attention("flash_attention_2", **dict.fromkeys(FLAGS, True)) == "flash_attention_2"


@pytest.mark.parametrize("missing", FLAGS)
def test_explicit_flash_that_cannot_run_says_why(missing):
    here = dict.fromkeys(FLAGS, True) | {missing: False}
    with pytest.raises(AttentionError) as e:
        choose_attention("flash_attention_2", **here)
    message = str(e.value)
    assert "\n" not in message and message.startswith("--attn_implementation flash_attention_2: ")
    assert WHY[missing] in message
    for other in set(FLAGS) - {missing}:
        assert WHY[other] not in message


def test_packed_rows_are_named_first():
    """On a machine without the package or CUDA, the packed rows are still the reason given."""
    with pytest.raises(AttentionError, match="tree-packed"):
        choose_attention("flash_attention_2", **dict.fromkeys(FLAGS, False))


def test_an_unknown_kernel():
    with pytest.raises(AttentionError, match="choose auto, sdpa, eager or flash_attention_2"):
        choose_attention("flex_attention", **dict.fromkeys(FLAGS, True))


# -- the trainer's wiring: which runs have ordinary masks ------------------------------------


@pytest.fixture
def gpu_with_flash(monkeypatch):
    """This machine as a CUDA machine with flash_attn installed (only the chooser's view of it)."""
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    monkeypatch.setattr(attention, "cuda_available", lambda: True)


@pytest.mark.parametrize("flags, expect", [
    (["--task", "LM", "--bf16", "True"], "flash_attention_2"),
    (["--task", "DPO", "--preference_forward", "naive", "--bf16", "True"], "flash_attention_2"),
    (["--task", "DPO", "--use_cross_modal_loss", "True", "--preference_forward", "naive", "--bf16", "True"], "flash_attention_2"),
    (["--task", "DPO", "--use_cross_modal_loss", "True", "--bf16", "True"], "sdpa"),  # packed by default
    (["--task", "DPO", "--preference_forward", "packed", "--fp16", "True"], "sdpa"),
    (["--task", "LM"], "sdpa"),  # fp32
])
def test_auto_in_the_trainer(gpu_with_flash, flags, expect, tmp_path):
    model_args, _, args = parse_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path),
                                      "--use_cpu", "True", *flags])
    assert model_args.attn_implementation == "auto"
    assert attention_for(model_args, args) == expect


def test_explicit_flash_with_packed_rows_stops_the_run(gpu_with_flash, tiny_llava_dir, preference_file, tmp_path, capsys):
    err = run_main(argv(tiny_llava_dir, preference_file, tmp_path / "o", "--task", "DPO", "--use_cross_modal_loss", "True",
                        "--attn_implementation", "flash_attention_2", "--bf16", "True"), capsys)
    assert err.strip() == ("error: --attn_implementation flash_attention_2: the tree-packed preference rows "
                           "(--preference_forward packed) need a 4-D mask, which only sdpa and eager take: "
                           "use --preference_forward naive, or sdpa")
    assert not (tmp_path / "o" / "ref_logps").exists()  # stopped before the reference or the model


def test_explicit_flash_without_the_package_stops_the_run(tiny_llava_dir, preference_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    err = run_main(argv(tiny_llava_dir, preference_file, tmp_path / "o", "--task", "LM",
                        "--attn_implementation", "flash_attention_2", "--bf16", "True"), capsys)
    assert err.count("\n") == 1 and WHY["flash_installed"] in err


def test_auto_is_sdpa_on_this_machine_end_to_end(tiny_llava_dir, preference_file, tmp_path):
    """A real SFT prepare() here (no CUDA): auto becomes sdpa, in the model and in what the run records."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: auto may choose flash-attention 2")
    trainer = prepare(argv(tiny_llava_dir, preference_file, tmp_path / "o", "--task", "LM", "--max_steps", "1"))
    llava = trainer.model.llava
    assert llava.config._attn_implementation == "sdpa"
    assert llava.config.text_config._attn_implementation == "sdpa"
    assert llava.config.vision_config._attn_implementation == "sdpa"
