#!/usr/bin/env python
"""Where one optimizer step's time goes: torch.profiler over the step benchmark's variants.

    python benchmarks/profile_step.py [--variants mcm trl_dpo] [--packed_attention sdpa_tree sdpa] [--threads 1]

Same model, data and step as ``bench_step.py`` (its functions), one record. Each project variant
runs with each ``--packed_attention`` kernel given (``mcm[sdpa_tree]``, ``mcm[sdpa]``...). First
``--rounds`` round-robin rounds of untimed-profiler steps give the median seconds per step of each
(an A/B of the kernels on the same machine state); then ``--steps`` steps per variant run under
``torch.profiler`` and the operators with the most self CPU time are printed, grouped as attention, the language-model head / log-softmax, matrix
products, the optimizer, and the rest. One thread by default: on a shared machine a 2-thread
region waits for its second thread, which inflates small operators; one thread keeps each
operator's time its own work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step as b  # noqa: E402

GROUPS = {  # operator name fragment -> group (first match wins)
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax_backward", "_softmax"),
    "head / log-softmax": ("logsumexp", "log_softmax", "gather", "ChunkedLogProb"),
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "optimizer": ("_foreach", "adam", "clip_grad"),
}


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS.items():
        if any(k.lower() in low for k in keys):
            return group
    return "other"


def main(argv=None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["mcm", "trl_dpo"], choices=b.VARIANTS)
    ap.add_argument("--packed_attention", nargs="+", choices=["sdpa_tree", "sdpa"], default=["sdpa_tree"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args(argv)
    b._quiet()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        work = Path(tmp)
        b.write_checkpoint(work / "model", b.PRESETS["cpu"], 0, "cpu", torch.float32)
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(work / "model")
        data = b.Data(b.write_records(work / "data", processor.tokenizer, 2, 0), processor, 0)
        runners = {}
        for v in a.variants:
            for kernel in (a.packed_attention if v in ("mcm", "dpo") else ["sdpa"]):
                name = f"{v}[{kernel}]" if v in ("mcm", "dpo") else v
                runners[name] = b.make_runner(v, work / "model", data, "cpu", torch.float32, 0, work / "runs" / name,
                                              packed_attention=kernel)
        for r in runners.values():  # cached reference tables, as bench_step computes them
            if r.variant in ("mcm", "dpo", "naive_mcm"):
                r.model.eval()
                with torch.no_grad():
                    r.trainer.reference.table = torch.cat([r.model(**x).float() for x in r.batches])
                r.model.train()
        names = list(runners)
        times: dict[str, list[float]] = {v: [] for v in names}
        for rnd in range(a.rounds + 1):  # round 0: warm-up (allocations, AdamW state)
            for v in names[rnd % len(names):] + names[:rnd % len(names)]:
                seconds, _ = runners[v].step(0)
                if rnd:
                    times[v].append(seconds)
        print("median seconds per step (round-robin, " + f"{a.threads} thread(s)): "
              + ", ".join(f"{v} {sorted(t)[len(t) // 2]:.3f}" for v, t in times.items()))
        for v, r in runners.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(a.steps):
                    r.step(0)  # the same record every step
            events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
            total = sum(e.self_cpu_time_total for e in events)
            groups: dict[str, float] = {}
            for e in events:
                groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total
            print(f"\n{v}: {total / 1e6 / a.steps:.3f} s of operator self time per step ({a.threads} thread(s))")
            for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
                print(f"  {g:<20} {100 * t / total:5.1f} %")
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: a.top]:
                print(f"    {e.key:<45} {100 * e.self_cpu_time_total / total:5.1f} %  calls {e.count // a.steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
