"""What a DeepSpeed launch leaves on its host, dealt with: stale build locks and shared-memory buffers.

* DeepSpeed JIT-builds a C++ op when it first starts, and torch guards each build with a lock file.
  A build killed midway (Ctrl-C, a job limit) leaves the lock behind, and every later launch then
  waits on it without a word: ``refuse_abandoned_build_locks`` stops with the lock's path instead.
* On a host without CUDA that build (the shared-memory all-reduce op) takes a minute or two in silence:
  ``cpu_op_build_note`` says so first. torch's build directory is shared by every Python environment of
  the user, and the build names the sources' paths, so another environment's build is rebuilt too.
* On CPU, DeepSpeed's shared-memory all-reduce (``deepspeed_shm_comm``) gives each rank a 67 MB
  file in ``/dev/shm`` that no code ever unlinks, so every launch, finished or killed, leaves
  2 x 67 MB of RAM behind until the machine reboots (a test suite of DeepSpeed launches used up
  gigabytes this way). ``release_shared_memory_names`` unlinks each rank's name once every rank
  has mapped every other's: the mappings stay valid, and the kernel frees the memory when the
  processes exit, however they exit.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import torch.distributed as dist

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


SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU all-reduce, built on the first launch without CUDA


def cpu_op_builds() -> list[Path]:
    """The build directories of DeepSpeed's CPU op that torch may use (``TORCH_EXTENSIONS_DIR`` or its default)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return sorted(itertools.chain(root.glob(SHM_OP), root.glob(f"*/{SHM_OP}")))


def cpu_op_is_built() -> bool:
    """Is DeepSpeed's CPU op built from this installation's sources (so that loading it compiles nothing)?"""
    import deepspeed

    sources = str(Path(deepspeed.__file__).parent)
    for build in cpu_op_builds():
        ninja = build / "build.ninja"
        if (build / f"{SHM_OP}.so").is_file() and ninja.is_file() and sources in ninja.read_text(errors="replace"):
            return True
    return False


def cpu_op_build_note() -> str | None:
    """The line to say before DeepSpeed compiles its CPU op (no CUDA, not built yet), or ``None``."""
    import torch

    if torch.cuda.is_available() or cpu_op_is_built():
        return None
    return ("building DeepSpeed's CPU op once, about a minute (cached under TORCH_EXTENSIONS_DIR or "
            "~/.cache/torch_extensions; `make setup` builds it ahead)")


def build_cpu_op() -> None:
    """Build DeepSpeed's CPU op now (``make setup``), unless CUDA is present or it is built already."""
    import time

    import torch

    if torch.cuda.is_available() or cpu_op_is_built():
        return
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    print("setup: building DeepSpeed's CPU op once, about a minute (DeepSpeed would do it, silently, on the first launch)",
          flush=True)
    start = time.time()
    ShareMemCommBuilder().load(verbose=False)
    print(f"setup: DeepSpeed's CPU op built in {time.time() - start:.0f} s", flush=True)


def shared_memory_buffer(rank: int, env=os.environ) -> Path:
    """The ``/dev/shm`` file DeepSpeed's CPU all-reduce creates for ``rank`` (named as ``shm.cpp`` names it)."""
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR')}_{env.get('MASTER_PORT')}_{rank}")


def release_shared_memory_names() -> None:
    """Unlink this rank's DeepSpeed shared-memory buffer name, after every rank has opened every other's.

    Call it on every rank once ``deepspeed.init_distributed()`` has returned (the buffers are made
    and mapped there). The barrier makes sure no rank is still looking the names up.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    shared_memory_buffer(dist.get_rank()).unlink(missing_ok=True)


if __name__ == "__main__":  # make setup
    build_cpu_op()
