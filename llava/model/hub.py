"""Hugging Face Hub names wherever a model, tower, adapter or dataset path is taken.

A name that is an existing local path is used as it is, exactly as before. Otherwise a name of the
form ``org/name`` is a hub repository, resolved by ``huggingface_hub`` itself, so that its cache
(``HF_HOME``, ``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE=1``: the cache only) and tokens
(``HF_TOKEN``, ``hf auth login``) behave as everywhere else:

* models and vision towers: ``snapshot_download`` gives the local snapshot directory
  (``<cache>/models--org--name/snapshots/<commit>/``), which the loaders then read as any directory;
* a projector file (``--pretrain_mm_mlp_adapter``): ``org/name`` is that repository's
  ``mm_projector.bin`` (what LLaVA's pre-training repositories hold), ``org/name/FILE`` names the file;
* datasets: ``org/name``, ``org/name:split`` or ``org/name:config:split``; the repository snapshot
  (``datasets--org--name``) is passed to ``datasets.load_dataset``. Going through the snapshot rather
  than ``load_dataset("org/name")`` is what makes the hub cache usable offline: datasets 5.2 refuses a
  hub name outright in offline mode unless it has already prepared that dataset in its own arrow cache.

A hub name that cannot be resolved raises ``HubError``: one line naming it and saying why (not in the
cache while offline, no such repository, no such revision).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# org/name as the hub spells repository ids (letters, digits, "-", "_", "."); no leading "." or "/".
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*")
# Weights of other frameworks: never read here, often several GB each (openai/clip-* ship TF and Flax copies).
OTHER_FRAMEWORK_FILES = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "onnx/*", "*.mlmodel", "*.mlpackage/*",
                         "coreml/*", "openvino/*", "*.gguf"]
PROJECTOR_FILE = "mm_projector.bin"


class HubError(ValueError):
    """A hub name that cannot be resolved: the message names it, ``reason`` says why."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def is_repo_id(name: str | Path) -> bool:
    return bool(_REPO_ID.fullmatch(str(name)))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _why(exc: Exception, repo_id: str, repo_type: str, revision: str | None) -> str:
    """The reason a look-up failed, in one line."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f" at revision {revision!r}" if revision else ""
    if isinstance(exc, LocalEntryNotFoundError):
        mode = "HF_HUB_OFFLINE is set" if _offline() else "the hub could not be reached"
        return f"not in the Hugging Face cache {constants.HF_HUB_CACHE}{at} and {mode}"
    if isinstance(exc, GatedRepoError):
        return f"a gated {repo_type} repository: log in (hf auth login or HF_TOKEN) with an account that has access"
    if isinstance(exc, RepositoryNotFoundError):
        return f"no {repo_type} repository of that name on the hub (or it is private: log in or set HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return f"the repository has no revision {revision!r}"
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"no such file in the repository{at}"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def snapshot(repo_id: str, *, repo_type: str = "model", revision: str | None = None, what: str = "model",
             allow_patterns: list[str] | None = None) -> Path:
    """The local snapshot directory of a hub repository (downloaded when missing and online)."""
    from huggingface_hub import snapshot_download

    try:
        found = snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns,
                                  ignore_patterns=OTHER_FRAMEWORK_FILES)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the repository
        why = _why(e, repo_id, repo_type, revision)
        raise HubError(f"{what} {repo_id!r}: not a local path, and {why}", why) from e
    return Path(found)


def local_dir(name_or_path: str | Path, revision: str | None = None, *, what: str = "model",
              allow_patterns: list[str] | None = None) -> Path:
    """``name_or_path`` itself when it exists locally (or cannot be a hub name), else its hub snapshot."""
    path = Path(name_or_path).expanduser()
    if path.exists() or not is_repo_id(name_or_path):
        return path
    return snapshot(str(name_or_path), revision=revision, what=what, allow_patterns=allow_patterns)


def local_file(name_or_path: str | Path, revision: str | None = None, *, default_file: str = PROJECTOR_FILE,
               what: str = "file") -> Path:
    """A local file, or a hub file: ``org/name`` (its ``default_file``) or ``org/name/path/in/repo``."""
    from huggingface_hub import hf_hub_download

    path = Path(name_or_path).expanduser()
    text = str(name_or_path)
    parts = text.split("/")
    if path.exists() or len(parts) < 2 or not is_repo_id("/".join(parts[:2])):
        return path
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or default_file
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as e:  # noqa: BLE001
        raise HubError(f"{what} {text!r}: not a local path, and hub file {filename!r} of {repo_id!r}: "
                       f"{_why(e, repo_id, 'model', revision)}") from e


def repo_of_snapshot(path: str | Path) -> tuple[str, str] | None:
    """``(repo_id, commit)`` of a directory inside the hub cache (``models--org--name/snapshots/<commit>``)."""
    parts = Path(path).parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            return parts[i][len("models--"):].replace("--", "/", 1), parts[i + 2]
    return None


# ---------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True)
class HubDataset:
    """``org/name[:config][:split]`` with the split to read (a lone dataset split when none is named)."""

    repo_id: str
    config: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        return ":".join(p for p in (self.repo_id, self.config, self.split) if p)


def hub_dataset(spec: str | Path, split: str | None = None) -> HubDataset | None:
    """The hub dataset ``spec`` names, or ``None`` when it is a local path (or cannot be a hub name)."""
    text = str(spec)
    if Path(text).expanduser().exists():
        return None
    parts = text.split(":")
    if not is_repo_id(parts[0]) or len(parts) > 3 or not all(parts):
        return None
    config = parts[1] if len(parts) == 3 else None
    named = parts[-1] if len(parts) > 1 else None
    if named and split and named != split:
        raise HubError(f"dataset {text!r} names split {named!r} but --split says {split!r}")
    return HubDataset(parts[0], config, named or split)


def with_split(spec: str, split: str | None) -> str:
    """``spec`` with ``split`` added when it is a hub dataset name without one (local paths unchanged)."""
    found = hub_dataset(spec, split)
    return str(found) if found is not None else spec


def load_hub_dataset(ds: HubDataset, revision: str | None = None):
    """The ``datasets.Dataset`` of ``ds``'s split, read with ``datasets.load_dataset`` from the hub snapshot."""
    import datasets

    local = snapshot(ds.repo_id, repo_type="dataset", revision=revision, what="dataset")
    try:
        loaded = datasets.load_dataset(str(local), name=ds.config, split=ds.split)
    except ValueError as e:  # an unknown split or config
        why = str(e).strip().splitlines()[0]
        raise HubError(f"dataset {str(ds)!r}: {why}", why) from e
    if isinstance(loaded, datasets.DatasetDict):  # no split named: the only one, or train
        if len(loaded) != 1 and "train" not in loaded:
            why = f"has splits {sorted(loaded)}: name one ({ds.repo_id}:SPLIT or --split)"
            raise HubError(f"dataset {str(ds)!r} {why}", why)
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded


def dataset_fingerprint(spec: str | Path) -> str:
    """What identifies a training data source in a cache key: a file's content hash, or a hub split's fingerprint."""
    found = hub_dataset(spec)
    if found is None:
        from llava.fingerprint import file_fingerprint

        return file_fingerprint(spec)
    return f"{found}@{load_hub_dataset(found)._fingerprint}"
