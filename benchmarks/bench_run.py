#!/usr/bin/env python
"""Seconds per whole preference run: this toolkit's DPO and MCM-DPO against TRL's DPOTrainer.

    python benchmarks/bench_run.py [--json OUT] [--records 64] [--accumulation 4] [--repeats 1]
    python benchmarks/bench_run.py --quick --json out.json          # CI (tests/test_bench_run.py)

A *run* is everything a user waits for after the libraries are imported: load the model, read the
records, the reference pass, every optimizer step of one epoch (batch 1 x ``--accumulation``), and
saving the final model. Same model, same records, same settings on both sides:

* ``mcm`` / ``dpo``: the real entry point, ``llava.train.train`` (``prepare`` then ``train``), with
  ``--task DPO --use_cross_modal_loss True|False`` and the default cached reference
  (``--reference_mode cached``: one forward per record before the first step, written to disk);
* ``trl_dpo``: TRL's ``DPOTrainer`` on the same records (prompt, answers, the image padded to a
  square as the project pads it), its reference model built by TRL from the checkpoint on disk and
  run at every step (TRL refuses precomputed reference log-probs for image data), with its
  log-prob head on the answer positions only -- TRL's GPU path, see ``bench_step.patch_trl_compact_head``;
* ``trl_dpo_stock``: the same, unpatched (on a CPU TRL scores the whole vocabulary at every position).

Each run is a fresh process (imports timed apart and left out), so no run inherits another's
caches or allocator. The model (the CPU preset of ``bench_step.py``: 20M parameters, 576 image
tokens, vocabulary 32000) and records (context 60-120 tokens, answers 10-40, 400x300 JPEGs) are
``bench_step.py``'s. Phases per run: ``load`` (model, data, trainer), ``reference`` (the project's
cached pass; TRL's reference forwards happen inside its steps), ``train`` (steps and final save).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

VARIANTS = ("mcm", "dpo", "trl_dpo", "trl_dpo_stock")
DEFAULT_VARIANTS = ("mcm", "dpo", "trl_dpo")
# ratio name -> (numerator, denominator, target: ratio <= target, or None)
RATIOS = {"mcm/trl_dpo": ("mcm", "trl_dpo", 1.0), "dpo/trl_dpo": ("dpo", "trl_dpo", None)}
MAX_GRAD_NORM = 1.0  # TRL's default; the project's default is 0 (the released code does not clip), set to match


# ---------------------------------------------------------------------------------------------
# One run (in its own process)


def project_argv(variant: str, model_dir: Path, data_path: Path, out: Path, accumulation: int, epochs: int,
                 seed: int) -> list[str]:
    """The ``llava.train.train`` command line of a DPO / MCM-DPO run with TRL's settings where they differ."""
    from bench_step import BETA, LEARNING_RATE, OPTIM

    return ["--model_name_or_path", str(model_dir), "--data_path", str(data_path), "--image_folder", str(data_path.parent),
            "--output_dir", str(out), "--task", "DPO", "--use_cross_modal_loss", str(variant == "mcm"),
            "--version", "v1", "--image_aspect_ratio", "pad", "--attn_implementation", "auto", "--optim", OPTIM,
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", str(accumulation),
            "--num_train_epochs", str(epochs), "--learning_rate", str(LEARNING_RATE), "--beta", str(BETA),
            "--weight_decay", "0.0", "--max_grad_norm", str(MAX_GRAD_NORM), "--lr_scheduler_type", "linear",
            "--gradient_checkpointing", "False", "--bf16", "False", "--use_cpu", "True", "--seed", str(seed),
            "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0",
            "--disable_tqdm", "True"]


def run_project(variant: str, model_dir: Path, data_path: Path, out: Path, a) -> dict:
    from llava.train import train as entry

    t0 = time.perf_counter()
    trainer = entry.prepare(project_argv(variant, model_dir, data_path, out, a.accumulation, a.epochs, a.seed))
    t1 = time.perf_counter()
    trainer.prepare_references()  # what train()'s first callback would run; timed apart (idempotent there)
    t2 = time.perf_counter()
    entry.train(trainer)
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "reference_s": t2 - t1, "train_s": t3 - t2, "total_s": t3 - t0,
            "optimizer_steps": trainer.state.global_step, "micro_steps": len(trainer.train_dataset) * a.epochs,
            "final_loss": _last_loss(trainer.state.log_history)}


