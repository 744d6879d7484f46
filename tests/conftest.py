"""Shared fixtures: tiny checkpoints built once per test session (no downloads)."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# The authors' published samples live in the repository's sibling shared/ (MCMDPO_SHARED_DIR points
# elsewhere, e.g. from a git worktree); tests that read them skip, saying so, where they are absent.
SHARED = Path(os.environ.get("MCMDPO_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")
SEED_DATA = SHARED / "seed-data"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed builds a C++ op on first launch into torch's extensions cache; the suite builds its own
# so that a lock abandoned in the user's cache by an interrupted build cannot stall the launches.
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    _EXTENSIONS_DIR = os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="llava-test-torch-ext-")


# The cache of verified images (llava.data.verify) goes to a folder of the session, not the user's ~/.cache.
if "LLAVA_MCMDPO_CACHE_DIR" not in os.environ:
    _IMAGE_CACHE_DIR = os.environ["LLAVA_MCMDPO_CACHE_DIR"] = tempfile.mkdtemp(prefix="llava-test-image-cache-")


def import_from(folder: Path, name: str):
    """Module ``name`` from a folder of scripts (benchmarks/, scripts/), the folder not left on ``sys.path``."""
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


def pytest_sessionfinish(session, exitstatus):
    if "_EXTENSIONS_DIR" in globals():
        shutil.rmtree(_EXTENSIONS_DIR, ignore_errors=True)
    if "_IMAGE_CACHE_DIR" in globals():
        shutil.rmtree(_IMAGE_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """An HF-format tiny LLaVA-1.5 directory (random weights, seed 0)."""
    from llava.model.tiny import write

    return write(tmp_path_factory.mktemp("tiny_llava"), arch="llava", seed=0)


@pytest.fixture(scope="session")
def tiny_next_dir(tmp_path_factory):
    """An HF-format tiny LLaVA-NeXT directory (random weights, seed 0)."""
    from llava.model.tiny import write

    return write(tmp_path_factory.mktemp("tiny_next"), arch="llava_next", seed=0)


WORDS = ("red blue green small large circle square chart sign poster shows with a the of and near left right "
         "three two one bright dark photo screenshot text bars values people tree house sky").split()


def write_preference_set(folder, n: int = 6, seed: int = 0, name: str = "preference.json"):
    """``n`` preference records (format A, ``text`` as a JSON string) with drawn images of varied sizes.

    Texts vary in length so batches need padding; chosen and rejected differ.
    """
    import json
    import random
    from pathlib import Path

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        w, h = rng.choice([(64, 48), (40, 72), (56, 56), (90, 30)])
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        ImageDraw.Draw(img).rectangle([w // 4, h // 4, w // 2, h // 2], fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(folder / "images" / f"img_{i}.png")
        words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        question = "Given an image and context, generate alt-text for the image.\nContext:\n" + words(rng.randint(3, 25))
        chosen, rejected = words(rng.randint(2, 12)), words(rng.randint(2, 12))
        if chosen == rejected:
            rejected += " again"
        records.append({"ds_name": "test", "image": {"path": f"images/img_{i}.png"}, "image_path": f"images/img_{i}.png",
                        "idx": i, "text": json.dumps({"question": question, "chosen": chosen, "rejected": rejected})})
    path = folder / name
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture(scope="session")
def preference_file(tmp_path_factory):
    """Six small preference records with images under ``<dir>/images`` (image folder = the file's directory)."""
    return write_preference_set(tmp_path_factory.mktemp("prefdata"))
