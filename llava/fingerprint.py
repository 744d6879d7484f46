"""Fingerprints: what identifies a run's inputs (data files, checkpoints, images, processors).

The reference cache's key, a training run's identity and an inference output's identity are built
from these (``llava.train.train.reference_key``, ``run_identity``; ``llava.eval.inference``). A
checkpoint's fingerprint covers every byte of its files; their digests are remembered by path, size
and mtime in the user's cache folder, so a rerun does not reread 14 GB.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from llava.fileio import write_atomic

CACHE_ENV = "LLAVA_MCMDPO_CACHE_DIR"


def cache_folder() -> Path:
    """The toolkit's cache folder: ``$LLAVA_MCMDPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/llava-mcmdpo`` (``~/.cache``)."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-mcmdpo"
    return Path(folder)


def file_fingerprint(path: str | Path) -> str:
    """Content hash of a data file, or of a directory's files (names, sizes and contents)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def model_fingerprint(path: str | Path) -> str:
    """Hash of a checkpoint's config, tokenizer and weights: every byte of each file (``file_digest``)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(path.glob("*.json")) + sorted(path.glob("*.model")) + sorted(path.glob("*.safetensors")) \
        + sorted(path.glob("*.bin"))
    digests = FileDigests.load()
    for f in files:
        h.update(f"{f.name}\0{digests.of(f)}\n".encode())
    digests.save()
    return h.hexdigest()


DIGESTS_NAME = "file-digests.json"
MAX_DIGESTS = 10_000


class FileDigests:
    """Full SHA-256 digests of files, remembered by (real path, size, mtime): a rerun does not reread 14 GB.

    A file rewritten in place gets a new mtime, hence a new digest; kept beside the cache of verified
    images (``cache_folder``, ``$LLAVA_MCMDPO_CACHE_DIR``).
    """

    def __init__(self, path: Path, known: dict):
        self.path, self.known, self.changed = path, known, False

    @classmethod
    def load(cls) -> "FileDigests":
        path = cache_folder() / DIGESTS_NAME
        try:
            known = json.loads(path.read_text())
            known = known if isinstance(known, dict) else {}
        except (OSError, ValueError):
            known = {}
        return cls(path, known)

    def of(self, file: Path) -> str:
        real, st = os.path.realpath(file), os.stat(file)
        stamp = [st.st_size, st.st_mtime_ns]
        entry = self.known.get(real)
        if isinstance(entry, list) and entry[:2] == stamp:
            return entry[2]
        h = hashlib.sha256()
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        self.known.pop(real, None)
        self.known[real] = [*stamp, h.hexdigest()]
        self.changed = True
        return h.hexdigest()

    def save(self) -> None:
        if not self.changed:
            return
        known = dict(list(self.known.items())[-MAX_DIGESTS:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(known))
        except OSError:  # a read-only cache only costs rereading next time
            pass


def images_fingerprint(paths) -> str:
    """Hash of image files' names, sizes and modification times (a stat each: cheap for thousands of files)."""
    h = hashlib.sha256()
    for path in sorted({str(p) for p in paths}):
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def processor_fingerprint(processor) -> str:
    """Hash of what the processor saves: tokenizer (vocabulary, merges, added tokens, settings) and image processor."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        for f in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            h.update(str(f.relative_to(tmp)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()
