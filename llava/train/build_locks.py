"""A DeepSpeed launch's check for build locks left by a killed build, before it would wait on one forever.

DeepSpeed JIT-builds a C++ op when it first starts, and torch guards each build with a lock file.
A build killed midway (Ctrl-C, a job limit) leaves the lock behind, and every later launch then
waits on it without a word.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

DEFAULT_MAX_AGE_MINUTES = 10  # a real build of DeepSpeed's CPU ops takes a minute or two


def abandoned_build_locks(max_age_minutes: float) -> list[Path]:
    """Build locks in torch's extensions cache that are older than ``max_age_minutes``."""
    from torch.utils.cpp_extension import get_default_build_root

    # <root>/<op>/lock under TORCH_EXTENSIONS_DIR, <root>/<python>_<accelerator>/<op>/lock by default
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    cutoff = time.time() - 60 * max_age_minutes
    stale = []
    for path in itertools.chain(root.glob("*/lock"), root.glob("*/*/lock")):
        try:
            if path.stat().st_mtime < cutoff:
                stale.append(path)
        except FileNotFoundError:  # the build it guarded has just finished
            pass
    return sorted(stale)


def refuse_abandoned_build_locks() -> None:
    """Stop with one line naming the locks older than ``STALE_LOCK_MINUTES`` (default 10)."""
    minutes = float(os.environ.get("STALE_LOCK_MINUTES", DEFAULT_MAX_AGE_MINUTES))
    if stale := abandoned_build_locks(minutes):
        raise FileExistsError(f"a torch extension build lock older than {minutes:g} minutes, left by a killed build: "
                              f"{', '.join(map(str, stale))}. DeepSpeed would wait on it forever; "
                              "if no build is running, delete it and rerun (STALE_LOCK_MINUTES sets the age)")
