#!/usr/bin/env python
"""The measurements of benchmarks/gpu_checks.sh, one subcommand each, each writing one JSON file.

    python benchmarks/gpu_probes.py env        --json OUT   # driver, CUDA build, torch's view of the GPU, tools present
    python benchmarks/gpu_probes.py attention  --json OUT   # GPU: sdpa_tree on flash/efficient kernels vs dense sdpa, 7B widths
    python benchmarks/gpu_probes.py memory     --json OUT   # GPU: peak memory per decoder layer at 7B widths, 4 layers + CLIP-L/336
    python benchmarks/gpu_probes.py precision  --json OUT   # bf16 against fp32 summed log-probs of one packed MCM-DPO step
    python benchmarks/gpu_probes.py update     --json OUT   # share of bf16 weights one AdamW step at lr 5e-7 changes
    python benchmarks/gpu_probes.py table                   # the computed 7B memory table of docs/gpu.md

``precision`` and ``update`` run anywhere (a tiny model on a CPU, the 1.1B benchmark model on a GPU);
``attention`` and ``memory`` need CUDA and say so. Random weights throughout: nothing is downloaded.

The memory model (``memory_model``): bytes per GPU = weights + gradients + optimizer state (fp32
master copy and Adam's two moments: 12 bytes per trained parameter) under the ZeRO stage's
sharding, + activations with gradient checkpointing: each decoder layer keeps its input
(2 bytes x tokens x hidden) and one layer at a time is recomputed, whose working set is
``ACT_BYTES_PER_TOKEN_HIDDEN`` x tokens x hidden bytes (34 for a Llama layer with flash attention,
Korthikanti et al. 2022, table 2 without the attention-score term) + the head's logits over one
chunk of scored positions + the vision tower. The ``memory`` probe measures the per-layer figure at
7B widths to check it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

GIB = 1024 ** 3
# 7B shapes: Vicuna-7B (LLaMA-2 7B) and CLIP ViT-L/14 at 336 px, LLaVA's 2-layer GELU projector
LM_7B = dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000)
CLIP_L336 = dict(hidden=1024, intermediate=4096, layers=24, heads=16, image_size=336, patch=14)
ACT_BYTES_PER_TOKEN_HIDDEN = 34  # one recomputed Llama layer's working set, bf16, flash attention (no L^2 term)
LOGP_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# The memory model (no GPU needed)


def lm_params(hidden: int, intermediate: int, layers: int, vocab: int, **_) -> int:
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


def clip_params(hidden: int, intermediate: int, layers: int, image_size: int, patch: int, **_) -> int:
    per_layer = 4 * hidden * hidden + 4 * hidden + 2 * hidden * intermediate + intermediate + hidden + 4 * hidden
    return layers * per_layer + 3 * patch * patch * hidden + ((image_size // patch) ** 2 + 1) * hidden + 4 * hidden


def projector_params(vision_hidden: int, hidden: int) -> int:
    return vision_hidden * hidden + hidden + hidden * hidden + hidden


def memory_model(stage: str, setup: str, tokens: int, gpus: int = 8, lora_params: int = 0,
                 act_bytes: float = ACT_BYTES_PER_TOKEN_HIDDEN) -> dict:
    """GiB per GPU of one step of ``stage`` (sft, dpo, mcmdpo) with ``setup`` (zero2, zero3, lora) at 7B.

    ``tokens``: distinct tokens of the step's rows on one GPU (batch 1). Full fine-tuning trains the
    language model, projector and vision tower (the released code's paradigm); LoRA trains adapters of
    ``lora_params`` parameters and the projector, the rest frozen in bf16. The reference is cached
    (the default), so it holds no memory during the step.
    """
    h = LM_7B["hidden"]
    total = lm_params(**LM_7B) + clip_params(**CLIP_L336) + projector_params(CLIP_L336["hidden"], h)
    if setup == "lora":
        trained, shard = lora_params + projector_params(CLIP_L336["hidden"], h), 1
        weights = 2 * total + 2 * trained
        grads = 2 * trained
    else:
        trained, shard = total, gpus
        weights = 2 * total / (shard if setup == "zero3" else 1)
        grads = 2 * total / shard  # ZeRO-2 and ZeRO-3 both partition gradients
    optimizer = 12 * trained / shard
    checkpoints = 2 * tokens * h * LM_7B["layers"]
    layer = act_bytes * tokens * h
    head = LOGP_CHUNK * LM_7B["vocab"] * 4 * 3  # float32 logits, log-softmax and gradient of one chunk
    images = {"sft": 1, "dpo": 2, "mcmdpo": 2}[stage]
    vision = images * act_bytes * ((CLIP_L336["image_size"] // CLIP_L336["patch"]) ** 2 + 1) * CLIP_L336["hidden"] \
        * CLIP_L336["layers"] / 12  # a tower without checkpointing keeps each layer's activations
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": checkpoints + layer + head + vision}
    out = {k: round(v / GIB, 2) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / GIB, 1)
    return out


# Distinct tokens per step at batch 1 with 576 image tokens (pad, the paper's setting): prompt ~100 text
# tokens + 576 image tokens, answers ~60; DPO packs chosen and rejected in one row, MCM-DPO 2 rows
# (one per image) each with both contexts and both answers.
STAGE_TOKENS = {"sft": 740, "dpo": 800, "mcmdpo": 2 * (35 + 576 + 2 * 70 + 4 * 60)}
LORA_R128_PARAMS = 32 * 128 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # r=128 on q,k,v,o and the MLP


def table() -> list[dict]:
    rows = []
    for stage, tokens in STAGE_TOKENS.items():
        for setup in ("zero2", "zero3", "lora"):
            rows.append({"stage": stage, "setup": setup, "gpus": 1 if setup == "lora" else 8, "tokens": tokens,
                         **memory_model(stage, setup, tokens, lora_params=LORA_R128_PARAMS)})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| stage | setup | GPUs | tokens/step | weights | gradients | optimizer | activations | total GiB/GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['setup']} | {r['gpus']} | {r['tokens']} | {r['weights']} | {r['gradients']} | "
              f"{r['optimizer']} | {r['activations']} | {r['total']} |")


# ---------------------------------------------------------------------------------------------
# The machine


def env() -> dict:
    import torch

    smi = shutil.which("nvidia-smi")
    driver = None
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        driver = q.stdout.strip() or q.stderr.strip()
    usable = torch.cuda.is_available()
    verdict = None
    if smi and not usable:
        verdict = (f"torch {torch.__version__} (CUDA build {torch.version.cuda}) cannot use this GPU/driver ({driver}): "
                   "install a torch whose CUDA build the driver supports")
    try:
        import flash_attn  # noqa: F401
        flash = True
    except ImportError:
        flash = False
    from llava.eval import nltk_data

    java = shutil.which("java")
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "nvidia_smi": driver, "cuda_usable": usable, "torch_cannot_use_driver": verdict,
            "gpu": torch.cuda.get_device_name(0) if usable else None,
            "bf16_supported": bool(usable and torch.cuda.is_bf16_supported()),
            "flash_attn": flash, "java": java, "wordnet": _wordnet(nltk_data)}


def _wordnet(nltk_data) -> bool:
    """Whether nltk finds WordNet (METEOR) in the venv's nltk_data (built offline by ``make setup``)."""
    import nltk

    nltk.data.path.insert(0, str(nltk_data.default_dest()))
    try:
        from nltk.corpus import wordnet

        return bool(wordnet.synsets("dog"))
    except LookupError:
        return False


# ---------------------------------------------------------------------------------------------
# Packed rows at 7B widths


def packed_segments(total: int, image: int = 576, prefix: int = 35, answer: int = 60) -> list[int]:
    """Segment lengths of one MCM-DPO image row of ``total`` tokens: the two contexts take what is left."""
    context = (total - prefix - image - 4 * answer) // 2
    return [prefix, image, context, answer, answer, context, answer, answer]


def layout_of(lengths: list[int], rows: int = 1):
    from llava.model.tree_attention import TreeLayout, row_chains

    parents = [None, 0, 1, 2, 2, 1, 5, 5]
    segments, start = [], 0
    for n, parent in zip(lengths, parents):
        segments.append((start, start + n, parent))
        start += n
    return TreeLayout.of_rows([row_chains(segments, start)] * rows, start)


def _timed(fn, reps: int = 3):
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def attention(lengths=(3600, 5500)) -> dict:
    """Forward + backward of one packed row at 7B widths (32 heads of 128, bf16): ``sdpa_tree`` inside
    ``sdpa_kernel([FLASH, EFFICIENT])`` (a fall back to the math kernel raises) against dense masked sdpa."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llava.model.tree_attention import tree_sdpa_attention

    heads = torch.nn.Module()
    heads.num_key_value_groups = 1
    out = {}
    for n in lengths:
        layout = layout_of(packed_segments(n))
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 32, layout.length, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        w = torch.randn(1, layout.length, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        mask = layout.dense("cuda")

        def tree():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                o = tree_sdpa_attention(heads, q, k, v, None, tree_layout=layout)[0]
                return o, torch.autograd.grad((o * w).sum(), (q, k, v))

        def dense():
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
            return o, torch.autograd.grad((o * w).sum(), (q, k, v))

        res = {"tokens": layout.length}
        for name, fn in (("sdpa_tree", tree), ("dense", dense)):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                res[f"{name}_s"] = _timed(fn)
            except RuntimeError as e:  # "No available kernel": the chains fell off flash and efficient attention
                res[f"{name}_error"] = str(e).splitlines()[0][:300]
                continue
            res[f"{name}_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
        if "sdpa_tree_s" in res and "dense_s" in res:
            (ot, gt), (od, gd) = tree(), dense()
            res["max_abs_diff_out"] = (ot.float() - od.float()).abs().max().item()
            res["max_abs_diff_grad"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(gt, gd))
            res["out_scale"] = od.float().abs().max().item()
        out[str(n)] = res
    out["pass"] = all("sdpa_tree_s" in r for r in out.values() if isinstance(r, dict))
    return out


# ---------------------------------------------------------------------------------------------
# Models at 7B widths with few layers


def llava_7b_widths(layers: int, device: str, dtype):
    """A random LLaVA with Vicuna-7B's widths and ``layers`` decoder layers, and the full CLIP-L/336 tower."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(hidden_size=LM_7B["hidden"], intermediate_size=LM_7B["intermediate"], num_hidden_layers=layers,
                       num_attention_heads=LM_7B["heads"], num_key_value_heads=LM_7B["heads"],
                       vocab_size=LM_7B["vocab"] + 64, max_position_embeddings=16384)
    vision = CLIPVisionConfig(hidden_size=CLIP_L336["hidden"], intermediate_size=CLIP_L336["intermediate"],
                              num_hidden_layers=CLIP_L336["layers"], num_attention_heads=CLIP_L336["heads"],
                              image_size=CLIP_L336["image_size"], patch_size=CLIP_L336["patch"], projection_dim=768)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=LM_7B["vocab"], vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype)
    return model


