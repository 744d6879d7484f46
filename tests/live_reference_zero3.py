"""Run under ``deepspeed --num_gpus 2`` by tests/test_live_reference_zero3.py (not a test itself).

Trains one step with ``--reference_mode live`` under ZeRO-3. Before the step (the policy then is the
starting model, so it is what a cached reference pass would score), each rank writes to
``OUTPUT_DIR/live-rank{N}.json``:

* ``cached``: the table ``reference_pass`` (what ``--reference_mode cached`` stores) computes with
  the policy, for every record;
* ``live``: the live reference's log-probabilities of the same records, one at a time, in the same
  share of records per rank as the cached pass (under ZeRO-3 every rank must run each forward);
* how many of the live reference's weights this rank holds, against the model's total.

Usage: deepspeed --num_gpus 2 tests/live_reference_zero3.py TRAINING FLAGS...
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from accelerate.utils import send_to_device  # noqa: E402

from llava.train.reference import ReferenceSetup, reference_pass  # noqa: E402
from llava.train.train import leave_process_group, prepare  # noqa: E402


class Probe(TrainerCallback):
    """Runs after the trainer's own on_train_begin callbacks (the references are prepared by then)."""

    def __init__(self, trainer):
        self.trainer = trainer

    @torch.no_grad()
    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        acc, reference = trainer.accelerator, trainer.reference
        setup = ReferenceSetup(policy=trainer.model_wrapped, accelerator=acc, collator=trainer.data_collator)
        cached = reference_pass(setup, trainer.train_dataset, trainer.objective.conditions)
        n, world, rank = len(trainer.train_dataset), acc.num_processes, acc.process_index
        mine = list(range(rank, n, world))
        mine += [mine[-1]] * (math.ceil(n / world) - len(mine))
        live = {}
        for i in mine:
            batch = send_to_device(trainer.data_collator([trainer.train_dataset[i]]), acc.device)
            live[i] = reference.logps(batch).values[0].float().tolist()
        params = list(reference.model.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
        out = Path(args.output_dir) / f"live-rank{rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"cached": cached.tolist(), "live": live, "held": held, "total": total,
                                   "world": world, "engine": type(reference.model).__name__}))


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    trainer = prepare(argv)
    trainer.add_callback(Probe(trainer))
    trainer.train()
    leave_process_group()  # as llava.train.train.main does: gloo's teardown at interpreter exit can abort a rank
