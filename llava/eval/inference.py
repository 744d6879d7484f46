"""Batch inference over test files: one JSON line per record, resumable, shardable.

    python mcmdpo_inference.py --model_name_or_path MODEL --data_path FILE [FILE ...] --output OUT.jsonl [...]
    torchrun --nproc_per_node N mcmdpo_inference.py ...      (or accelerate launch; same flags)

This module holds the command line, the processes, the model and the generation loop; the output
file (resuming, torn lines, part files, merging, the lock) is ``llava.eval.output_file``. How a
killed or sharded run continues: docs/inference.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llava.constants import INFERENCE_DEFAULTS
from llava.flags import FlagParser
from llava.eval.output_file import (
    InferenceError,
    Item,
    append_lines,
    claim_output,
    consolidate,
    load_items,
    part_files,
    part_path,
    refuse_input_as_output,
    result_line,
    scan_outputs,
)
from llava.fileio import LockHeld, RunLock

# The released inference script's settings: `llava_v1` (the "human" wording, where training used `v1`),
# the question followed by a newline, 3 beams, greedy, 256 new tokens. (The released script ran float16 on a GPU;
# --dtype auto runs bfloat16, what the published runs train in, and float16 only when asked: --dtype float16.)
DEFAULTS = INFERENCE_DEFAULTS


def str_to_bool(text: str) -> bool:
    """``True``/``False`` (and yes/no/1/0) for flags written the way the training flags are."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model flags shared by ``mcmdpo_inference.py`` and ``llava.eval.alt_text``."""
    p.add_argument("--model_name_or_path", "--model_name", "--model-path", "--model_path", dest="model_name", required=True,
                   metavar="MODEL", help="HF-format LLaVA, LoRA adapter (with --model_base) or original-format LLaVA: "
                                         "a directory or hub name")
    p.add_argument("--model_base", default=None, help="base model directory of a LoRA adapter")
    p.add_argument("--vision_tower", default=None, help="local CLIP directory for an original-format checkpoint")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Prompt and decoding flags shared by ``mcmdpo_inference.py`` and ``llava.eval.alt_text``."""
    from llava.constants import DTYPES
    from llava.conversation import TEMPLATE_NAMES

    p.add_argument("--version", "--conv_mode", dest="conv_mode", default=DEFAULTS["conv_mode"], choices=TEMPLATE_NAMES,
                   help="conversation template of the prompt (default llava_v1, as the released inference; "
                        "training's --version v1 is vicuna_v1); --conv_mode is its old name")
    p.add_argument("--prompt_newline", type=str_to_bool, default=DEFAULTS["prompt_newline"], metavar="True|False",
                   help="end the question with a newline, as the released inference does (default True)")
    p.add_argument("--num_beams", type=int, default=DEFAULTS["num_beams"])
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="0 = greedy / beam search")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling (only with --temperature > 0)")
    p.add_argument("--max_new_tokens", type=int, default=DEFAULTS["max_new_tokens"])
    p.add_argument("--image_aspect_ratio", default=DEFAULTS["image_aspect_ratio"], choices=["pad", "square", "anyres"],
                   help="pad (default, the paper's), square, or anyres (LLaVA-NeXT multi-crop)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto: bfloat16 on a GPU that has it (the training dtype of --bf16 True, the published runs), "
                        "else the checkpoint's stored dtype on a GPU, float32 on CPU; float16 (the released script's) "
                        "only when asked")


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(description="Generate alt-text (or yes/no answers) for test records with a LLaVA model.")
    # Each flag is named as in training (llava-mcmdpo's one vocabulary); the released script's names still work.
    add_model_args(p)
    p.add_argument("--model_revision", default=None, help="branch, tag or commit of a hub --model_name_or_path")
    p.add_argument("--data_path", "--test_datasets", dest="test_datasets", nargs="+", required=True, metavar="FILE",
                   help="test files: JSON array, JSON Lines, Parquet, a datasets directory, or hub datasets org/name[:split]")
    p.add_argument("--split", default=None, help="split of the hub datasets in --data_path that name none")
    p.add_argument("--output", "--eval_output", dest="eval_output", required=True, metavar="JSONL",
                   help="output JSON Lines file (resumed when it exists)")
    p.add_argument("--image_folder", default=None, help="folder relative image paths are resolved against")
    p.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"], help="prompts per generate call (per process)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (rank K uses seed + K)")
    add_generation_args(p)
    p.add_argument("--skip_bad_records", action="store_true",
                   help="write an `error` row for a record whose image is missing, unreadable or outside --image_folder "
                        "instead of stopping; they are counted and listed in OUT.skipped_records")
    p.add_argument("--allow_outside_image_folder", action="store_true",
                   help="read image paths that lead outside --image_folder (absolute, or climbing out with ..); refused "
                        "by default")
    p.add_argument("--overwrite", action="store_true", help="start afresh: discard an existing output and its part files "
                                                          "(never a file that is not an inference output)")
    p.add_argument("--strip_special_text", action="store_true",
                   help="remove special-token literals (</s>, <s>, <unk>) from the questions, as training's flag does")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def check_args(args) -> None:
    for name in ("batch_size", "num_beams", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise InferenceError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.temperature < 0:
        raise InferenceError(f"--temperature must be >= 0, got {args.temperature}")
    from llava.model.hub import HubError, with_split
    from llava.model.load import ModelLoadError, resolve

    try:  # hub names: the split joins each dataset name; the model is fetched (or found in the cache) at its revision
        args.test_datasets = [with_split(d, args.split) for d in args.test_datasets]
        args.model_name = str(resolve(args.model_name, args.model_revision))
    except (HubError, ModelLoadError) as e:
        raise InferenceError(str(e))


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.sharded:
            import torch.distributed as dist

            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when ``ok`` on every rank (a barrier too)."""
        if not self.sharded:
            return ok
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def close(self) -> None:
        if self.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def init_dist() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    here = False
    if not dist.is_initialized():
        # gloo carries only barriers and flags; a long imbalance between ranks must not time out.
        dist.init_process_group("gloo", timeout=_dt.timedelta(hours=72))
        here = True
    return Dist(dist.get_rank(), dist.get_world_size(), local, here)