def run_trl(variant: str, model_dir: Path, data_path: Path, out: Path, a) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    import bench_step as B
    from llava.train.params import Trainable, set_trainable

    B.patch_trl_compact_head()
    t0 = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    set_trainable(model, Trainable(vision=False))  # the project's default: language model and projector train
    processor = AutoProcessor.from_pretrained(model_dir)
    examples = B.Data(data_path, processor, a.seed).trl_examples()  # records read, images opened and padded
    args = DPOConfig(output_dir=str(out), beta=B.BETA, max_length=None, precompute_ref_log_probs=False,
                     per_device_train_batch_size=1, gradient_accumulation_steps=a.accumulation,
                     num_train_epochs=a.epochs, learning_rate=B.LEARNING_RATE, weight_decay=0.0, optim=B.OPTIM,
                     max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="linear", gradient_checkpointing=False,
                     bf16=False, use_cpu=True, seed=a.seed, save_strategy="no", report_to="none", logging_steps=1,
                     dataloader_num_workers=0, disable_tqdm=True)
    # TRL processes vision examples in its collator, at each step; the dataset stores the (padded) images encoded
    train = datasets.Dataset.from_list(examples)
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=processor)
    t1 = time.perf_counter()
    B._TRL_COMPACT["on"] = variant == "trl_dpo"
    try:
        trainer.train()
    finally:
        B._TRL_COMPACT["on"] = False
    trainer.save_model(str(out))
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "reference_s": 0.0, "train_s": t2 - t1, "total_s": t2 - t0,
            "optimizer_steps": trainer.state.global_step, "micro_steps": len(train) * a.epochs,
            "final_loss": _last_loss(trainer.state.log_history)}


def _last_loss(history: list[dict]) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return losses[-1] if losses else None


