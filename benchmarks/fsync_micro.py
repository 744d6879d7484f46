"""Seconds per fsync of a small appended line, on a quiet disk and while a large file's writes are
still unsynced (as after a checkpoint save): what syncing an inference output file at every batch
would cost (llava/eval/output_file.py syncs every SYNC_EVERY_S seconds instead).

    python benchmarks/fsync_micro.py [--dir DIR] [--dirty_gb 3] [--fsyncs 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def fsync_seconds(path: Path, count: int) -> list[float]:
    """Seconds of each of ``count`` fsyncs, each after appending one output-sized line to ``path``."""
    times = []
    with open(path, "ab", buffering=0) as f:
        for i in range(count):
            f.write(b'{"idx": %d, "response": "A drawing of two blue squares at the bottom."}\n' % i)
            t0 = time.perf_counter()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - t0)
    return times


def write_unsynced(path: Path, gigabytes: float) -> float:
    """Write ``gigabytes`` to ``path`` without syncing; the seconds it took."""
    block = os.urandom(1 << 24)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(int(gigabytes * 1024 / 16)):
            f.write(block)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="a directory on the disk to measure (default: the temp dir)")
    ap.add_argument("--dirty_gb", type=float, default=3.0)
    ap.add_argument("--fsyncs", type=int, default=8)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        out, big = Path(d) / "out.jsonl", Path(d) / "checkpoint.bin"
        quiet = fsync_seconds(out, a.fsyncs)
        wrote = write_unsynced(big, a.dirty_gb)
        t0 = time.perf_counter()
        busy = fsync_seconds(out, a.fsyncs)
        busy_total = time.perf_counter() - t0
    print(f"fsync of one appended line, quiet disk: median {statistics.median(quiet) * 1e3:.2f} ms, "
          f"max {max(quiet) * 1e3:.2f} ms ({a.fsyncs} fsyncs)")
    print(f"after writing {a.dirty_gb:g} GB unsynced ({wrote:.1f} s): first fsync {busy[0]:.2f} s, "
          f"median {statistics.median(busy) * 1e3:.2f} ms, all {a.fsyncs} {busy_total:.2f} s")


if __name__ == "__main__":
    main()
