#!/usr/bin/env python
"""Records per second of alt-text inference: the released loop against this toolkit's batched inference.

    python benchmarks/bench_infer.py [--json OUT] [--records 16] [--max_new_tokens 32] [--batch_sizes 1 8 16]
    python benchmarks/bench_infer.py --quick --json out.json        # CI (tests/test_bench_infer.py)
    python benchmarks/bench_infer.py --device cuda --json out.json  # one GPU (bfloat16, the toolkit's --dtype auto)

Variants, each from the model on disk to the last line written, over the same test records:

* ``released``: the authors' ``mcmdpo_inference.py`` loop, re-implemented with this package's
  LLaVA-compatible names (``conv_templates``, ``tokenizer_image_token``, ``process_images``): one
  process, one record at a time -- open the image, pad and process it, build the ``llava_v1``
  prompt, splice the image features into the prompt's embeddings (what LLaVA's
  ``prepare_inputs_labels_for_multimodal`` does), ``model.generate(inputs_embeds=..., num_beams=3)``,
  decode, write one JSON line and flush;
* ``b{B}_beams3`` / ``b{B}_greedy``: this toolkit's command (``llava.eval.inference.main``, i.e.
  ``mcmdpo_inference.py``) at ``--batch_size B`` with 3 beams or greedy decoding.

Model and records are ``bench_step.py``'s (CPU preset: 20M parameters, 576 image tokens, vocabulary
32000; questions of 60-120 context tokens; 400x300 JPEGs). The weights are random, so no record ever
emits the end token: every record generates exactly ``--max_new_tokens`` tokens (32 by default,
about an alt-text's length), the same work for every variant. Outputs: each batched run's
responses are compared with the same decoding at batch size 1, and the batch-1 beam responses with
the released loop's.

``phases``: where the time of one batch goes (``--profile_batch`` records, 3 beams): image encoder,
prompt (the language model over the prompt, once per record), decoding (the new tokens), and the
share of padded positions in the batch. ``--profile_beam``: ``torch.profiler`` over batch-1 beam
search of one record (top operators by self time, and the device-to-host copies and
synchronisations per new token, on a GPU).

``checks`` (the run exits 1 when one fails): every variant answered every record with a non-empty
response, and the model's logits over the first prompt are finite in the benchmark's dtype (a float16
overflow gives NaN logits, which decode as empty answers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

BEAMS = 3
TARGET = ("b8_beams3", 3.0)  # records/s at batch 8 with 3 beams >= 3x the released loop's


# ---------------------------------------------------------------------------------------------
# Data


def write_test_file(work: Path, processor, n: int, seed: int) -> Path:
    """``n`` test records (``idx``, absolute ``image_path``, ``question``, reference ``chosen``) from ``bench_step.py``'s records."""
    import bench_step as B

    pref = B.write_records(work / "data", processor.tokenizer, n, seed)
    rows = []
    for r in json.loads(pref.read_text()):
        text = json.loads(r["text"])
        rows.append({"idx": r["idx"], "image_path": str((pref.parent / r["image_path"]).resolve()),
                     "question": text["question"], "chosen": text["chosen"]})
    path = work / "data" / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path: Path) -> list[dict]:
    """The objects of a JSON Lines file (the package's reader)."""
    from llava.fileio import iter_jsonl

    return [line.value for line in iter_jsonl(path.read_bytes())]


def responses(path: Path) -> list[str]:
    return [row["response"] for row in read_rows(path)]


# ---------------------------------------------------------------------------------------------
# The released loop (one record at a time)


def released_embeds(model, ids, pixels):
    """The prompt's embeddings with the image's features in place of its ``IMAGE_TOKEN_INDEX`` id."""
    import torch

    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.model.forward import image_features, unwrap

    emb = unwrap(model).get_input_embeddings()
    k = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0])
    features = image_features(model, pixels)[0].to(emb.weight.dtype)
    return torch.cat([emb(ids[:k]), features, emb(ids[k + 1:])])[None]


