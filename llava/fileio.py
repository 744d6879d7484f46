"""Reading JSON Lines and writing files atomically: the one way each is done in this package.

``iter_jsonl`` is the line reader behind every JSON Lines input (training and test records,
inference outputs, scored files); each caller words its own messages from the ``JsonLine``s it gets,
naming the file and the 1-based line. ``write_atomic`` is the one writer of files that a reader may
see while they are written, or that a killed run must never leave half-written; ``sync_tree`` and
``remove_stale_temporaries`` serve the directories written whole (checkpoints) and the leftovers of a
write killed before its rename.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator


@dataclass(frozen=True)
class JsonLine:
    """One non-blank line of a JSON Lines file.

    ``value`` is the parsed JSON value (any type: callers that need an object check it); ``problem``
    says why the line could not be parsed (``value`` is then None).
    """

    number: int  # 1-based line number in the file
    raw: bytes  # the line as stored, without its newline
    value: Any = None
    problem: str | None = None

    @property
    def is_object(self) -> bool:
        return self.problem is None and isinstance(self.value, dict)


def iter_jsonl(data: bytes) -> Iterator[JsonLine]:
    """The non-blank lines of JSON Lines ``data``, parsed one by one.

    Lines end at ``\\n`` only: ``str.splitlines()`` would also break at U+2028, U+0085 and other
    separators that ``json.dumps(ensure_ascii=False)`` leaves raw inside strings. A ``\\r`` before the
    newline (CRLF files) and a byte-order mark opening a line are not data. A line that is not UTF-8
    or not JSON comes with its ``problem``; the lines after it are read as usual.
    """
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            # utf-8-sig: a byte-order mark (some editors and Windows tools write one) is not data.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            yield JsonLine(number, raw, problem=f"not UTF-8 ({e.reason})")
            continue
        if not text.strip():
            continue
        try:
            yield JsonLine(number, raw, json.loads(text))
        except json.JSONDecodeError as e:
            yield JsonLine(number, raw, problem=f"not valid JSON ({e.msg} at column {e.colno})")


def not_an_object(value: Any) -> str:
    """The reason a parsed line that is not a JSON object is skipped."""
    return f"not a JSON object (a {type(value).__name__})"


def write_atomic(path: str | Path, content: str | bytes | Iterable[bytes] | Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    ``content`` is text (written as UTF-8), bytes, an iterable of byte chunks, or a function that
    writes to the open binary file (``lambda f: torch.save(obj, f)``). It goes to a temporary file in
    the same folder (a rename across file systems is not atomic), synced to disk, then renamed over
    ``path``; the folder is synced too so the rename survives a crash. On any failure the temporary
    file is removed and ``path`` is as it was; an ``OSError`` (a full disk, a quota, a file size limit)
    names ``path``, not the temporary file. A process killed mid-write leaves only the temporary file
    (see ``remove_stale_temporaries``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _default_mode())  # mkstemp makes the file 0600; give it the mode open() would
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode("utf-8"))
            elif isinstance(content, (bytes, bytearray)):
                f.write(content)
            elif callable(content):
                content(f)
            else:
                for chunk in content:
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename != str(path):  # f.write's errors name no file at all
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    sync_folder(path.parent)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files ``write_atomic(path, ...)`` left when a process was killed mid-write.

    Only for a file one process writes at a time: another writer's temporary file would go too.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def sync_tree(folder: str | Path) -> None:
    """Flush every file under ``folder`` (and the folders themselves) to disk, before a rename publishes it."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sync_folder(Path(root))


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def sync_folder(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (best effort: not every platform can)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename itself is done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LockHeld(RuntimeError):
    """Another live process holds a ``RunLock``; the message names its host and PID."""


class RunLock:
    """An advisory lock (``flock``) on ``path`` so that two runs never write the same output at once.

    The holder writes ``host pid`` into the file; a second run is refused naming them. The operating
    system releases the lock when its process dies (even by SIGKILL), so a lock file left behind is
    stale: the next run takes it over and says so in one line (``log``). ``what``: the output, in
    words, for the messages. The file is removed on exit.
    """

    def __init__(self, path: str | Path, what: str, enabled: bool = True, log: Callable[[str], Any] | None = None):
        self.path, self.what, self.enabled, self.log = Path(path), what, enabled, log
        self.fd = None

    def holder(self) -> str:
        try:
            host, pid = self.path.read_text().split()[:2]
            return f"PID {pid} on {host}"
        except (OSError, ValueError):
            return "a process that has not written its host and PID yet"

    def __enter__(self):
        if not self.enabled:
            return self
        try:
            import fcntl
        except ImportError:  # not on Unix: no lock
            return self
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LockHeld(f"another run is writing {self.what}: {self.holder()} holds {self.path}; wait for it to "
                           "finish, or write elsewhere") from None
        self.fd = fd
        left = os.read(fd, 200).decode("utf-8", "replace").split()
        if len(left) >= 2 and self.log is not None:
            self.log(f"taking over the lock {self.path} left by PID {left[1]} on {left[0]}, which no longer runs")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        return False
