"""How a training process that fails says so: one line on stderr, the traceback in a log file.

Under a launcher (``deepspeed``, ``torchrun``) every rank is a process of its own. A rank that
fails exits non-zero at once, and the launcher then stops the others, which may be waiting for it
in a collective: the run ends within seconds instead of hanging until the collective's timeout
(``--ddp_timeout``, the bound where no launcher watches the ranks, e.g. one per node).
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

from llava.train.checkpoints import SaveError
from llava.train.nonfinite import NonFiniteStep

# Input the user can fix (flags, data, paths, a resume point, a step that turned NaN, a full disk): the
# message is the whole story. Anything else is a fault of the program, whose line points at the traceback.
EXPECTED = (ValueError, FileNotFoundError, FileExistsError, NonFiniteStep, SaveError)
# torch's DataLoader re-raises a worker's exception with the worker's traceback as its message
WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def rank() -> int:
    """This process's rank, as every launcher sets it (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def message_of(error: BaseException) -> str:
    """The error's own message; for an error re-raised from a DataLoader worker, the original's."""
    text = str(error).strip()
    if WORKER_TRACEBACK in text:
        last = text.splitlines()[-1]  # "llava.data.records.DataError: data.json, record 3, field 'image': ..."
        name, _, rest = last.partition(": ")
        text = rest if name.rsplit(".", 1)[-1] == type(error).__name__ else last
    return text


def write_traceback(error: BaseException, output_dir: str | Path | None, create: bool) -> Path | None:
    """``OUTPUT_DIR/error-rank{N}.log`` with the traceback, or None where there is no directory to hold it.

    ``create``: make the output directory if it is not there (not for an input error met before the run
    began, which must leave no directory behind)."""
    if not output_dir:
        return None
    folder = Path(output_dir)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            return None
        path = folder / f"error-rank{rank()}.log"
        path.write_text("".join(traceback.format_exception(error)))
        return path
    except OSError:  # a full or read-only disk: the line on stderr still goes out
        return None


def error_line(error: BaseException, log: Path | None) -> str:
    """The one line for stderr."""
    if isinstance(error, EXPECTED):
        return f"error: {message_of(error)}"
    where = f" (traceback in {log})" if log else ""
    first = (message_of(error).splitlines() or [""])[0]
    return f"error: {type(error).__name__}: {first}{where}"


def exit_code(error: BaseException) -> int:
    return 2 if isinstance(error, EXPECTED) else 1