def released_loop(model_dir: Path, test_file: Path, out: Path, *, num_beams: int, max_new_tokens: int, device: str,
                  dtype, limit: int | None = None) -> dict:
    import torch
    from PIL import Image

    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.load import load_model

    t0 = time.perf_counter()
    model, processor = load_model(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
    load_s = time.perf_counter() - t0
    rows = read_rows(test_file)[:limit]
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            conv = conv_templates["llava_v1"].copy()
            conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + row["question"] + "\n")
            conv.append_message(conv.roles[1], None)
            image = Image.open(row["image_path"]).convert("RGB")
            pixels = process_images([image], processor, model.config).to(device, dtype=dtype)
            ids = tokenizer_image_token(conv.get_prompt(), tok, IMAGE_TOKEN_INDEX, return_tensors="pt").to(device)
            with torch.inference_mode():
                embeds = released_embeds(model, ids, pixels)
                new = model.generate(inputs_embeds=embeds, num_beams=num_beams, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, max_new_tokens=max_new_tokens, use_cache=True,
                                     repetition_penalty=1.0, pad_token_id=tok.pad_token_id, eos_token_id=eos)
            row["response"] = tok.batch_decode(new, skip_special_tokens=True)[0].strip()
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
    return {"seconds": time.perf_counter() - t0, "load_s": load_s, "records": len(rows)}


# ---------------------------------------------------------------------------------------------
# This toolkit: the inference command itself


def toolkit_run(model_dir: Path, test_file: Path, out: Path, *, batch_size: int, num_beams: int, max_new_tokens: int,
                dtype_name: str) -> dict:
    from llava.eval import inference

    # absolute image paths under --image_folder /, as the released test files have them
    argv = ["--model_name_or_path", str(model_dir), "--data_path", str(test_file), "--image_folder", "/", "--output", str(out),
            "--batch_size", str(batch_size), "--num_beams", str(num_beams), "--max_new_tokens", str(max_new_tokens),
            "--dtype", dtype_name, "--no_progress", "--overwrite"]
    t0 = time.perf_counter()
    inference.main(argv)
    return {"seconds": time.perf_counter() - t0, "records": len(responses(out))}


# ---------------------------------------------------------------------------------------------
# Where one batch's time goes