# ---------------------------------------------------------------------------------------------
# Model


def resolve_dtype(name: str, device, stored: str | None = None):
    """The inference dtype for ``--dtype name`` on ``device``; ``stored``: the checkpoint's recorded dtype.

    ``auto`` never picks float16 for a checkpoint trained in bfloat16: its activations can exceed
    float16's range (NaN logits, empty answers). On a GPU without bfloat16 it keeps the stored dtype."""
    import torch

    by_name = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name != "auto":
        return by_name[name]
    if device.type != "cuda":
        return torch.float32
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if stored == "float16" else torch.float32


def stored_dtype(model_name: str, model_base: str | None = None) -> str | None:
    """The dtype a local checkpoint's config.json records (a LoRA adapter's: its base's), or None."""
    import json

    from llava.model.load import ModelLoadError, checkpoint_kind, lora_base

    try:
        path = Path(model_name)
        if checkpoint_kind(model_name) == "lora":
            path = lora_base(path, model_base)
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (ModelLoadError, OSError, ValueError):  # loading reports what is wrong; auto does without
        return None
    return cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")


def pick_device(local_rank: int = 0):
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def check_model_path(model_name: str, model_base: str | None) -> None:
    """Fail fast, before reading data or importing the model classes, for a path that cannot be a model."""
    from llava.model.load import ModelLoadError, checkpoint_kind

    try:
        kind = checkpoint_kind(model_name)
        if kind == "lora" and model_base is not None:
            checkpoint_kind(model_base)
    except ModelLoadError as e:
        raise InferenceError(str(e))


def load_for_inference(model_name: str, model_base: str | None, dtype_name: str, *, vision_tower: str | None = None,
                       local_rank: int = 0, attn_implementation: str = "auto"):
    """``(model, processor, device)``: the model in eval mode on this process's device.

    Generation's masks are ordinary (padding only), so ``auto`` attention is flash-attention 2 on a
    CUDA device in bf16/fp16 with flash_attn installed, sdpa otherwise (``llava.model.attention``).
    """
    from llava.model.attention import AttentionError, attention_here, use_attention
    from llava.model.load import ModelLoadError, load_model

    device = pick_device(local_rank)
    dtype = resolve_dtype(dtype_name, device, stored_dtype(model_name, model_base) if dtype_name == "auto" else None)
    try:
        attn = attention_here(attn_implementation, ordinary_masks=True, dtype=dtype, cuda=device.type == "cuda")
        model, processor = load_model(model_name, model_base, dtype=dtype, vision_tower=vision_tower, attn_implementation=attn)
        use_attention(model, attn)
    except (ModelLoadError, AttentionError) as e:
        raise InferenceError(str(e), local=True)
    model.to(device)
    model.eval()
    return model, processor, device


def image_processor_for(model, processor, aspect_ratio: str):
    from llava.data.images import ImageProcessor
    from llava.model.forward import unwrap

    strategy = getattr(unwrap(model).config, "vision_feature_select_strategy", None) \
        or getattr(processor, "vision_feature_select_strategy", None) or "default"
    try:
        return ImageProcessor(processor, aspect_ratio, strategy)
    except ValueError as e:
        raise InferenceError(str(e), local=True)


