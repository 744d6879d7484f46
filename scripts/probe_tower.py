"""Does a CLIP vision tower's output carry the sample scenes' visual facts? A linear probe per fact.

    python scripts/probe_tower.py llava/model/assets/sample_clip [--n_train 2000] [--layer -2]

The features are what LLaVA feeds its projector: the patch tokens (no CLS) of hidden layer
``--layer`` (LLaVA's ``mm_vision_select_layer``, -2). For every fact of every thing of the scenes
(a group's colour, count and shape, the bar count, the tallest bar, a sign's colour and shape),
a ridge classifier on the flattened patch features is fitted on the scenes of the stage-1 split
(``make_sample_data.build_split("pretrain", n_train, seed)``) and scored on the 200 scenes of the
test split. High accuracy here and few key facts in the SFT model's answers means the
information is lost after the tower (projector, language model, training), not in it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from build_vision_tower import msd  # noqa: E402  (make_sample_data, loaded once)


def facts(scene) -> dict[str, str]:
    """Every visual fact of ``scene``, named by thing and attribute (``left.count`` -> ``"3"``)."""
    out = {}
    for name, obj in scene.objects.items():
        if isinstance(obj, msd.Group):
            out.update({f"{name}.colour": obj.colour, f"{name}.count": str(obj.count), f"{name}.shape": obj.shape})
        elif isinstance(obj, msd.Chart):
            out.update({"chart.bars": str(obj.n), "chart.tallest": obj.tallest})
        else:
            out.update({"sign.colour": obj.colour, "sign.shape": obj.shape})
    return out


@torch.no_grad()
def patch_features(tower, image_processor, scenes, layer: int, image_size: int) -> torch.Tensor:
    rows = []
    for i in range(0, len(scenes), 100):
        images = [msd.draw_scene(s, image_size) for s in scenes[i:i + 100]]
        pixels = image_processor(images, return_tensors="pt")["pixel_values"]
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        rows.append(hidden[:, 1:].flatten(1))  # LLaVA's "patch" feature strategy drops CLS
    return torch.cat(rows).double()


def ridge_accuracy(x_train, y_train: list[str], x_test, y_test: list[str], alpha: float = 1.0) -> float:
    """Accuracy on the test rows of a one-vs-rest ridge classifier (dual form: rows << features)."""
    classes = sorted(set(y_train))
    index = {c: i for i, c in enumerate(classes)}
    targets = torch.zeros(len(y_train), len(classes), dtype=x_train.dtype)
    targets[torch.arange(len(y_train)), torch.tensor([index[c] for c in y_train])] = 1.0
    gram = x_train @ x_train.T + alpha * torch.eye(len(x_train), dtype=x_train.dtype)
    weights = x_train.T @ torch.linalg.solve(gram, targets)
    predicted = (x_test @ weights).argmax(1).tolist()
    return sum(classes[p] == y for p, y in zip(predicted, y_test)) / len(y_test)


def probe(tower_dir: str | Path, n_train: int = 2000, layer: int = -2, seed: int = 0) -> dict[str, tuple[float, int]]:
    """``{fact: (test accuracy, test scenes)}`` of a linear probe per fact."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(tower_dir).eval()
    image_processor = CLIPImageProcessorPil.from_pretrained(tower_dir)
    size = tower.config.image_size
    train = [e.scene for e in msd.build_split("pretrain", n_train, seed, size)[0]]
    test = [e.scene for e in msd.build_split("test", 200, seed, size)[0]]
    x_train = patch_features(tower, image_processor, train, layer, size)
    x_test = patch_features(tower, image_processor, test, layer, size)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    f_train, f_test = [facts(s) for s in train], [facts(s) for s in test]
    out = {}
    for fact in sorted({k for f in f_train for k in f}):
        tr = [i for i, f in enumerate(f_train) if fact in f]
        te = [i for i, f in enumerate(f_test) if fact in f]
        if not te:
            continue
        acc = ridge_accuracy(x_train[tr], [f_train[i][fact] for i in tr], x_test[te], [f_test[i][fact] for i in te])
        out[fact] = (acc, len(te))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("tower", help="a CLIPModel or CLIPVisionModel directory")
    p.add_argument("--n_train", type=int, default=2000, help="stage-1 scenes the probes are fitted on")
    p.add_argument("--layer", type=int, default=-2, help="hidden layer (LLaVA's mm_vision_select_layer)")
    p.add_argument("--seed", type=int, default=0, help="the sample data's seed")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    print("| fact | test accuracy (%) | test scenes |\n|---|---:|---:|")
    for fact, (acc, n) in probe(a.tower, a.n_train, a.layer, a.seed).items():
        print(f"| {fact} | {100 * acc:.1f} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
