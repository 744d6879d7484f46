"""Stage 1: the `plain` template, mm_projector.bin (written as LLaVA writes it, read back by stage 2),
and scripts/pretrain.sh end to end under DeepSpeed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import get_template
from llava.data.datasets import SFTDataset
from llava.data.images import ImageProcessor
from llava.data.records import read_records
from llava.model.load import compose, load_model, save_model
from llava.model.tiny import write
from llava.train.params import Trainable, set_trainable
from llava.train.projector_file import (PROJECTOR_FILE, load_projector_file, projector_state, trains_projector_only,
                                        write_projector_file)

REPO = Path(__file__).resolve().parents[1]
TOWER = REPO / "llava" / "model" / "assets" / "sample_clip"
SAMPLE = REPO / "data" / "sample"


@pytest.fixture(scope="module")
def language_model(tmp_path_factory):
    return write(tmp_path_factory.mktemp("lm"), arch="llama", size="tiny")


def test_plain_template_trains_the_caption_and_its_newline_only(language_model):
    """LLaVA's preprocess_plain: the image alone, then the caption and "\\n"; the image part is not learned."""
    _, processor = compose(language_model, TOWER)
    records = read_records(SAMPLE / "pretrain.json", "sft")
    ds = SFTDataset(records, processor.tokenizer, get_template("plain"), ImageProcessor(processor, "square"), SAMPLE, 2048)
    tok = processor.tokenizer
    raw = json.loads((SAMPLE / "pretrain.json").read_text())
    for i in (0, 1):
        e = ds[i]
        caption = raw[i]["conversations"][1]["value"]
        kept = [t for t, label in zip(e.input_ids, e.labels) if label != -100]
        assert tok.decode(kept) == caption + "\n"
        masked = [t for t, label in zip(e.input_ids, e.labels) if label == -100]
        image_id = tok.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
        assert set(masked) <= {tok.bos_token_id, image_id}  # the instruction is dropped, as in LLaVA
        assert tok.eos_token_id not in e.input_ids


def test_trains_projector_only_follows_the_flags(language_model):
    model, _ = compose(language_model, TOWER)
    set_trainable(model, Trainable.from_flags(tune_mm_mlp_adapter=True))
    assert trains_projector_only(model)
    set_trainable(model, Trainable.from_flags())
    assert not trains_projector_only(model)


def test_projector_file_round_trip(language_model, tmp_path):
    """mm_projector.bin has LLaVA's names and shapes; --pretrain_mm_mlp_adapter loads exactly these weights."""
    trained, processor = compose(language_model, TOWER, seed=1)
    with torch.no_grad():
        for p in trained.model.multi_modal_projector.parameters():
            p.add_(torch.randn_like(p))
    save_model(trained, processor, tmp_path / "stage1")
    path = write_projector_file(tmp_path / "stage1")
    assert path == tmp_path / "stage1" / PROJECTOR_FILE
    saved = torch.load(path, weights_only=True)
    proj = trained.model.multi_modal_projector
    assert set(saved) == {f"model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert torch.equal(saved["model.mm_projector.0.weight"], proj.linear_1.weight)
    assert torch.equal(saved["model.mm_projector.2.bias"], proj.linear_2.bias)
    fresh, _ = compose(language_model, TOWER, seed=2)
    assert not torch.equal(fresh.model.multi_modal_projector.linear_1.weight, proj.linear_1.weight)
    load_projector_file(fresh, str(path))
    for name, w in proj.state_dict().items():
        assert torch.equal(fresh.model.multi_modal_projector.state_dict()[name], w), name


def test_projector_state_needs_a_projector(language_model):
    with pytest.raises(ValueError, match="no multi_modal_projector weights"):
        projector_state(language_model)
    with pytest.raises(FileNotFoundError, match="no .safetensors file"):
        projector_state(TOWER.parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pretrain_script_aligns_the_projector_only(language_model, tmp_path):
    """scripts/pretrain.sh with its defaults: the language model and tower stay as they were, the
    projector moves, and mm_projector.bin holds the saved projector."""
    out = tmp_path / "stage1"
    env = {**os.environ, "MODEL_PATH": str(language_model), "OUTPUT_DIR": str(out), "NUM_GPUS": "2",
           "REPORT_TO": "none", "MASTER_PORT": str(_free_port()), "PYTHON": sys.executable,
           "SAMPLE_DATA": "1"}  # a model of its own on the bundled captions, on purpose
    result = subprocess.run(["bash", "scripts/pretrain.sh", "--max_steps", "2", "--per_device_train_batch_size", "4",
                             "--gradient_accumulation_steps", "1", "--save_strategy", "no"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--version plain" in result.stderr and "--tune_mm_mlp_adapter True" in result.stderr
    trained, _ = load_model(out)
    start, _ = compose(language_model, TOWER)
    assert torch.equal(trained.lm_head.weight, start.lm_head.weight)
    for name, w in start.model.vision_tower.state_dict().items():
        assert torch.equal(trained.model.vision_tower.state_dict()[name], w), name
    assert not torch.equal(trained.model.multi_modal_projector.linear_1.weight, start.model.multi_modal_projector.linear_1.weight)
    load_projector_file(start, str(out / PROJECTOR_FILE))
    for name, w in trained.model.multi_modal_projector.state_dict().items():
        assert torch.equal(start.model.multi_modal_projector.state_dict()[name], w), name