# ---------------------------------------------------------------------------------------------
# The run


def _log(msg: str) -> None:
    sys.stderr.write(msg.rstrip("\n") + "\n")
    sys.stderr.flush()


def _batches(seq: Sequence, size: int):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def run_identity(args, dist: Dist) -> dict:
    """What makes this run's output lines what they are, by flag: the model's every byte
    (``model_fingerprint``), the prompt and the decoding. Written beside OUT (``OUT.run.json``); a rerun
    resumes only an output of the same identity. ``--batch_size``, ``--no_progress`` and the like do
    not count."""
    from llava.fingerprint import model_fingerprint

    def fingerprint(path):
        return model_fingerprint(path) if path and Path(path).is_dir() else path

    sampling = args.temperature > 0
    return {"--model_name_or_path": fingerprint(args.model_name), "--model_base": fingerprint(args.model_base),
            "--vision_tower": fingerprint(args.vision_tower), "--version": args.conv_mode,
            "--prompt_newline": args.prompt_newline, "--num_beams": args.num_beams, "--temperature": args.temperature,
            "--top_p": args.top_p if sampling else None, "--seed": args.seed if sampling else None,
            "--max_new_tokens": args.max_new_tokens, "--image_aspect_ratio": args.image_aspect_ratio,
            "--dtype": str(resolve_dtype(args.dtype, pick_device(dist.local_rank))).removeprefix("torch."),
            "--strip_special_text": args.strip_special_text}


def run(args, dist: Dist) -> int:
    check_model_path(args.model_name, args.model_base)
    out = Path(args.eval_output)
    refuse_input_as_output(out, args.test_datasets)
    left_out: list = []  # --skip_bad_records: the records whose fields are bad, left out
    items = load_items(args.test_datasets, strip_special=args.strip_special_text,
                       left_out=left_out if args.skip_bad_records else None)
    if left_out and dist.rank == 0:
        from llava.data.verify import bad_records

        _log(f"--skip_bad_records: left out {len(bad_records(left_out))} records with bad fields (listed in "
             f"{skipped_records_path(out)}); first: {left_out[0]}")
    identity = run_identity(args, dist) if dist.rank == 0 else None
    out.parent.mkdir(parents=True, exist_ok=True)
    # Only rank 0 (the one that rewrites OUT) holds the lock; the other ranks write their parts.
    try:
        with RunLock(out.with_name(out.name + ".lock"), str(out), enabled=dist.rank == 0, log=_log):
            return _run(args, dist, items, out, identity, left_out)
    except LockHeld as e:
        raise InferenceError(str(e)) from None


def _run(args, dist: Dist, items: list[Item], out: Path, identity: dict | None, left_out: list) -> int:
    log = _log if dist.rank == 0 else (lambda msg: None)

    # 1. Rank 0 makes sure OUT is this run's (its identity), folds earlier part files into OUT and cuts
    # a torn last line; everyone then reads OUT.
    ok, message = True, None
    if dist.rank == 0:
        try:
            claim_output(out, identity, args.overwrite, log)
            if part_files(out) or out.exists():
                consolidate(out, items, log, final=False)
        except InferenceError as e:
            ok, message = False, str(e)
    if not dist.all_ok(ok):
        raise InferenceError(message or "rank 0 could not prepare the output (see its message)")
    matched, _ = scan_outputs(out, items, include_parts=False, truncate_torn=False, log=lambda m: None)
    done = matched.done()
    todo = [it for it in items if it.order not in done]
    if done:
        log(f"resuming {out}: {len(done)} of {len(items)} records already done, {len(todo)} to go")

    # 2. Every image this run reads, verified before anything is generated.
    bad = verify_test_images(args, dist, todo, out, log, left_out)

    mine = todo[dist.rank::dist.world]
    target = part_path(out, dist.rank) if dist.sharded else out
    if mine:
        generate_records(args, dist, mine, bad, target, log, total=len(items), already=len(done))

    # 3. Merge (sharded) and put OUT in input order.
    dist.barrier()
    ok, message = True, None
    if dist.rank == 0:
        try:
            final = consolidate(out, items, log, final=True)
            errors = sum(1 for ln in final.best.values() if not ln.is_response)
            log(f"wrote {len(items)} records to {out}" + (f" ({errors} error rows)" if errors else ""))
        except InferenceError as e:
            ok, message = False, str(e)
    if not dist.all_ok(ok):
        raise InferenceError(message or "rank 0 could not merge the outputs")
    return 0