def phases(model_dir: Path, test_file: Path, *, batch: int, max_new_tokens: int, device: str, dtype) -> dict:
    """Seconds of one batch of ``batch`` records with 3 beams: image encoder, prompt, decoding; padding share.

    The prompt is timed as ``generate_ids`` runs it (``prompt_cache``, once per record) and, for
    comparison, as ``generate`` alone would (once per beam)."""
    import torch

    from llava.conversation import get_template
    from llava.data.collate import stack_images
    from llava.data.images import ImageProcessor
    from llava.eval.generate import build_prompt, generate_ids, left_pad, prompt_cache
    from llava.eval.inference import DEFAULTS
    from llava.model.forward import embed, unwrap
    from llava.model.load import load_model
    from PIL import Image

    model, processor = load_model(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    tok = processor.tokenizer
    images = ImageProcessor(processor, "pad", "default")
    rows = read_rows(test_file)[:batch]
    prompts = [build_prompt(tok, get_template(DEFAULTS["conv_mode"]), r["question"],
                            images(Image.open(r["image_path"]).convert("RGB"))) for r in rows]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ids, mask, positions = (t.to(device) for t in left_pad([p.input_ids for p in prompts], tok.pad_token_id))
    pixels = stack_images([p.image for p in prompts])["pixel_values"].to(device)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    with torch.inference_mode():
        image_s, _ = timed(lambda: embed(model, ids, pixels))  # the text embedding lookup is negligible beside it
        embeds = embed(model, ids, pixels)
        prompt_s, _ = timed(lambda: prompt_cache(model, embeds, mask, positions, BEAMS, max_new_tokens + 1))
        lm = unwrap(model).model.language_model
        prompt_per_beam_s, _ = timed(lambda: lm(inputs_embeds=embeds.repeat_interleave(BEAMS, 0),
                                                attention_mask=mask.repeat_interleave(BEAMS, 0),
                                                position_ids=positions.repeat_interleave(BEAMS, 0), use_cache=True))
    total_s, _ = timed(lambda: generate_ids(model, prompts, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                            num_beams=BEAMS, max_new_tokens=max_new_tokens))
    lengths = [len(p.input_ids) for p in prompts]
    return {"records": len(prompts), "total_s": total_s, "image_encoder_s": image_s, "prompt_s": prompt_s,
            "decode_s": max(total_s - image_s - prompt_s, 0.0), "prompt_once_per_beam_s": prompt_per_beam_s,
            "prompt_tokens_mean": sum(lengths) / len(lengths), "image_tokens": prompts[0].image.num_tokens,
            "padding_share": 1 - sum(lengths) / (len(lengths) * max(lengths)), "new_tokens": max_new_tokens}


# ---------------------------------------------------------------------------------------------
# The benchmark


def logits_finite(model_dir: Path, test_file: Path, *, device: str, dtype) -> bool:
    """Whether the model's logits over the first record's prompt (image included) are all finite."""
    import torch
    from PIL import Image

    from llava.conversation import get_template
    from llava.data.images import ImageProcessor
    from llava.eval.generate import build_prompt
    from llava.eval.inference import DEFAULTS
    from llava.model.forward import embed, unwrap
    from llava.model.load import load_model

    model, processor = load_model(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    row = read_rows(test_file)[0]
    prompt = build_prompt(processor.tokenizer, get_template(DEFAULTS["conv_mode"]), row["question"],
                          ImageProcessor(processor, "pad", "default")(Image.open(row["image_path"]).convert("RGB")))
    with torch.inference_mode():
        embeds = embed(model, torch.tensor([prompt.input_ids], device=device), prompt.image.pixel_values[None].to(device))
        logits = unwrap(model)(inputs_embeds=embeds, use_cache=False).logits
    return bool(torch.isfinite(logits).all())


def beam_profile(model_dir: Path, test_file: Path, *, max_new_tokens: int, device: str, dtype, top: int = 15) -> dict:
    """``torch.profiler`` over batch-1 beam search (3 beams) of one record, after one untimed run."""
    import torch
    from PIL import Image
    from torch.profiler import ProfilerActivity, profile

    from llava.conversation import get_template
    from llava.data.images import ImageProcessor
    from llava.eval.generate import build_prompt, generate_ids
    from llava.eval.inference import DEFAULTS
    from llava.model.load import load_model

    model, processor = load_model(model_dir, dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    tok = processor.tokenizer
    row = read_rows(test_file)[0]
    prompt = build_prompt(tok, get_template(DEFAULTS["conv_mode"]), row["question"],
                          ImageProcessor(processor, "pad", "default")(Image.open(row["image_path"]).convert("RGB")))
    run = lambda: generate_ids(model, [prompt], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               num_beams=BEAMS, max_new_tokens=max_new_tokens)
    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
    seconds = time.perf_counter() - t0
    events = prof.key_averages()
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    calls = {e.key: e.count for e in events}
    syncs = sum(n for k, n in calls.items() if "Synchronize" in k)  # cudaStreamSynchronize, cudaDeviceSynchronize...
    to_host = calls.get("aten::_local_scalar_dense", 0)  # .item(), int(), bool() of a tensor
    return {"seconds": seconds, "new_tokens": max_new_tokens,
            "syncs_per_token": syncs / max_new_tokens, "scalar_reads_per_token": to_host / max_new_tokens,
            "top_self_cpu_ms": {e.key: round(e.self_cpu_time_total / 1000, 3) for e in ops}}


def variants_of(batch_sizes) -> list[tuple[str, int, int]]:
    """``(name, batch size, beams)`` of this toolkit's runs: every batch size with 3 beams, then greedy."""
    return [(f"b{b}_beams{BEAMS}", b, BEAMS) for b in batch_sizes] + [(f"b{b}_greedy", b, 1) for b in batch_sizes]


def bench(a, work: Path) -> dict:
    import torch
    import transformers
    from transformers import AutoProcessor

    import bench_step as B

    B._quiet()
    torch.set_num_threads(a.threads)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[a.dtype]
    load_start = os.getloadavg()[0]
    facts = B.write_checkpoint(work / "model", B.PRESETS[a.preset], a.seed, "cpu", dtype)
    model_dir = work / "model"
    test_file = write_test_file(work, AutoProcessor.from_pretrained(model_dir), a.records, a.seed)
    kw = dict(max_new_tokens=a.max_new_tokens)
    # warm-up (untimed): kernels' first-call costs, for the first timed variant's sake
    released_loop(model_dir, test_file, work / "warmup.jsonl", num_beams=BEAMS, device=a.device, dtype=dtype, limit=1, **kw)

    runs, outputs = {}, {}
    r = released_loop(model_dir, test_file, work / "released.jsonl", num_beams=BEAMS, device=a.device, dtype=dtype, **kw)
    runs["released"], outputs["released"] = r, responses(work / "released.jsonl")
    print(f"released: {r['seconds']:.1f}s, {r['records'] / r['seconds']:.3f} records/s", flush=True)
    for name, bs, beams in variants_of(a.batch_sizes):
        out = work / f"{name}.jsonl"
        r = toolkit_run(model_dir, test_file, out, batch_size=bs, num_beams=beams, dtype_name=a.dtype, **kw)
        runs[name], outputs[name] = r, responses(out)
        print(f"{name}: {r['seconds']:.1f}s, {r['records'] / r['seconds']:.3f} records/s", flush=True)

    rps = {name: r["records"] / r["seconds"] for name, r in runs.items()}
    speedup = {name: v / rps["released"] for name, v in rps.items() if name != "released"}
    same = {}
    for name, bs, beams in variants_of(a.batch_sizes):
        base = f"b1_{name.split('_', 1)[1]}"
        if name != base and base in outputs:
            same[f"{name} == {base}"] = outputs[name] == outputs[base]
    if f"b1_beams{BEAMS}" in outputs:
        same[f"b1_beams{BEAMS} == released"] = outputs[f"b1_beams{BEAMS}"] == outputs["released"]
    empty = {name: sum(1 for r in out if not r.strip()) for name, out in outputs.items()}
    checks = {"answers_non_empty": not any(empty.values()), "empty_answers": empty,
              "logits_finite": logits_finite(model_dir, test_file, device=a.device, dtype=dtype)}
    profile_batch = min(a.profile_batch, a.records)
    ph = phases(model_dir, test_file, batch=profile_batch, max_new_tokens=a.max_new_tokens, device=a.device, dtype=dtype)
    name, factor = TARGET
    target = {"variant": name, "speedup_at_least": factor,
              "speedup": speedup.get(name), "pass": speedup[name] >= factor if name in speedup else None}
    profiled = beam_profile(model_dir, test_file, max_new_tokens=a.max_new_tokens, device=a.device, dtype=dtype) \
        if a.profile_beam else None
    return {
        "records_per_second": rps, "speedup_vs_released": speedup, "outputs_equal": same, "target": target,
        "checks": checks, "phases": ph, "beam_profile": profiled, "runs": runs, "load_s": runs["released"]["load_s"],
        "settings": {"records": a.records, "max_new_tokens": a.max_new_tokens, "beams": BEAMS,
                     "batch_sizes": a.batch_sizes, "device": a.device, "dtype": a.dtype, "threads": a.threads,
                     "timed": "from loading the model to the last line written (model load included, imports not)"},
        "model": {"preset": a.preset, "params": facts["params"], "image_tokens": ph["image_tokens"]},
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0]},
        "command": shlex.join(["python", "benchmarks/bench_infer.py", *sys.argv[1:]]),
    }


def print_report(res: dict) -> None:
    print()
    print(f"{'variant':<14} {'seconds':>8} {'records/s':>10} {'speed-up':>9}")
    for name, r in res["runs"].items():
        sp = res["speedup_vs_released"].get(name)
        print(f"{name:<14} {r['seconds']:>8.1f} {res['records_per_second'][name]:>10.3f} "
              f"{(f'{sp:.2f}x' if sp is not None else '1.00x'):>9}")
    t = res["target"]
    if t["speedup"] is not None:
        print(f"\ntarget: {t['variant']} >= {t['speedup_at_least']}x the released loop: {t['speedup']:.2f}x "
              f"{'PASS' if t['pass'] else 'MISS'}")
    c = res["checks"]
    print(f"checks: answers non-empty {'PASS' if c['answers_non_empty'] else 'FAIL ' + str(c['empty_answers'])}, "
          f"logits finite {'PASS' if c['logits_finite'] else 'FAIL'}")
    print("outputs: " + ", ".join(f"{k}: {'same' if v else 'DIFFERENT'}" for k, v in res["outputs_equal"].items()))
    p = res["phases"]
    print(f"one batch of {p['records']} records, 3 beams, {p['new_tokens']} new tokens: {p['total_s']:.2f}s = image encoder "
          f"{p['image_encoder_s']:.2f}s + prompt {p['prompt_s']:.2f}s (once per beam, as generate alone does: "
          f"{p['prompt_once_per_beam_s']:.2f}s) + decoding {p['decode_s']:.2f}s; prompts {p['prompt_tokens_mean']:.0f} "
          f"tokens ({p['image_tokens']} image), {100 * p['padding_share']:.1f}% padding")
    if res.get("beam_profile"):
        b = res["beam_profile"]
        print(f"batch-1 beam search under the profiler: {b['seconds']:.2f}s for {b['new_tokens']} tokens, "
              f"{b['syncs_per_token']:.1f} device syncs and {b['scalar_reads_per_token']:.1f} scalar reads per token; "
              "top self CPU ms: " + ", ".join(f"{k} {v}" for k, v in list(b["top_self_cpu_ms"].items())[:6]))
    s, m = res["settings"], res["machine"]
    print(f"{s['records']} records, {s['max_new_tokens']} new tokens each, {s['device']} {s['dtype']}, {s['threads']} "
          f"thread(s); load average {m['loadavg_start']:.1f} -> {m['loadavg_end']:.1f}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--profile_batch", type=int, default=8, help="records in the batch whose time is split into phases")
    ap.add_argument("--quick", action="store_true", help="CI: 4 records, batch sizes 1 2 4, 4 new tokens")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                    help="auto: float32 on the CPU, bfloat16 on a GPU (the inference command's auto; both sides run it)")
    ap.add_argument("--profile_beam", action="store_true", help="also profile batch-1 beam search (beam_profile)")
    ap.add_argument("--preset", default="cpu", help="bench_step.py's model preset")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the model, data and outputs here instead of a temporary directory")
    a = ap.parse_args(argv)
    if a.quick:
        a.records, a.batch_sizes, a.max_new_tokens, a.profile_batch = 4, [1, 2, 4], 4, 4
    if a.dtype == "auto":
        a.dtype = "bfloat16" if a.device == "cuda" else "float32"
    if a.records < 2 or min(a.batch_sizes) < 1 or a.max_new_tokens < 1:
        ap.error("--records >= 2, --batch_sizes >= 1, --max_new_tokens >= 1")
    if 1 not in a.batch_sizes:
        a.batch_sizes = [1, *a.batch_sizes]  # the outputs are compared with batch size 1
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    cuda = torch.cuda.is_available()
    if a.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device")
    if a.device == "cpu" and cuda:  # mcmdpo_inference.py always takes the GPU when there is one
        raise SystemExit("a GPU is present and the inference command would use it: pass --device cuda")
    import bench_step as B

    res = B.in_workdir(a.workdir, "bench_infer_", lambda work: bench(a, work))
    print_report(res)
    if a.json:
        B.write_json(a.json, res)
    return 0 if res["checks"]["answers_non_empty"] and res["checks"]["logits_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
