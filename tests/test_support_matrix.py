"""The supported setups, run: checkpoint layouts x launches x precisions x tuning x stages x references.

Every pair of values of any two factors appears in some run of ``RUNS`` (checked below, so the claim
cannot drift from the list); each run takes two steps and must log finite losses and save changed
weights. Beside it, one MCM-DPO run per layout under ZeRO-2 and under ZeRO-3 (2 processes, 3 steps,
lr 1e-3, fp32) must log equal losses and gradient norms and save equal weights under equal names.

The DeepSpeed runs of one ZeRO stage share a launch (tests/zero_runs.py): a launch costs more than a run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_scripts import free_port
from tests.test_train import argv as base_argv

REPO = Path(__file__).resolve().parents[1]

FACTORS = {
    "layout": ("hf", "orig_inside", "orig_separate", "composed"),
    "launch": ("zero3", "zero2", "none"),
    "precision": ("bf16", "fp32"),
    "tuning": ("full", "lora"),
    "stage": ("sft", "dpo", "mcm"),
    "reference": ("cached", "live"),  # preference stages only: SFT has no reference
}
# (layout, launch, precision, tuning, stage, reference)
RUNS = [
    ("composed", "none", "fp32", "lora", "dpo", "live"),
    ("hf", "none", "bf16", "full", "mcm", "cached"),
    ("orig_inside", "none", "bf16", "full", "sft", None),
    ("orig_separate", "none", "bf16", "lora", "sft", None),
    ("composed", "zero2", "fp32", "lora", "mcm", "cached"),
    ("hf", "zero2", "fp32", "lora", "sft", None),
    ("orig_inside", "zero2", "fp32", "full", "mcm", "live"),
    ("orig_separate", "zero2", "bf16", "full", "dpo", "cached"),
    ("composed", "zero3", "bf16", "full", "sft", None),
    ("hf", "zero3", "bf16", "full", "dpo", "live"),
    ("orig_inside", "zero3", "bf16", "lora", "dpo", "cached"),
    ("orig_separate", "zero3", "fp32", "lora", "mcm", "live"),
]
STAGE_FLAGS = {"sft": ["--task", "LM"], "dpo": ["--task", "DPO", "--use_cross_modal_loss", "False"],
               "mcm": ["--task", "DPO", "--use_cross_modal_loss", "True"]}


def as_dict(run) -> dict:
    return dict(zip(FACTORS, run))


def test_the_runs_cover_every_pair_of_values():
    covered = set()
    for run in RUNS:
        values = [(k, v) for k, v in as_dict(run).items() if v is not None]
        covered |= set(itertools.combinations(values, 2))
    for (a, va), (b, vb) in itertools.product(((k, v) for k in FACTORS for v in FACTORS[k]), repeat=2):
        if list(FACTORS).index(a) >= list(FACTORS).index(b):
            continue
        if "reference" in (a, b) and "sft" in (va, vb):  # no reference in SFT
            continue
        assert ((a, va), (b, vb)) in covered, f"no run has {a}={va} with {b}={vb}"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The four starting points: an HF LLaVA-1.5, an original-format LLaVA-1.5 with its tower inside, an
    original-format LLaVA-1.6 with the tower in a separate CLIP directory (as liuhaotian ships v1.6 it is
    inside, v1.5 beside: both shapes occur), and a Llama LM with a CLIP directory to compose."""
    from transformers import CLIPVisionModel

    from llava.model.convert import main as convert
    from llava.model.tiny import build, write

    d = tmp_path_factory.mktemp("layouts")
    hf = write(d / "hf", arch="llava", seed=0)
    convert(["to-original", "--src", str(hf), "--out", str(d / "orig_inside")])
    convert(["to-original", "--src", str(write(d / "hf_next", arch="llava_next", seed=1)), "--out", str(d / "orig_separate"),
             "--separate_vision_tower"])
    model, processor = build("llava", seed=2)
    CLIPVisionModel(model.config.vision_config).save_pretrained(d / "clip")
    processor.image_processor.save_pretrained(d / "clip")
    write(d / "lm", arch="llama", seed=2)
    return {"hf": (hf, []), "orig_inside": (d / "orig_inside", []), "orig_separate": (d / "orig_separate", []),
            "composed": (d / "lm", ["--vision_tower", str(d / "clip")])}


