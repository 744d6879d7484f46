"""Training flags: each choice typed once, listed by --help, a bad value stopped with one line."""

import io
from contextlib import redirect_stderr, redirect_stdout

import pytest

from llava.conversation import TEMPLATE_NAMES
from llava.data.images import ASPECT_RATIOS
from llava.data.negatives import IMAGE_TYPES
from llava.train.arguments import parse_args
from llava.train.losses import AGGREGATES

REQUIRED = ["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", "/tmp/unused-out"]


def help_text() -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"])
    return " ".join(out.getvalue().split())


@pytest.mark.parametrize("flag, choices", [
    ("--use_image_type", IMAGE_TYPES), ("--image_aspect_ratio", ASPECT_RATIOS), ("--version", TEMPLATE_NAMES),
    ("--mcm_aggregate", AGGREGATES), ("--task", ("LM", "DPO")), ("--reference_mode", ("cached", "live", "adapters_off")),
    ("--preference_forward", ("packed", "naive")), ("--attn_implementation", ("auto", "sdpa_tree", "sdpa", "eager", "flash_attention_2")),
])
def test_help_lists_the_choices(flag, choices):
    assert f"{flag} {{{','.join(choices)}}}" in help_text()


@pytest.mark.parametrize("flag, value", [("--use_image_type", "blur"), ("--image_aspect_ratio", "wide"),
                                         ("--version", "v0"), ("--task", "RLHF")])
def test_a_bad_choice_is_one_line(flag, value):
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as e:
        parse_args([*REQUIRED, flag, value])
    assert e.value.code == 2
    (line,) = err.getvalue().strip().splitlines()
    assert line.startswith(f"error: argument {flag}") and f"invalid choice: '{value}'" in line


def test_choices_parse_into_their_fields():
    model, data, train = parse_args([*REQUIRED, "--use_image_type", "rotate", "--image_aspect_ratio", "anyres",
                                     "--version", "llava_v1", "--task", "DPO", "--mcm_aggregate", "loss"])
    assert (train.use_image_type, data.image_aspect_ratio, model.version, train.task, train.mcm_aggregate) == \
        ("rotate", "anyres", "llava_v1", "DPO", "loss")
