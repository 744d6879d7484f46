"""Run under ``deepspeed --num_gpus 2`` by tests/test_support_matrix.py (not a test itself).

Trains several runs one after the other in one launch (one process group: a launch costs more than a
tiny run), each from its own command line. Per run, rank 0 writes ``OUTPUT_DIR/grad_norms.json``: the
norm of the whole gradient at each optimizer step, as the Trainer computes it before clipping
(the ZeRO-2/ZeRO-3 comparison reads it with the losses of ``trainer_state.json``).

Usage: deepspeed --num_gpus 2 tests/zero_runs.py RUNS.json   (a JSON list of argument lists)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate.state import AcceleratorState, PartialState  # noqa: E402

from llava.train.train import leave_process_group, prepare, train  # noqa: E402


def main() -> None:
    runs = json.loads(Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]).read_text())
    for argv in runs:
        trainer = prepare(argv)
        train(trainer)
        if trainer.is_world_process_zero():
            norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
            (Path(trainer.args.output_dir) / "grad_norms.json").write_text(json.dumps(norms))
        trainer.accelerator.wait_for_everyone()
        # the next run builds its own Accelerator: forget this one's (the process group stays)
        AcceleratorState._reset_state(reset_partial_state=False)
        del trainer
    PartialState()  # still initialised: leave_process_group takes it down
    leave_process_group()


if __name__ == "__main__":
    main()
