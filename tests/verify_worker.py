"""One process of tests/test_verify_images.py's two-process test (apart: each spawned process imports
this module, and the test module's imports cost seconds more per process)."""

from __future__ import annotations

import json
from pathlib import Path

from llava.data.records import read_records
from llava.data.verify import verify_images_everywhere


def verify_as_rank(rank: int, world: int, init_file: str, data: str, cache_file: str, out: str, runs: int) -> None:
    """``verify_images_everywhere`` ``runs`` times as rank ``rank`` of ``world`` (gloo); what each call
    returned goes to ``out/rank{rank}_{run}.json``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for run in range(runs):
            check = verify_images_everywhere(read_records(data, "preference"), str(Path(data).parent), workers=1,
                                             cache_path=cache_file)
            Path(out, f"rank{rank}_{run}.json").write_text(json.dumps({
                "problems": [[p.file, p.record, p.field, p.message] for p in check.problems],
                "opened": check.opened, "cached": check.cached}))
    finally:
        dist.destroy_process_group()
