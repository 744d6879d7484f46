"""scripts/build_vision_tower.py: deterministic, a plain CLIPModel, and the shipped tower sees the sample scenes."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "llava" / "model" / "assets" / "sample_clip"
SMALL = dict(steps=3, pairs=4, hidden=32, layers=2, log_every=100)


def _load():
    spec = importlib.util.spec_from_file_location("build_vision_tower", ROOT / "scripts" / "build_vision_tower.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_vision_tower"] = mod
    spec.loader.exec_module(mod)
    return mod


bvt = _load()


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(autouse=True)
def _restore_torch_settings():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    bvt.train_tower(a, seed=0, **SMALL)
    bvt.train_tower(b, seed=0, **SMALL)
    bvt.train_tower(c, seed=1, **SMALL)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert set(fa) >= {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"}
    assert fa == fb
    assert fa["model.safetensors"] != fc["model.safetensors"]


def test_twins_differ_in_one_drawn_fact():
    msd = bvt.msd
    rng = random.Random(5)
    for _ in range(60):
        scene = msd.sample_scene(rng)
        other = bvt.twin(scene, rng)
        changed = [k for k in scene.objects if scene.objects[k] != other.objects[k]]
        assert len(changed) == 1
        k = changed[0]
        assert msd.key_facts(scene, k) != msd.key_facts(other, k)  # a fact alt-text states, not just positions
        assert msd.draw_scene(scene).tobytes() != msd.draw_scene(other).tobytes()


def test_tokenizer_ends_with_the_token_clip_pools_at():
    tok = bvt.build_tokenizer(64)
    ids = tok("A red round sign that says OPEN.")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a", "red", "round", "sign", "that", "says", "open", ".",
                                              "<|endoftext|>"]
    assert tok.eos_token_id != 2  # CLIP's legacy rule would pool at the largest id instead
    for t in bvt.msd.GROUP_TEMPLATES + bvt.msd.CHART_TEMPLATES + bvt.msd.SIGN_TEMPLATES:  # no unknown word in a caption
        scene = bvt.msd.sample_scene(random.Random(len(t)))
        assert tok.unk_token_id not in tok(bvt.msd.caption(scene, random.Random(0)))["input_ids"]


def test_shipped_tower_tells_an_image_from_its_twin():
    """The committed weights have learned the facts: on fresh scenes, each image's own caption
    scores above the caption of its one-fact twin far more often than chance (50%)."""
    from transformers import CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(SHIPPED).eval()
    tok = bvt.build_tokenizer(model.config.text_config.max_position_embeddings)
    ip = CLIPImageProcessorPil.from_pretrained(SHIPPED)
    beats_twin, _ = bvt.twin_accuracy(model, *bvt.batch(random.Random("test"), 32, ip, tok, 112))
    assert beats_twin >= 0.8


def test_composed_model_loads_in_plain_transformers(tmp_path):
    """compose(language model, shipped tower) -> save -> AutoModelForImageTextToText, tower weights intact."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPVisionModel

    from llava.model.load import compose, save_model
    from llava.model.tiny import write

    lm = write(tmp_path / "lm", arch="llama", size="tiny")
    model, processor = compose(lm, SHIPPED)
    save_model(model, processor, tmp_path / "llava")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava").eval()
    proc = AutoProcessor.from_pretrained(tmp_path / "llava")
    tower = CLIPVisionModel.from_pretrained(SHIPPED)
    composed = loaded.model.vision_tower.state_dict()
    assert set(composed) == set(tower.state_dict())
    for name, w in tower.state_dict().items():
        assert torch.equal(composed[name], w), name
    image = Image.new("RGB", (112, 112), (220, 40, 40))
    inputs = proc(images=image, text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == 112
    assert (inputs["input_ids"] == loaded.config.image_token_id).sum() == 64  # (112 / 14) ** 2 patches
    with torch.no_grad():
        out = loaded(**inputs)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1]


def _probe_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    import probe_tower

    return probe_tower


def test_ridge_probe_against_a_naive_fit():
    """The dual-form ridge classifier equals the primal solution (X'X + aI)^-1 X'Y, computed directly."""
    pt = _probe_module()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    labels = ["a" if v > 0.3 else ("b" if v > -0.3 else "c") for v in x[:, 0].tolist()]
    x_test = torch.randn(12, 8, generator=g, dtype=torch.float64)
    y_test = ["a" if v > 0.3 else ("b" if v > -0.3 else "c") for v in x_test[:, 0].tolist()]
    onehot = torch.tensor([[float(lab == c) for c in "abc"] for lab in labels], dtype=torch.float64)
    w = torch.linalg.solve(x.T @ x + 0.5 * torch.eye(8, dtype=torch.float64), x.T @ onehot)
    naive = sum("abc"[i] == y for i, y in zip((x_test @ w).argmax(1).tolist(), y_test)) / len(y_test)
    assert pt.ridge_accuracy(x, labels, x_test, y_test, alpha=0.5) == pytest.approx(naive)


def test_probe_facts_name_every_visual_fact():
    pt = _probe_module()
    msd = bvt.msd
    scene = msd.sample_scene(random.Random(3))
    facts = pt.facts(scene)
    for name, obj in scene.objects.items():
        if isinstance(obj, msd.Group):
            assert facts[f"{name}.count"] == str(obj.count) and facts[f"{name}.shape"] == obj.shape
    assert len(facts) in (4, 5, 6)  # a chart has 2 facts, a sign 2, a group 3