def run_argv(layouts, data, out, layout, launch, precision, tuning, stage, reference, *, steps=2, lr="1e-3"):
    model, model_flags = layouts[layout]
    flags = [*model_flags, *STAGE_FLAGS[stage], "--max_steps", str(steps), "--learning_rate", lr,
             "--per_device_train_batch_size", "1", "--image_aspect_ratio", "pad", "--model_max_length", "2048",
             "--bf16", str(precision == "bf16"), "--max_grad_norm", "0"]
    if reference:
        flags += ["--reference_mode", reference]
    if tuning == "lora":
        flags += ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8"]
    if launch != "none":
        flags += ["--deepspeed", str(REPO / "scripts" / f"{launch}.json")]
    return [str(a) for a in base_argv(model, data, out, *flags)]


def launch(runs: list[list[str]], spec: Path) -> None:
    spec.write_text(json.dumps(runs))
    launcher = Path(sys.executable).parent / "deepspeed"
    result = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "tests/zero_runs.py",
                             str(spec)], cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    spec.with_suffix(".log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def losses(out: Path) -> list[float]:
    return [log["loss"] for log in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in log]


def changed_fraction(start: Path, start_flags: list[str], out: Path, tuning: str) -> float:
    """The fraction of the trained tensors' elements that differ from the start (LoRA: of the B matrices,
    which start at zero)."""
    if tuning == "lora":
        adapter = load_file(str(out / "adapter_model.safetensors"))
        b = [t for k, t in adapter.items() if "lora_B" in k]
        assert b, sorted(adapter)[:5]
        return sum(int((t != 0).sum()) for t in b) / sum(t.numel() for t in b)
    from llava.model.load import compose, load_model

    if start_flags:  # composed: the same seed composes the same start
        before, _ = compose(start, start_flags[1], seed=0)
    else:
        before, _ = load_model(start)
    after, _ = load_model(out)
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    layers = [k for k in a if ".layers." in k and k.startswith("model.language_model.")]
    return sum(int((a[k].float() != b[k].float()).sum()) for k in layers) / sum(a[k].numel() for k in layers)


@pytest.mark.slow
def test_support_matrix_and_zero2_equals_zero3(layouts, preference_file, tmp_path):
    from llava.train.train import prepare, train

    outs = {run: tmp_path / f"run{i}" for i, run in enumerate(RUNS)}
    equal = {(layout, zero): tmp_path / f"eq_{layout}_{zero}" for layout in FACTORS["layout"] for zero in ("zero2", "zero3")}
    for zero in ("zero2", "zero3"):
        runs = [run_argv(layouts, preference_file, out, *run) for run, out in outs.items() if run[1] == zero]
        runs += [run_argv(layouts, preference_file, equal[layout, zero], layout, zero, "fp32", "full", "mcm", "cached",
                          steps=3) for layout in FACTORS["layout"]]
        launch(runs, tmp_path / f"{zero}.json")
    for run, out in outs.items():
        if run[1] == "none":
            train(prepare(run_argv(layouts, preference_file, out, *run)))

    for run, out in outs.items():
        found = losses(out)
        assert len(found) == 2 and all(math.isfinite(x) for x in found), (run, found)
        start, flags = layouts[run[0]]
        assert changed_fraction(start, flags, out, run[3]) > 0.5, run

    for layout in FACTORS["layout"]:
        z2, z3 = equal[layout, "zero2"], equal[layout, "zero3"]
        assert len(losses(z2)) == 3
        torch.testing.assert_close(torch.tensor(losses(z3)), torch.tensor(losses(z2)), rtol=1e-5, atol=1e-6)
        norms2, norms3 = (json.loads((d / "grad_norms.json").read_text()) for d in (z2, z3))
        assert len(norms2) == 3 and all(n > 0 for n in norms2)
        torch.testing.assert_close(torch.tensor(norms3), torch.tensor(norms2), rtol=1e-4, atol=1e-6)
        w2, w3 = load_file(str(z2 / "model.safetensors")), load_file(str(z3 / "model.safetensors"))
        assert sorted(w3) == sorted(w2), layout
        assert any(k.startswith("language_model.model.layers.") for k in w2) and "language_model.lm_head.weight" in w2
        assert any(k.startswith("vision_tower.vision_model.") for k in w2)
        assert any(k.startswith("multi_modal_projector.") for k in w2)
        # within 1e-5 where a step moves a weight by ~1e-3: ZeRO-2 and ZeRO-3 reduce in other orders, and Adam
        # turns the rounding noise of a gradient that is zero in exact arithmetic (the tower's key biases,
        # which softmax cancels) into steps of that size
        for k in w2:
            torch.testing.assert_close(w3[k], w2[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{layout} {k}: {m}")