class _Example:
    """A preference record of given segment lengths (token ids arbitrary), for the collator."""

    def __init__(self, lengths: list[int], image_token_id: int):
        import torch

        from llava.data.images import ProcessedImage

        prefix, image, context, answer = lengths[0], lengths[1], lengths[2], lengths[3]
        self.index, self.prefix = 0, [1] * prefix
        self._image = ProcessedImage(torch.zeros(3, CLIP_L336["image_size"], CLIP_L336["image_size"]), (336, 336), image)
        self._question, self._answer = [5] * context, [7] * answer

    def image(self, which):
        return self._image

    def question(self, which):
        return self._question

    def response(self, which):
        return self._answer


def packed_batch(total_tokens: int, device: str, image_token_id: int) -> dict:
    """An MCM-DPO batch of one record (two image rows) of ``total_tokens`` tokens in all."""
    from llava.data.collate import PreferenceCollator
    from llava.method import CONDITION_NAMES

    lengths = packed_segments(total_tokens // 2)
    batch = PreferenceCollator(CONDITION_NAMES, 0, image_token_id)([_Example(lengths, image_token_id)])
    return _to(batch, device)


def memory(tokens=(7000, 11000), layers=(2, 4)) -> dict:
    """Peak memory of one forward + backward (checkpointing on, bf16, sdpa_tree) at 7B widths, at 2 and 4 decoder
    layers: the difference is the per-layer cost, extrapolated to 32 layers and compared with ``memory_model``."""
    import torch

    from llava.model.attention import use_attention
    from llava.model.forward import response_logps

    out = {}
    for n in tokens:
        res = {"tokens": n}
        peaks, statics = {}, {}
        for depth in layers:
            model = llava_7b_widths(depth, "cuda", torch.bfloat16)
            use_attention(model, "sdpa_tree")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            batch = packed_batch(n, "cuda", model.config.image_token_id)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            response_logps(model, batch).sum().backward()
            torch.cuda.synchronize()
            peaks[depth] = torch.cuda.max_memory_allocated() - base  # activations and gradients of the step
            statics[depth] = base
            del model, batch
            torch.cuda.empty_cache()
        lo, hi = layers
        per_layer = (peaks[hi] - peaks[lo]) / (hi - lo)
        res["peak_gib"] = {str(d): round(p / GIB, 3) for d, p in peaks.items()}
        res["weights_gib"] = {str(d): round(s / GIB, 3) for d, s in statics.items()}
        # per layer: its bf16 gradients (weights' size) + its checkpointed input; the rest is the layer recomputed
        layer_weights = (statics[hi] - statics[lo]) / (hi - lo)
        res["per_layer_gib"] = round(per_layer / GIB, 3)
        res["per_layer_activation_gib"] = round((per_layer - layer_weights) / GIB, 3)
        res["extrapolated_32_layers_step_gib"] = round((peaks[hi] + (LM_7B["layers"] - hi) * per_layer) / GIB, 2)
        res["model_per_layer_checkpoint_gib"] = round(2 * n * LM_7B["hidden"] / GIB, 3)
        res["model_recomputed_layer_gib"] = round(ACT_BYTES_PER_TOKEN_HIDDEN * n * LM_7B["hidden"] / GIB, 3)
        out[str(n)] = res
    return out


# ---------------------------------------------------------------------------------------------
# Precision: bf16 against fp32, and bf16 weights under AdamW


def _benchmark_model(device: str, work: Path):
    """The step benchmark's 1.1B model (``gpu1b``) on a GPU, the tests' tiny LLaVA on a CPU (seconds), and one
    packed MCM-DPO batch of two of the step benchmark's records."""
    import torch
    from transformers import AutoProcessor

    import bench_step as B
    from llava.constants import DEFAULT_IMAGE_TOKEN
    from llava.conversation import get_template
    from llava.data.collate import PreferenceCollator
    from llava.data.datasets import PreferenceDataset
    from llava.data.images import ImageProcessor
    from llava.data.records import read_records
    from llava.method import CONDITION_NAMES
    from llava.model.load import load_model

    B._quiet()
    from llava.model.tiny import write

    preset = "gpu1b" if device == "cuda" else "tiny"
    if not (work / "model" / "config.json").exists():
        if device == "cuda":
            B.write_checkpoint(work / "model", B.PRESETS[preset], 0, device, torch.float32)
        else:
            write(work / "model", "llava", 0, "tiny")
    tok = AutoProcessor.from_pretrained(work / "model").tokenizer
    pref = B.write_records(work / "data", tok, 2, 0)
    model, processor = load_model(work / "model", attn_implementation="sdpa")
    ds = PreferenceDataset(read_records(pref, "preference"), processor.tokenizer, get_template("v1"),
                           ImageProcessor(processor, "pad"), pref.parent, 2048, CONDITION_NAMES, seed=0)
    image_id = processor.tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    batch = PreferenceCollator(CONDITION_NAMES, processor.tokenizer.pad_token_id, image_id)([ds[0], ds[1]])
    return model, batch, preset


def _to(batch: dict, device: str) -> dict:
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def precision(device: str, work: Path) -> dict:
    """Summed response log-probs of the eight conditions (2 records) in bf16 and fp32, same weights."""
    import torch

    from llava.model.attention import use_attention
    from llava.model.forward import response_logps

    model, batch, preset = _benchmark_model(device, work)
    use_attention(model, "sdpa_tree")
    model.to(device).eval()
    batch = _to(batch, device)
    with torch.no_grad():
        fp32 = response_logps(model, batch)
        bf16 = response_logps(model.to(torch.bfloat16), batch)
    diff = (bf16 - fp32).abs()
    # the margins the loss sees: each condition against cw_mw_yw
    margins32, margins16 = fp32[:, :1] - fp32[:, 1:], bf16[:, :1] - bf16[:, 1:]
    return {"model": preset, "device": device, "finite": bool(torch.isfinite(bf16).all() and torch.isfinite(fp32).all()),
            "max_abs_logp_diff": diff.max().item(), "max_rel_logp_diff": (diff / fp32.abs()).max().item(),
            "max_abs_margin_diff": (margins16 - margins32).abs().max().item(),
            "logp_fp32_range": [fp32.min().item(), fp32.max().item()]}


def update(device: str, work: Path, lr: float = 5e-7) -> dict:
    """Share of weight elements one AdamW step (lr 5e-7, the DPO rate) changes when the weights are bf16 (what a
    run without DeepSpeed gets if it loads bf16 weights), against fp32 master weights rounded to bf16."""
    import torch

    from llava.model.attention import use_attention
    from llava.model.forward import response_logps

    model, batch, preset = _benchmark_model(device, work)
    use_attention(model, "sdpa_tree")
    model.to(device).train()
    batch = _to(batch, device)
    response_logps(model, batch).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    out = {"model": preset, "device": device, "lr": lr}
    for name, master in (("bf16_weights", torch.bfloat16), ("fp32_master_weights", torch.float32)):
        params = {n: p.detach().to(master).clone().requires_grad_() for n, p in model.named_parameters() if n in grads}
        before = {n: p.detach().to(torch.bfloat16).clone() for n, p in params.items()}
        for n, p in params.items():
            p.grad = grads[n].to(master)
        torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0).step()
        changed = sum(int((p.detach().to(torch.bfloat16) != before[n]).sum()) for n, p in params.items())
        moved = sum(int((p.detach() != before[n].to(master)).sum()) for n, p in params.items())
        total = sum(p.numel() for p in params.values())
        out[name] = {"bf16_values_changed": changed / total, "stored_values_changed": moved / total}
    return out


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("probe", choices=["env", "attention", "memory", "precision", "update", "table"])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--workdir", default=None, help="model and data of precision/update (default: a temporary directory)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.probe == "table":
        rows = table()
        print_table(rows)
        res = {"rows": rows, "act_bytes_per_token_hidden": ACT_BYTES_PER_TOKEN_HIDDEN, "stage_tokens": STAGE_TOKENS}
    elif a.probe == "env":
        res = env()
        print(json.dumps(res, indent=1))
        if res["torch_cannot_use_driver"]:
            print(res["torch_cannot_use_driver"])
    else:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if a.probe in ("attention", "memory") and device != "cuda":
            print(f"{a.probe}: needs a CUDA GPU; not run")
            return 3
        if a.probe in ("precision", "update"):
            import bench_step as B

            res = B.in_workdir(a.workdir, f"gpu_probe_{a.probe}_", lambda work: globals()[a.probe](device, work))
        else:
            res = globals()[a.probe]()
        print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