def child(a) -> int:
    """``--child VARIANT``: one run; the result goes to ``--result`` as JSON."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(a.threads)
    import bench_step as B

    B._quiet()
    if a.child.startswith("trl"):
        import trl  # noqa: F401
    else:
        import llava.train.train  # noqa: F401
    import_s = time.perf_counter() - t0
    work = Path(a.workdir)
    out = work / "runs" / f"{a.child}_{a.result_tag}"
    runner = run_trl if a.child.startswith("trl") else run_project
    res = runner(a.child, work / "model", work / "data" / "preference.json", out, a)
    res.update(variant=a.child, import_s=import_s)
    Path(a.result).write_text(json.dumps(res))
    return 0


# ---------------------------------------------------------------------------------------------
# The benchmark


def prepare_workdir(work: Path, a) -> dict:
    """The benchmark model and ``--records`` records, as ``bench_step.py`` writes them."""
    import torch
    from transformers import AutoProcessor

    import bench_step as B

    B._quiet()
    facts = B.write_checkpoint(work / "model", B.PRESETS[a.preset], a.seed, "cpu", torch.float32)
    processor = AutoProcessor.from_pretrained(work / "model")
    B.write_records(work / "data", processor.tokenizer, a.records, a.seed)
    return facts


def one_run(variant: str, work: Path, a, tag: str) -> dict:
    result = work / f"result_{variant}_{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--workdir", str(work), "--result",
           str(result), "--result_tag", tag, "--records", str(a.records), "--accumulation", str(a.accumulation),
           "--epochs", str(a.epochs), "--seed", str(a.seed), "--threads", str(a.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"the {variant} run failed (exit code {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(result.read_text())
    res["process_wall_s"] = wall
    res["loadavg_after"] = os.getloadavg()[0]
    return res


def summarize(runs: dict[str, list[dict]]) -> dict:
    seconds = {v: statistics.median(r["total_s"] for r in rs) for v, rs in runs.items()}
    phases = {v: {k: statistics.median(r[k] for r in rs) for k in ("load_s", "reference_s", "train_s", "import_s")}
              for v, rs in runs.items()}
    for v, rs in runs.items():
        phases[v]["train_s_per_micro_step"] = phases[v]["train_s"] / rs[0]["micro_steps"]
    ratios = {}
    for name, (num, den, target) in RATIOS.items():
        if num in seconds and den in seconds:
            value = seconds[num] / seconds[den]
            ratios[name] = {"value": value, "target": target, "pass": None if target is None else value <= target}
    return {"seconds_per_run": seconds, "phases": phases, "ratios": ratios}


def print_report(res: dict) -> None:
    print()
    print(f"{'variant':<14} {'s/run':>8} {'load':>7} {'reference':>10} {'train':>8} {'train s/record':>15} "
          f"{'opt. steps':>10} {'imports':>8}")
    for v, s in res["seconds_per_run"].items():
        ph, r0 = res["phases"][v], res["runs"][v][0]
        print(f"{v:<14} {s:>8.1f} {ph['load_s']:>7.1f} {ph['reference_s']:>10.1f} {ph['train_s']:>8.1f} "
              f"{ph['train_s_per_micro_step']:>15.3f} {r0['optimizer_steps']:>10} {ph['import_s']:>8.1f}")
    print()
    for name, r in res["ratios"].items():
        target = f"<= {r['target']}  {'PASS' if r['pass'] else 'MISS'}" if r["target"] is not None else ""
        print(f"{name:<14} {r['value']:.3f}  {target}")
    s = res["settings"]
    print(f"\n{s['records']} records, {s['epochs']} epoch(s), batch 1 x accumulation {s['accumulation']}, "
          f"{s['repeats']} repeat(s) (median); imports are not in s/run; load average "
          f"{res['machine']['loadavg_start']:.1f} -> {res['machine']['loadavg_end']:.1f}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--records", type=int, default=64, help="preference records (one epoch over them)")
    ap.add_argument("--accumulation", type=int, default=4, help="gradient accumulation steps (batch size is 1)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="runs per variant, alternating order; the median is reported")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    ap.add_argument("--quick", action="store_true", help="CI: 4 records, accumulation 2")
    ap.add_argument("--preset", default="cpu", help="bench_step.py's model preset")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the model, data and runs here instead of a temporary directory")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--result_tag", default="0", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.records, a.accumulation = 4, 2
    if a.records < 2:
        ap.error("--records must be >= 2 (context swapping needs another record)")
    if a.accumulation < 1 or a.epochs < 1 or a.repeats < 1:
        ap.error("--accumulation, --epochs and --repeats must be >= 1")
    return a


def bench(a, work: Path) -> dict:
    import torch
    import transformers

    load_start = os.getloadavg()[0]
    facts = prepare_workdir(work, a)
    runs: dict[str, list[dict]] = {v: [] for v in a.variants}
    for rep in range(a.repeats):
        order = a.variants[rep % len(a.variants):] + a.variants[:rep % len(a.variants)]
        for v in order:
            r = one_run(v, work, a, str(rep))
            runs[v].append(r)
            print(f"repeat {rep + 1}/{a.repeats}: {v} {r['total_s']:.1f}s (load {r['load_s']:.1f}, reference "
                  f"{r['reference_s']:.1f}, train {r['train_s']:.1f}; load average {r['loadavg_after']:.1f})", flush=True)
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    res = summarize(runs)
    res.update(runs=runs, variants=list(a.variants), model={"preset": a.preset, "params": facts["params"]},
               settings={"records": a.records, "epochs": a.epochs, "accumulation": a.accumulation, "batch_size": 1,
                         "repeats": a.repeats, "max_grad_norm": MAX_GRAD_NORM, "gradient_checkpointing": False,
                         "reference": {"mcm": "cached (default)", "dpo": "cached (default)",
                                       "trl_dpo": "reference model forward at every step"}},
               machine={"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
                        "torch_threads": a.threads, "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0]},
               command=shlex.join(["python", "benchmarks/bench_run.py", *sys.argv[1:]]))
    return res


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    if a.child:
        return child(a)
    import bench_step as B

    res = B.in_workdir(a.workdir, "bench_run_", lambda work: bench(a, work))
    print_report(res)
    if a.json:
        B.write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
