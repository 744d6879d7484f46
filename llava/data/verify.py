"""Every image a run will read, opened before step 1: in parallel, remembered in a cache of verified files.

Training (SFT, DPO, MCM-DPO: ``llava.train.train.verified_records``, before the model loads) and inference (``llava.eval.inference``)
pass their records through :func:`verify_images_everywhere` before the first step or the first
generated token. Each record's image path must stay inside the image folder
(``llava.data.images.outside_image_folder``; ``--allow_outside_image_folder`` lifts this), and the
image must pass PIL's ``verify()`` and a full decode (``llava.data.images.check_image_readable``, the
same check ``llava-check`` makes). The other images a preference record reads are records of the same
dataset: the swapped context's partner and the ``random`` negative's image are drawn among the records
kept, so they are verified too, and a record left out by ``--skip_bad_records`` is never anyone's
partner.

The cache: a file that passed is remembered by its real path (symbolic links resolved), size and
modification time (ns), in one JSON file per user, ``$LLAVA_MCMDPO_CACHE_DIR/verified-images.json``,
else ``$XDG_CACHE_HOME/llava-mcmdpo/verified-images.json`` (``~/.cache`` when unset). Per user rather
than per output directory because SFT, DPO, MCM-DPO and inference read the same images into
different output directories: every run after the first finds them verified, not only a rerun of
the same command. A file changed since (another size or modification time) is verified again; files
that failed are not remembered (a fixed file is picked up); image bytes inside a data file have no
stat and are always decoded. The file is written whole (``llava.fileio.write_atomic``) by one process
of a run; it only saves time, so an unreadable or unwritable cache is a warning, never an error.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from llava.fingerprint import cache_folder
from llava.data.images import check_image_readable, image_path, outside_image_folder, record_image_field
from llava.data.records import DataProblem, Record
from llava.fileio import iter_jsonl, write_atomic

logger = logging.getLogger("llava.data")

WORKERS = min(8, os.cpu_count() or 1)  # PIL decodes with the GIL released: threads overlap the checks
CACHE_NAME = "verified-images.json"
CACHE_VERSION = 1
MAX_CACHED = 500_000  # tens of MB of JSON at most; the files verified longest ago are forgotten first
SKIPPED_RECORDS = "skipped_records.jsonl"  # in a training run's --output_dir
OUTSIDE_HINT = "pass --allow_outside_image_folder to read it anyway"


def default_cache_path() -> Path:
    return cache_folder() / CACHE_NAME


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns]


class VerifiedImages:
    """Files known to open and decode: ``{real path: [size, mtime_ns]}``; ``added`` holds this run's."""

    def __init__(self, path: Path | None = None, files: dict[str, list[int]] | None = None):
        self.path = path
        self.files = dict(files or {})
        self.added: dict[str, list[int]] = {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> VerifiedImages:
        path = Path(path) if path is not None else default_cache_path()
        return cls(path, _read_cache(path))

    def knows(self, real: str, stamp: list[int]) -> bool:
        return self.files.get(real) == stamp

    def add(self, real: str, stamp: list[int]) -> None:
        self.files.pop(real, None)  # re-inserted last: the oldest entries are the first forgotten
        self.files[real] = self.added[real] = stamp

    def save(self) -> None:
        """Write the cache with this run's files added (to what is in the file now: a concurrent run's
        entries are kept, up to a lost update, which only means verifying those files again)."""
        if self.path is None or not self.added:
            return
        files = _read_cache(self.path, quiet=True)
        for real, stamp in self.added.items():
            files.pop(real, None)
            files[real] = stamp
        if len(files) > MAX_CACHED:
            files = dict(list(files.items())[-MAX_CACHED:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps({"version": CACHE_VERSION, "files": files}))
        except OSError as e:
            logger.warning("could not write the cache of verified images %s (%s): the next run verifies them again",
                           self.path, e.strerror or e)
        self.files, self.added = files, {}


def _read_cache(path: Path, quiet: bool = False) -> dict[str, list[int]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"] if data.get("version") == CACHE_VERSION else {}
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
        return files
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if not quiet:
            logger.warning("ignoring the unreadable cache of verified images %s (%s)", path, e)
        return {}


@dataclass
class ImageCheck:
    """What verifying a run's images found: the problems, how many files were opened (found on disk and
    decoded, well or not) or taken from the cache (unchanged since they were verified), and how many of the
    opened ones failed (unreadable)."""

    problems: list[DataProblem] = field(default_factory=list)
    opened: int = 0
    cached: int = 0
    unreadable: int = 0

    @property
    def images(self) -> int:
        """Images found and verified: a missing, refused or unreadable one is not counted."""
        return self.opened - self.unreadable + self.cached

    def summary(self, seconds: float) -> str:
        """One line for the log: what was verified, and what was not."""
        line = (f"{self.images} images verified in {seconds:.1f} s ({self.opened} opened, "
                f"{self.cached} unchanged since verified before)")
        if self.problems:
            line += f"; {len({(p.file, p.record) for p in self.problems})} records with a missing, unreadable or refused image"
        return line


def refused_path(record: Record, image_folder) -> DataProblem | None:
    """The problem of a record whose image path leads outside the image folder, or ``None``."""
    why = outside_image_folder(record.image.path, image_folder) if record.image and record.image.path else None
    if why is None:
        return None
    return DataProblem(record.source, record.number, record_image_field(record), f"{why}: {OUTSIDE_HINT}", record.line)


def verify_image(record: Record, image_folder, *, allow_outside: bool = False,
                 cache: VerifiedImages | None = None) -> tuple[DataProblem | None, bool]:
    """``(problem or None, opened)`` for the image of ``record``: refused outside the image folder (unless
    ``allow_outside``), else taken from ``cache`` when its file is unchanged, else opened (``opened``: the
    file exists, or the image is bytes), verified and decoded; a file that passes joins ``cache``."""
    if not allow_outside and (refused := refused_path(record, image_folder)) is not None:
        return refused, False
    path = image_path(record.image, image_folder)
    real = stamp = None
    if path is not None:
        try:
            real = os.path.realpath(path)
            stamp = _stamp(os.stat(real))
        except OSError:  # missing or unreachable: the open below words it
            real = None
        if real is not None and cache is not None and cache.knows(real, stamp):
            return None, False
    problem = check_image_readable(record, image_folder)
    if problem is None and real is not None and cache is not None:
        cache.add(real, stamp)
    return problem, path is None or real is not None


def verify_images(records: Sequence[Record], image_folder, workers: int = WORKERS, *, allow_outside: bool = False,
                  cache: VerifiedImages | None = None) -> ImageCheck:
    """Every problem with the images of ``records``, each naming its file, record and field.

    :func:`verify_image` for each distinct image path (every record sharing it named in its problem),
    in ``workers`` threads. Files that pass join ``cache``; saving it is the caller's choice.
    """
    check = ImageCheck()
    jobs: dict[object, list[Record]] = {}
    for r in records:
        if r.image is not None:  # a text-only conversation reads no image
            jobs.setdefault(r.image.path if r.image.path is not None else id(r), []).append(r)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        verdicts = pool.map(lambda rs: verify_image(rs[0], image_folder, allow_outside=allow_outside, cache=cache),
                            jobs.values())
        for sharing, (problem, opened) in zip(jobs.values(), verdicts):
            if opened:
                check.opened += 1
                check.unreadable += problem is not None
            elif problem is None:
                check.cached += 1
            if problem is not None:
                check.problems += [replace(problem, file=r.source, record=r.number, line=r.line,
                                           field=record_image_field(r)) for r in sharing]
    check.problems = in_record_order(check.problems, records)
    return check


def in_record_order(problems: Iterable[DataProblem], records: Sequence[Record]) -> list[DataProblem]:
    """``problems`` in the order of the records they name (whole-file problems first)."""
    order = {(r.source, r.number): i for i, r in enumerate(records)}
    return sorted(problems, key=lambda p: order.get((p.file, p.record), -1))


def verify_images_everywhere(records: Sequence[Record], image_folder, *, allow_outside: bool = False,
                             workers: int = WORKERS, cache_path: str | Path | None = None) -> ImageCheck:
    """:func:`verify_images` with the per-user cache, shared by the processes of a ``torch.distributed`` job.

    Each process verifies every world-size-th record and every process gets the whole verdict (so each
    stops, or leaves out the same records); the first process writes the cache. Collective: every
    process of the job must call it.
    """
    import torch.distributed as dist

    cache = VerifiedImages.load(cache_path)
    sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    mine = verify_images(list(records)[rank::world], image_folder, workers, allow_outside=allow_outside, cache=cache)
    if not sharded:
        cache.save()
        return mine
    parts: list = [None] * world
    dist.all_gather_object(parts, (mine, cache.added))
    if rank == 0:
        for _, added in parts[1:]:
            for real, stamp in added.items():
                cache.add(real, stamp)
        cache.save()
    dist.barrier()  # the cache is written when any process returns (its next verification reads it)
    problems = in_record_order((p for check, _ in parts for p in check.problems), records)
    return ImageCheck(problems, sum(c.opened for c, _ in parts), sum(c.cached for c, _ in parts),
                      sum(c.unreadable for c, _ in parts))


# ---------------------------------------------------------------------------------------------
# --skip_bad_records


def bad_records(problems: Iterable[DataProblem]) -> set[tuple[str, int]]:
    """``(file, record number)`` of every record a problem names (whole-file problems name none)."""
    return {(p.file, p.record) for p in problems if p.record is not None}


def leave_out(records: Sequence[Record], problems: Iterable[DataProblem]) -> list[Record]:
    """``records`` without those ``problems`` name, in their order."""
    bad = bad_records(problems)
    return [r for r in records if (r.source, r.number) not in bad]


def skipped_line(problem: DataProblem) -> dict:
    return {"file": problem.file, "record": problem.record, "line": problem.line, "field": problem.field,
            "reason": problem.message}


def write_skipped_records(path: str | Path, problems: Sequence[DataProblem], *, replacing: str | Path | None = None) -> None:
    """The records left out, one JSON line per problem (file, record, line, field, reason), at ``path``.

    ``replacing`` a data file: the lines ``path`` holds for other data files stay (a run's held-out
    data are verified after its training data) and those of this file are replaced; else the list
    starts afresh (a former run's lines go). An empty list leaves no file.
    """
    path = Path(path)
    kept = []
    if replacing is not None and path.is_file():
        kept = [ln.value for ln in iter_jsonl(path.read_bytes()) if ln.is_object and ln.value.get("file") != str(replacing)]
    rows = kept + [skipped_line(p) for p in problems]
    if not rows:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
