"""Shared fixtures: tiny checkpoints built once per test session (no downloads)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
