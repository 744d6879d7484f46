"""The attention kernel (``llava.model.attention``): flash-attention 2 only where the masks are ordinary,
``sdpa_tree`` for tree-packed rows; and the tree kernel itself (``llava.model.tree_attention``) against
dense masked SDPA."""

import itertools

import pytest
import torch

from llava.model import attention, tree_attention
from llava.model.attention import AttentionError, choose_attention
from llava.train.arguments import parse_args
from llava.train.train import attention_for, prepare
from tests.test_train import argv, run_main

FLAGS = ("ordinary_masks", "half_precision", "flash_installed", "cuda")
WHY = {  # the flag that fails -> words of the one-line error
    "ordinary_masks": "tree-packed preference rows (--preference_forward packed) need a tree mask",
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
    fallback = "sdpa" if here["ordinary_masks"] else "sdpa_tree"
    assert choose_attention("auto", **here) == ("flash_attention_2" if all(here.values()) else fallback)


@pytest.mark.parametrize("kernel", ["sdpa_tree", "sdpa", "eager"])
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
    with pytest.raises(AttentionError, match="choose auto, sdpa_tree, sdpa, eager or flash_attention_2"):
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
    (["--task", "DPO", "--use_cross_modal_loss", "True", "--bf16", "True"], "sdpa_tree"),  # packed by default
    (["--task", "DPO", "--preference_forward", "packed", "--fp16", "True"], "sdpa_tree"),
    (["--task", "DPO", "--preference_forward", "packed", "--attn_implementation", "sdpa"], "sdpa"),
    (["--task", "LM"], "sdpa"),  # fp32
])
def test_auto_in_the_trainer(gpu_with_flash, flags, expect, tmp_path):
    model_args, _, args = parse_args(["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path),
                                      "--use_cpu", "True", *flags])
    assert model_args.attn_implementation == ("sdpa" if "--attn_implementation" in flags else "auto")
    assert attention_for(model_args, args) == expect


def test_explicit_flash_with_packed_rows_stops_the_run(gpu_with_flash, tiny_llava_dir, preference_file, tmp_path, capsys):
    err = run_main(argv(tiny_llava_dir, preference_file, tmp_path / "o", "--task", "DPO", "--use_cross_modal_loss", "True",
                        "--attn_implementation", "flash_attention_2", "--bf16", "True"), capsys)
    assert err.strip() == ("error: --attn_implementation flash_attention_2: the tree-packed preference rows "
                           "(--preference_forward packed) need a tree mask, which only sdpa_tree, sdpa and eager take: "
                           "use --preference_forward naive, or sdpa_tree")
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


# -- the tree kernel: exactly dense masked SDPA, without the masked-out pairs -----------------


def packed_batch(tiny_llava_dir, preference_file, records):
    from tests.test_packing import setup
    from llava.method import CONDITION_NAMES

    model, packed, _ = setup(tiny_llava_dir, preference_file, "pad", CONDITION_NAMES, records)
    return model, packed


def test_chains_of_one_row():
    """prefix 0..2, image 2..6, c_w 6..8, y_w 8..10, y_l 10..11, c_l 11..13 (child of the image), y_w 13..15, then padding."""
    segments = [(0, 2, None), (2, 6, 0), (6, 8, 1), (8, 10, 2), (10, 11, 2), (11, 13, 1), (13, 15, 5)]
    C = tree_attention.Chain
    assert tree_attention.row_chains(segments, 18) == (
        C(0, 10), C(10, 11, ((0, 8),)), C(11, 15, ((0, 6),)), C(15, 18, identity=True))
    assert C(10, 11, ((0, 8),)).keys == ((0, 8), (10, 11)) and C(8, 11, ((0, 8),)).keys == ((0, 11),)