def skipped_records_path(out: Path) -> Path:
    """Where ``--skip_bad_records`` lists the records it wrote error rows for (not ``*.jsonl``: ``get_score.py
    --dir`` scores those)."""
    return out.with_name(out.name + ".skipped_records")


def verify_test_images(args, dist: Dist, todo: list[Item], out: Path, log, left_out: list = ()) -> dict:
    """``{(file, record number): problem}`` of the records in ``todo`` whose image is bad (``llava.data.verify``):
    with ``--skip_bad_records`` counted, listed in ``OUT.skipped_records`` and answered with error rows;
    without, the run stops naming them. Every process gets the same verdict."""
    from llava.data.records import DataError
    from llava.data.verify import verify_images_everywhere, write_skipped_records

    if not todo:
        if dist.rank == 0 and left_out:
            write_skipped_records(skipped_records_path(out), list(left_out))
        return {}
    start = time.time()
    check = verify_images_everywhere([it.record for it in todo], args.image_folder,
                                     allow_outside=args.allow_outside_image_folder)
    log(check.summary(time.time() - start))
    bad: dict = {}
    for p in check.problems:
        bad.setdefault((p.file, p.record), p)
    if bad and not args.skip_bad_records:
        raise DataError(check.problems, hint="stopped before generating; --skip_bad_records writes an error row "
                                             "for each and goes on")
    listed = skipped_records_path(out)
    if dist.rank == 0:
        write_skipped_records(listed, [*left_out, *check.problems])  # the records left out, then the bad images
        if bad:
            log(f"--skip_bad_records: {len(bad)} of {len(todo)} records have a bad image: written as error rows, "
                f"listed in {listed}")
    return bad


def generate_records(args, dist: Dist, mine: list[Item], bad: dict, target: Path, log, *, total: int, already: int) -> None:
    import torch

    from llava.conversation import get_template
    from llava.data.images import open_image
    from llava.data.records import DataError
    from llava.eval.generate import build_prompt, generate

    model, processor, _ = load_for_inference(args.model_name, args.model_base, args.dtype, vision_tower=args.vision_tower,
                                             local_rank=dist.local_rank)
    images = image_processor_for(model, processor, args.image_aspect_ratio)
    tokenizer = processor.tokenizer
    template = get_template(args.conv_mode)
    torch.manual_seed(args.seed + dist.rank)

    bar = None
    if dist.rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        if dist.sharded:
            bar = tqdm(total=len(mine), unit="rec", desc=f"rank 0 of {dist.world}", dynamic_ncols=True)
        else:
            bar = tqdm(total=total, initial=already, unit="rec", desc="inference", dynamic_ncols=True)

    with open(target, "ab", buffering=0) as f:
        for batch in _batches(mine, args.batch_size):
            results: dict[int, bytes] = {}
            prompts, prompt_items = [], []
            for it in batch:
                r = it.record
                problem = bad.get((r.source, r.number))
                if problem is None:
                    try:
                        image = images(open_image(r, args.image_folder))
                    except DataError as e:
                        problem = e.problems[0]
                if problem is not None:
                    if not args.skip_bad_records:
                        raise InferenceError(f"{problem}\n(stopped before generating for this record; use "
                                             "--skip_bad_records to write an error row for it and go on)", local=True)
                    # every process reports the bad records of its own share
                    (bar.write if bar is not None else _log)(f"skipping: {problem} (written as an error row)")
                    results[it.order] = result_line(r, error=problem.message)
                    continue
                prompts.append(build_prompt(tokenizer, template, r.question, image, args.prompt_newline))
                prompt_items.append(it)
            if prompts:
                responses = generate(model, tokenizer, prompts, num_beams=args.num_beams, temperature=args.temperature,
                                     top_p=args.top_p, max_new_tokens=args.max_new_tokens)
                for it, text in zip(prompt_items, responses):
                    results[it.order] = result_line(it.record, response=text)
            append_lines(f, target, b"".join(results[it.order] for it in batch))  # whole lines, one write per batch
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mcmdpo_inference.py``; exits with status 2 on bad input or a missing model."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llava.data.records import DataError

    dist = Dist()
    start = time.time()
    try:
        check_args(args)
        dist = init_dist()
        code = run(args, dist)
    except (InferenceError, DataError) as e:
        if dist.rank == 0 or getattr(e, "local", False):
            where = f"[rank {dist.rank}] " if dist.sharded else ""
            _log(f"{where}error: {e}" if "\n" not in str(e) else f"{where}error:\n{e}")
        dist.close()
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        _log("interrupted: rerun the same command to resume")
        raise SystemExit(130) from None
    dist.close()
    if dist.rank == 0:
        _log(f"done in {time.time() - start:.1f} s")
    return code


if __name__ == "__main__":
    main()