@pytest.mark.parametrize("segments, width", [
    ([(0, 2, None), (3, 4, 0)], 5),  # a gap
    ([(0, 2, None), (2, 4, 1)], 5),  # its own parent
    ([(0, 2, None), (2, 4, 0)], 3),  # longer than the row
])
def test_a_layout_that_is_not_a_tree_is_refused(segments, width):
    with pytest.raises(ValueError, match="not a tree layout"):
        tree_attention.row_chains(segments, width)


def test_the_collators_layout(tiny_llava_dir, preference_file):
    """Per image row: prefix+image+c_w+y_w as one causal chain, then y_l, c_l+y_w, y_l over their ancestors;
    a row's padding is one chain; rows of a record share their chains."""
    _, packed = packed_batch(tiny_llava_dir, preference_file, 3)
    layout, ids = packed["tree"], packed["input_ids"]
    assert "attention_mask" not in packed and layout.rows == ids.shape[0] and layout.length == ids.shape[1]
    assert [(first, end) for first, end, _ in layout.groups] == [(0, 2), (2, 4), (4, 6)]
    for first, _, chains in layout.groups:
        real = [c for c in chains if not c.identity]
        assert len(real) == 4 and not real[0].ancestors and all(c.ancestors for c in real[1:])
        padding = [c for c in chains if c.identity]
        assert len(padding) <= 1 and (not padding or padding[0].end == layout.length)
        assert (ids[first, real[-1].end:] == ids[first, -1]).all()  # the identity chain is the row's padding
    assert layout.pairs() < 0.6 * ids.shape[0] * ids.shape[1] ** 2


def test_lower_right_causal_is_the_mask_the_cpu_builds():
    from torch.nn.attention.bias import causal_lower_right

    assert torch.equal(causal_lower_right(3, 7)._materialize(), torch.ones(3, 7, dtype=torch.bool).tril(4))


class Heads(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


@pytest.mark.parametrize("kv_groups", [1, 2])
def test_tree_kernel_equals_dense_masked_sdpa(kv_groups, tiny_llava_dir, preference_file):
    """Outputs and gradients of q, k, v: three records of different lengths (padding), grouped-query heads."""
    from transformers.integrations.sdpa_attention import repeat_kv

    _, packed = packed_batch(tiny_llava_dir, preference_file, 3)
    layout = packed["tree"]
    mask = layout.dense()
    rows, n = mask.shape[0], mask.shape[-1]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 4, n, 8, generator=g, requires_grad=True)
    k = torch.randn(rows, 4 // kv_groups, n, 8, generator=g, requires_grad=True)
    v = torch.randn(rows, 4 // kv_groups, n, 8, generator=g, requires_grad=True)
    assert len(layout.groups) > 1  # rows of different layouts run as separate groups, concatenated in order
    out, _ = tree_attention.tree_sdpa_attention(Heads(kv_groups), q, k, v, None, scaling=0.3, tree_layout=layout)
    ref = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, kv_groups), repeat_kv(v, kv_groups),
                                                           attn_mask=mask, scale=0.3).transpose(1, 2)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5
    w = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.parametrize("kernel", ["sdpa_tree", "sdpa"])
def test_the_model_runs_the_kernel_it_was_given(kernel, tiny_llava_dir, preference_file, monkeypatch):
    """sdpa_tree never attends a whole packed row against itself; the dense reference does, every layer."""
    from llava.model.attention import use_attention
    from llava.model.forward import response_logps

    model, packed = packed_batch(tiny_llava_dir, preference_file, 1)
    use_attention(model, kernel)
    shapes, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, *args, **kwargs):
        shapes.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        response_logps(model, packed)
    n, layers = packed["input_ids"].shape[1], model.config.text_config.num_hidden_layers
    whole_rows = [s for s in shapes if s == (n, n)]
    assert len(whole_rows) == (0 if kernel == "sdpa_tree" else layers)
    if kernel == "sdpa_tree":  # the two image rows share a layout: four chains per layer, both rows at once
        assert len([s for s in shapes if s[0] < n]) >= 4 * layers
