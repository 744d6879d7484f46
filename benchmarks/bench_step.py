#!/usr/bin/env python
"""Seconds and memory per optimizer step: naive vs packed MCM-DPO, the project's DPO, and TRL's DPOTrainer.

    python benchmarks/bench_step.py [--json OUT] [--steps N] [--warmup N] [--quick] [--packed_attention sdpa_tree|sdpa]
    python benchmarks/bench_step.py --scaling [--quick] [--json OUT]                # how the cost grows (below)
    python benchmarks/bench_step.py --device cuda --dtype bf16 --preset gpu1b      # benchmarks/gpu_step.sh
    python benchmarks/bench_step.py --preset gpu1b --dry_run                       # configs and sizes only

What runs (all through the project's own code, from files on disk):

* a random-weight LLaVA-1.5 (``LlavaForConditionalGeneration``) of the chosen preset is built from
  seeded configs, saved to a temporary directory with its processor and loaded back from disk;
* preference records shaped like the published data (context 60-120 tokens, answers 10-40 tokens,
  chosen and rejected of different lengths, 400x300 random images) are written in format A and read
  with ``read_records`` -> ``PreferenceDataset`` -> ``PreferenceCollator``;
* the variants, each with its own copy of the model and its own optimizer (fused AdamW for all, ``OPTIM``):

  - ``naive_mcm``: MCM-DPO, eight full sequences per record (the published computation:
    ``response_logps_naive``), cached reference log-probs (no reference forward);
  - ``mcm``: MCM-DPO, one tree-packed row per image (``response_logps``), attention ``sdpa_tree`` (one
    SDPA call per chain of segments, ``llava.model.tree_attention``; ``--packed_attention sdpa`` gives
    the dense tree mask instead), cached reference;
  - ``dpo``: the project's DPO (two conditions, packed), cached reference;
  - ``trl_dpo``: TRL's ``DPOTrainer`` with the model's LLaVA processor. TRL refuses precomputed
    reference log-probs for image data, so its step includes a reference forward. Its log-prob head
    is limited to the answer positions, as TRL does on GPUs (see ``patch_trl_compact_head``);
  - ``trl_dpo_stock``: the same, unpatched (on a CPU, TRL scores the whole vocabulary at every position).

  A step is ``Trainer.training_step`` (forward and backward) on a prepared batch, then gradient
  clipping, ``optimizer.step()`` and ``zero_grad`` -- the same calls for every variant; data loading
  and collation are not timed. Batch size 1; the vision tower is frozen and the language model and
  projector train (the project's default), in TRL's model too; no activation checkpointing anywhere.

Timing: one process, the variants alternate round-robin (the order rotates each round) so machine
noise hits all alike; median and minimum seconds per step after ``--warmup`` rounds, and the median
of the optimizer update alone. Beside each ratio the run prints the ratio of ``step_flops`` (the
arithmetic each step needs), on this model and at LLaVA-1.5-7B's shapes: how far a target is from
what the work allows.

Memory: one fresh process per variant (forked from a preloaded fork server, so it does not re-import
the libraries), which builds its batches, loads its model(s) and optimizer and runs
``--memory_steps`` steps. On a CPU the figure is the peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` once loading is done) minus the resident size just before the model was
loaded: weights, TRL's reference copy, gradients, optimizer state and activations, like a GPU's peak
memory. On a GPU it is ``torch.cuda.max_memory_allocated`` minus the allocation before loading.

Scaling (``--scaling``): ``mcm``, ``dpo`` and ``trl_dpo`` at a base point (576 image tokens, context
100 tokens, batch 1) and with one axis changed at a time: image tokens 1156 / 2916 (the square grids
nearest LLaVA-NeXT anyres's 1152 / 2880: the tower takes one 476 / 756 px view), context 400 / 1600
tokens, batch 4. Per point: median seconds per step (round-robin, 1 warm-up + 2 timed rounds) and the
step's memory (growth of the resident high-water mark during one step, in the same process: weights,
gradients and AdamW state are the same at every point); then per axis the fitted growth per doubling
(``2 ** slope`` of log time on log size). ``--quick``: two values per axis, batch 2, one step.

Checks (once, before the first step): the naive and the packed MCM-DPO forward give the same eight
log-probabilities and the same loss (relative 1e-4), so the comparison is of equal work; TRL's
batch has the same token ids and pixels as the project's DPO batch and its (patched and stock)
log-probabilities agree with the project's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llava.model.tiny import TinySize, build  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

VARIANTS = ("naive_mcm", "mcm", "dpo", "trl_dpo", "trl_dpo_stock")
TRL_VARIANTS = ("trl_dpo", "trl_dpo_stock")
# ratio name -> (numerator, denominator, what is compared, target: ratio <= target)
RATIOS = {
    "mcm/naive_mcm": ("mcm", "naive_mcm", "seconds", 0.12),
    "dpo/trl_dpo": ("dpo", "trl_dpo", "seconds", 0.4),
    "mcm/trl_dpo": ("mcm", "trl_dpo", "seconds", 0.8),
    "peak mcm / peak trl_dpo": ("mcm", "trl_dpo", "memory", 0.8),
}
REL_TOL = 1e-4  # equal-work checks in fp32
BF16_REL_TOL = 1e-2  # in bf16 the packed and naive layouts round differently (different kernels and shapes)
LEARNING_RATE = 1e-5
# One optimizer for every variant: the Trainer's (and TRL's) default. The project trains with
# adamw_torch unless told otherwise (the released default, --optim), the same update done slower.
OPTIM = "adamw_torch_fused"
BETA = 0.1
MiB = 1 << 20

# Published-data shapes (tokens of the benchmark tokenizer).
CONTEXT_TOKENS = (60, 120)
ANSWER_TOKENS = (10, 40)
IMAGE_WH = (400, 300)
INSTRUCTION = "Given an image and context, generate alt-text for the image.\nContext:\n"


PRESETS = {
    # The CPU benchmark model.
    "cpu": TinySize(image_size=336, vision_hidden=128, vision_layers=2, vision_heads=4, text_hidden=256,
                    text_layers=4, text_heads=4, text_intermediate=688, vocab_size=32000),
    # About 1.1B parameters: a 0.95B Llama text model and a 0.15B CLIP-L-width tower (12 layers).
    "gpu1b": TinySize(image_size=336, vision_hidden=1024, vision_layers=12, vision_heads=16, text_hidden=2048,
                      text_layers=16, text_heads=16, text_intermediate=5632, vocab_size=32000),
}


# ---------------------------------------------------------------------------------------------
# Model, processor, data


def write_checkpoint(out: Path, p: TinySize, seed: int, device: str, dtype) -> dict:
    """A seeded random-weight LLaVA-1.5 with its processor (``llava.model.tiny.build``), saved to ``out``.

    The shipped tokenizer corpus supports only ~3k BPE tokens; the model's vocabulary is padded to
    ``p.vocab_size`` (32000, Llama's) with unused rows, so the head costs what a real one does, and the
    tokenizer gets a placeholder token ``<|id|>`` for each of those ids, so every generated id decodes to text.
    """
    model, processor = build("llava", seed, p, device=device)
    model.to(dtype)
    trained = len(processor.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    # Random weights emit ids across the whole vocabulary; ids the trained tokenizer lacks would decode to
    # nothing, and inference checks could not tell such answers from NaN logits. Each gets a printable
    # entry in the BPE vocabulary itself (no merge makes it, so encoding is unchanged). Not added tokens:
    # transformers handles each added token in Python when it loads a tokenizer (28,950 of them took
    # seconds), where LLaMA's real 32000-entry tokenizer has 3.
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab.update({t["content"]: t["id"] for t in spec["added_tokens"]})  # <pad>, <image>: ids 0..V-1 all in it, as LLaMA's
    vocab.update({f"<|{i}|>": i for i in range(trained, model.config.text_config.vocab_size)})
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    facts = {"tokenizer_vocab": trained, "config_vocab_size": model.config.text_config.vocab_size,
             "params": param_counts(model)}
    del model
    gc.collect()
    return facts


def param_counts(model) -> dict:
    """Parameters by part: vision tower, projector, input embeddings, head, rest of the language model (its layers)."""
    out = {"vision": 0, "projector": 0, "embeddings": 0, "head": 0, "language": 0}
    for name, prm in model.named_parameters():
        if "vision_tower" in name:
            out["vision"] += prm.numel()
        elif "multi_modal_projector" in name:
            out["projector"] += prm.numel()
        elif "embed_tokens" in name:
            out["embeddings"] += prm.numel()
        elif "lm_head" in name:
            out["head"] += prm.numel()
        else:
            out["language"] += prm.numel()
    out["total"] = sum(out.values())
    return out


def _corpus_words() -> list[str]:
    from llava.model.tiny import tokenizer_corpus

    words = [w for w in tokenizer_corpus().read_text(encoding="utf-8").split() if w.isalpha()]
    return words or ["image"]


def _text_of_tokens(tok, rng, words: list[str], target: int) -> str:
    """Corpus words until the text is ``target`` tokens long (never shorter; one word over at most)."""
    out: list[str] = []
    while len(tok(" ".join(out), add_special_tokens=False).input_ids) < target:
        out.append(rng.choice(words))
    return " ".join(out)


def write_records(folder: Path, tok, n: int, seed: int, context_tokens: tuple[int, int] = CONTEXT_TOKENS) -> Path:
    """``n`` format-A preference records with 400x300 random images under ``folder/images``."""
    import random

    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    words = _corpus_words()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        w, h = IMAGE_WH
        # smooth random colours plus noise: a photo-like JPEG rather than a flat one
        base = np_rng.integers(0, 256, (h // 20, w // 20, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        noisy = np.clip(np.asarray(img, dtype=np.int16) + np_rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / "images" / f"img_{i}.jpg", quality=90)
        context = _text_of_tokens(tok, rng, words, rng.randint(*context_tokens))
        n_chosen = rng.randint(*ANSWER_TOKENS)
        n_rejected = rng.choice([k for k in range(ANSWER_TOKENS[0], ANSWER_TOKENS[1] + 1) if k != n_chosen])
        chosen = _text_of_tokens(tok, rng, words, n_chosen)
        rejected = _text_of_tokens(tok, rng, words, n_rejected)
        text = {"question": INSTRUCTION + context, "chosen": chosen, "rejected": rejected}
        rows.append({"ds_name": "bench", "image": {"path": f"images/img_{i}.jpg"}, "image_path": f"images/img_{i}.jpg",
                     "idx": i, "text": json.dumps(text)})
    path = folder / "preference.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def mcm_objective():
    from llava.method import DEFAULT_WEIGHTS
    from llava.train.losses import MCMObjective

    return MCMObjective(dict(DEFAULT_WEIGHTS), norm=2.8, beta=BETA)


def objective_of(variant: str):
    from llava.train.losses import DPOObjective

    return DPOObjective(BETA) if variant == "dpo" else mcm_objective()


class Data:
    """The records on disk and the project's datasets over them."""

    def __init__(self, data_path: Path, processor, seed: int, batch_size: int = 1, max_length: int = 2048):
        from llava.conversation import get_template
        from llava.data.images import ImageProcessor
        from llava.data.records import read_records

        self.data_path, self.folder, self.processor, self.seed = data_path, data_path.parent, processor, seed
        self.batch_size, self.max_length = batch_size, max_length
        self.records = read_records(data_path, "preference")
        self.template = get_template("v1")
        self.images = ImageProcessor(processor, "pad", "default")
        self._datasets: dict = {}

    def dataset(self, conditions):
        from llava.data.datasets import PreferenceDataset

        key = tuple(conditions)
        if key not in self._datasets:
            self._datasets[key] = PreferenceDataset(self.records, self.processor.tokenizer, self.template, self.images,
                                                    str(self.folder), self.max_length, key, image_type="diffusion",
                                                    seed=self.seed)
        return self._datasets[key]

    def collator(self, conditions, packed: bool):
        from llava.constants import DEFAULT_IMAGE_TOKEN
        from llava.data.collate import PreferenceCollator

        tok = self.processor.tokenizer
        return PreferenceCollator(conditions, tok.pad_token_id, tok.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN), packed=packed)

    def batch_indices(self) -> list[list[int]]:
        """Record indices of each batch: consecutive groups of ``batch_size`` (the last one may be short)."""
        n, b = len(self.records), self.batch_size
        return [list(range(i, min(i + b, n))) for i in range(0, n, b)]

    def project_batches(self, variant: str) -> list[dict]:
        """The collated batches (``batch_size`` records each), in the layout ``variant`` trains on."""
        conditions = objective_of(variant).conditions
        ds, coll = self.dataset(conditions), self.collator(conditions, packed=variant != "naive_mcm")
        return [coll([ds[i] for i in idx]) for idx in self.batch_indices()]

    def trl_examples(self) -> list[dict]:
        """TRL's standard (non-conversational) vision preference examples of the same records.

        The prompt is the Vicuna v1 text the project tokenizes (BOS written out, since TRL's
        collator adds no special tokens; the metaspace mark keeps the first word's token the same);
        the image is padded to a square in the processor's mean colour, as the project's ``pad``
        mode does, so both see the same pixels.
        """
        from llava.constants import DEFAULT_IMAGE_TOKEN
        from llava.conversation import image_question
        from llava.data.images import expand_to_square, open_image

        tok = self.processor.tokenizer
        out = []
        for r in self.records:
            image = expand_to_square(open_image(r, str(self.folder)), self.images.fill)
            # LLaVA's tokenization starts the text after the image as a fresh string, with a word-boundary
            # mark; TRL tokenizes the prompt whole, so the mark is written out after <image> (and the first word)
            human = self.template.human_text(image_question(r.question), True)
            prompt = tok.bos_token + "\u2581" + human.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IMAGE_TOKEN + "\u2581")
            out.append({"images": [image], "prompt": prompt,
                        "chosen": self.template.answer_text(r.chosen),  # ends with </s>
                        "rejected": self.template.answer_text(r.rejected)})
        return out


# ---------------------------------------------------------------------------------------------
# TRL: the answer-positions-only head (its GPU path) on the CPU


_TRL_COMPACT = {"on": False}


def patch_trl_compact_head() -> None:
    """Let TRL's fused log-prob head score the answer positions only, as it does on GPUs.

    ``trl.trainer.utils.add_fused_lm_head`` (TRL 1.16) decides ``compact = _use_triton(device)``:
    on CUDA/XPU with Triton it passes ``hidden_states[mask]`` (the positions whose label is not
    -100) to ``ChunkedLogProbFunction``; elsewhere it passes every position and masks afterwards,
    so the CPU pays for the full vocabulary at every prompt and image position. This replaces the
    ``_use_triton`` name that ``add_fused_lm_head`` looks up, in this process only, by one that says
    "compact" while ``_TRL_COMPACT["on"]`` is set. Nothing else changes: the kernel module keeps its
    own ``_use_triton``, so the log-softmax tiles still run in torch on the CPU, exactly the same
    arithmetic as the Triton fold on a GPU.
    """
    import inspect

    import trl.trainer.utils as tu

    if getattr(tu._use_triton, "_bench_patched", False):
        return
    if "compact = _use_triton(hidden_states.device)" not in inspect.getsource(tu.add_fused_lm_head):
        raise RuntimeError(f"TRL {__import__('trl').__version__}: add_fused_lm_head no longer chooses its compact path "
                           "with _use_triton; update patch_trl_compact_head")
    original = tu._use_triton

    def use_triton_or_compact(device):
        return True if _TRL_COMPACT["on"] else original(device)

    use_triton_or_compact._bench_patched = True
    tu._use_triton = use_triton_or_compact


# ---------------------------------------------------------------------------------------------
# Runners: one model, trainer and optimizer per variant


class Runner:
    def __init__(self, variant: str, trainer, compact: bool | None = None):
        import torch

        self.variant, self.trainer, self.compact = variant, trainer, compact
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]
        self.max_grad_norm = trainer.args.max_grad_norm
        self.batches: list[dict] = []
        self.update_seconds: list[float] = []  # of each step: clipping, optimizer.step() and zero_grad
        self.device = trainer.args.device
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    @property
    def model(self):
        return self.trainer.model

    def set_batches(self, batches: list[dict]) -> None:
        self.batches = [self.trainer._prepare_inputs(b) for b in batches]  # on the device before timing

    def step(self, i: int) -> tuple[float, float]:
        """One optimizer step on batch ``i``; returns (seconds, loss)."""
        import torch

        batch = self.batches[i % len(self.batches)]
        if self.compact is not None:
            _TRL_COMPACT["on"] = self.compact
        self._sync()
        t0 = time.perf_counter()
        loss = self.trainer.training_step(self.trainer.model_wrapped, batch)
        self._sync()
        t_update = time.perf_counter()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self._sync()
        t_end = time.perf_counter()
        seconds = t_end - t0
        self.update_seconds.append(t_end - t_update)
        _TRL_COMPACT["on"] = False
        return seconds, float(loss)


def _trainer_common(device: str, dtype, seed: int, out: Path) -> dict:
    import torch

    return dict(output_dir=str(out), per_device_train_batch_size=1, per_device_eval_batch_size=1,
                learning_rate=LEARNING_RATE, weight_decay=0.0, max_grad_norm=1.0, optim=OPTIM, use_cpu=device == "cpu",
                bf16=dtype == torch.bfloat16, report_to="none", save_strategy="no", seed=seed,
                gradient_checkpointing=False, remove_unused_columns=False, dataloader_num_workers=0,
                disable_tqdm=True)


def attention_of(variant: str, packed_attention: str) -> str:
    """The kernel a project variant loads with: plain sdpa for the naive rows (ordinary masks), the
    chosen tree kernel for packed rows (``sdpa_tree``, what ``--attn_implementation auto`` picks; or
    ``sdpa``, the dense masked reference)."""
    return "sdpa" if variant == "naive_mcm" else packed_attention


def project_runner(variant: str, model_dir: Path, data: Data, device: str, dtype, seed: int, work: Path,
                   table=None, packed_attention: str = "sdpa_tree") -> Runner:
    from llava.model.attention import use_attention
    from llava.model.load import load_model
    from llava.train.arguments import TrainingArguments
    from llava.train.params import Trainable, set_trainable
    from llava.train.step import CachedReference, ScoringModel
    from llava.train.trainer import LlavaTrainer

    llava, processor = load_model(model_dir, dtype=dtype, attn_implementation="sdpa")
    use_attention(llava, attention_of(variant, packed_attention))  # as the trainer does (llava.train.train.build_model)
    set_trainable(llava, Trainable(vision=False))  # language model + projector train, vision tower frozen
    objective = objective_of(variant)
    naive = variant == "naive_mcm"
    args = TrainingArguments(loss="dpo" if variant == "dpo" else "mcm_dpo",
                             preference_forward="naive" if naive else "packed",
                             **_trainer_common(device, dtype, seed, work / variant))
    reference = CachedReference(work / "ref_cache", {"conditions": list(objective.conditions)})
    reference.table = table  # the cached table, set once computed (see reference_tables)
    trainer = LlavaTrainer(model=ScoringModel(llava, naive=naive), args=args,
                           train_dataset=data.dataset(objective.conditions),
                           data_collator=data.collator(objective.conditions, packed=not naive),
                           processing_class=processor, objective=objective, reference=reference)
    return Runner(variant, trainer)


def trl_runner(variant: str, model_dir: Path, data: Data, device: str, dtype, seed: int, work: Path) -> Runner:
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from llava.train.params import Trainable, set_trainable

    patch_trl_compact_head()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    set_trainable(model, Trainable(vision=False))  # the same trainable parameters as the project's runs
    processor = AutoProcessor.from_pretrained(model_dir)
    examples = data.trl_examples()
    # TRL only reads the dataset's first row here (to see it is a vision dataset); steps get prepared batches.
    train = datasets.Dataset.from_list([examples[0]])
    # beta, loss "sigmoid", reference model built by TRL from the policy's path (the checkpoint on disk)
    args = DPOConfig(beta=BETA, max_length=None, precompute_ref_log_probs=False,
                     **_trainer_common(device, dtype, seed, work / variant))
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=processor)
    runner = Runner(variant, trainer, compact=variant == "trl_dpo")
    runner.trl_collate = lambda idx: trainer.data_collator([dict(examples[i]) for i in idx])
    return runner


def make_runner(variant: str, model_dir: Path, data: Data, device: str, dtype, seed: int, work: Path,
                tables: dict | None = None, packed_attention: str = "sdpa_tree") -> Runner:
    if variant in TRL_VARIANTS:
        runner = trl_runner(variant, model_dir, data, device, dtype, seed, work)
        runner.set_batches([runner.trl_collate(idx) for idx in data.batch_indices()])
    else:
        table = (tables or {}).get("dpo" if variant == "dpo" else "mcm")
        runner = project_runner(variant, model_dir, data, device, dtype, seed, work, table, packed_attention)
        runner.set_batches(data.project_batches(variant))
    return runner


# ---------------------------------------------------------------------------------------------
# Reference tables and the equal-work checks


def reference_tables(runners: dict) -> dict:
    """Cached reference log-probs ``[N, C]``: the starting policy's own, packed, as ``CachedReference`` computes them."""
    import torch

    tables = {}
    for key, variant in (("mcm", "mcm"), ("dpo", "dpo")):
        r = runners.get(variant)
        if r is None:
            continue
        r.model.eval()
        with torch.no_grad():
            tables[key] = torch.cat([r.model(**b).float().cpu() for b in r.batches])
        r.model.train()
    for r in runners.values():
        if r.variant in ("naive_mcm", "mcm", "dpo"):
            r.trainer.reference.table = tables["dpo" if r.variant == "dpo" else "mcm"]
    return tables


def _rel(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp(min=1.0)).max())


def check_mcm_vs_naive(runners: dict, tables: dict, tol: float = REL_TOL) -> dict:
    """Same eight log-probabilities and same loss (cached reference, and a shifted one) for record 0."""
    import torch

    from llava.method import ConditionLogps

    packed, naive = runners["mcm"], runners["naive_mcm"]
    objective = packed.trainer.objective
    lp_packed = tables["mcm"][:1]  # the packed forward of record 0 from the starting weights (reference_tables)
    naive.model.eval()
    with torch.no_grad():
        lp_naive = naive.model(**naive.batches[0]).float().cpu()
    naive.model.train()
    ref = tables["mcm"][:1]
    # a reference away from the policy makes every margin non-zero, so the loss is sensitive to each condition
    shifted = ref - torch.arange(ref.shape[1], dtype=ref.dtype) * 0.75
    out = {"logps_packed": lp_packed[0].tolist(), "logps_naive": lp_naive[0].tolist(),
           "logps_max_rel": _rel(lp_naive, lp_packed)}
    labelled = lambda t: ConditionLogps(t, tuple(objective.conditions))  # noqa: E731
    for name, r in (("cached", ref), ("shifted", shifted)):
        lp = float(objective(labelled(lp_packed), labelled(r), {})[0])
        ln = float(objective(labelled(lp_naive), labelled(r), {})[0])
        out[f"loss_{name}_packed"], out[f"loss_{name}_naive"], out[f"loss_{name}_rel"] = lp, ln, _rel(ln, lp)
    out["tolerance"] = tol
    out["passed"] = max(out["logps_max_rel"], out["loss_cached_rel"], out["loss_shifted_rel"]) <= tol
    return out


def check_trl_vs_dpo(runners: dict, data: Data, tables: dict, tol: float = REL_TOL) -> dict:
    """TRL's batch has the project's token ids and pixels, and its log-probs (patched and stock) agree."""
    import torch

    out = {}
    naive = data.collator(objective_of("dpo").conditions, packed=False)([data.dataset(objective_of("dpo").conditions)[0]])
    rows_ours = [naive["input_ids"][i][naive["attention_mask"][i]].tolist() for i in range(2)]
    lp_ours = tables["dpo"][0]  # the project's packed DPO forward of record 0 from the starting weights
    for variant in TRL_VARIANTS:
        r = runners.get(variant)
        if r is None:
            continue
        b = r.batches[0]
        rows = [b["input_ids"][i][b["attention_mask"][i].bool()].tolist() for i in range(2)]
        out["same_token_ids"] = rows == rows_ours
        # As the tower sees them, in the model's dtype. In fp32 they are equal; in bf16 the H200 run found
        # them about one rounding step apart (2.0e-2 at |x| ~ 2, where a bf16 step is 1.6e-2): two bf16 steps
        # of the largest value are allowed there.
        dtype = next(r.model.parameters()).dtype
        theirs, ours = b["pixel_values"][0].cpu().to(dtype), runners["dpo"].batches[0]["pixel_values"][0].cpu().to(dtype)
        out["pixels_max_abs_diff"] = float((theirs.float() - ours.float()).abs().max())
        out["pixels_tolerance"] = 1e-3 if dtype == torch.float32 else \
            2 * torch.finfo(dtype).eps * float(ours.float().abs().max())
        kwargs = {k: v for k, v in b.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
        _TRL_COMPACT["on"] = bool(r.compact)
        try:
            with torch.no_grad():
                lp = r.model(**kwargs, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(1).float().cpu()
        finally:
            _TRL_COMPACT["on"] = False
        out[f"{variant}_logps"] = lp.tolist()
        out[f"{variant}_logps_max_rel"] = _rel(lp, lp_ours)
        out["tokens_per_row"] = [len(x) for x in rows]
    out["dpo_logps"] = lp_ours.tolist()
    rels = [v for k, v in out.items() if k.endswith("_logps_max_rel")]
    out["tolerance"] = tol
    out["passed"] = bool(out.get("same_token_ids")) and out.get("pixels_max_abs_diff", 0) <= out.get("pixels_tolerance", 1e-3) and all(x <= tol for x in rels)
    return out


# ---------------------------------------------------------------------------------------------
# Tokens and FLOPs


def token_counts(runners: dict, data: Data, packed_attention: str = "sdpa_tree") -> dict:
    """Per variant, mean over records: distinct tokens in the rows it runs, and the naive layout's tokens for the same work."""
    counts = {}
    if "naive_mcm" in runners:
        naive8 = [int(b["attention_mask"].sum()) for b in runners["naive_mcm"].batches]
    else:
        naive8 = [int(b["attention_mask"].sum()) for b in data.project_batches("naive_mcm")]
    coll2 = data.collator(objective_of("dpo").conditions, packed=False)
    ds2 = data.dataset(objective_of("dpo").conditions)
    naive2 = [int(coll2([ds2[i]])["attention_mask"].sum()) for i in range(len(data.records))]
    for v, r in runners.items():
        per, dense, needed, scored = [], [], [], []
        for b in r.batches:
            tree = b.get("tree")
            m = tree.dense() if tree is not None else b["attention_mask"]
            # where the head runs: every position in the naive layout (the published full-vocabulary
            # log-softmax) and in TRL's stock CPU path; the packed rows' answer positions; TRL's
            # completions in its compact (GPU) mode
            if v in ("naive_mcm", "trl_dpo_stock"):
                scored.append(int(m.sum()))
            elif v == "trl_dpo":
                scored.append(int(b["completion_mask"].sum()))
            else:
                scored.append(int(b["logp_mask"].sum()))
            if m.dim() == 4:  # packed: every position of the (single, unpadded) row is a distinct token
                per.append(int(b["input_ids"].numel()))
                # the dense masked kernel (sdpa) computes every (query, key) pair; sdpa_tree only its chains
                dense.append(tree.pairs() if packed_attention == "sdpa_tree" else m.shape[0] * int(m.shape[-1]) ** 2)
                needed.append(int(m.sum()))  # the pairs the tree mask allows
            else:
                lengths = m.sum(-1).tolist()
                per.append(int(sum(lengths)))
                dense.append(int(m.shape[0] * m.shape[1] ** 2))
                needed.append(int(sum(n * (n + 1) // 2 for n in lengths)))
        equiv = naive2 if v in ("dpo",) + TRL_VARIANTS else naive8
        n_img = [int(b["pixel_values"].shape[0]) for b in r.batches]
        counts[v] = {"tokens": statistics.mean(per), "naive_equivalent_tokens": statistics.mean(equiv),
                     "images": statistics.mean(n_img), "reference_forward": v in TRL_VARIANTS,
                     "scored_positions": statistics.mean(scored),
                     "attention_pairs_computed": statistics.mean(dense), "attention_pairs_needed": statistics.mean(needed)}
    return counts


def step_flops(params: dict, count: dict, image_tokens: int, hidden: int, layers: int) -> float:
    """The arithmetic a variant's step cannot avoid (multiply-adds x 2), counted where each part runs.

    Forward: the language model's layers on every token (``2 x params x tokens``), the head on the
    positions it scores only (``2 x head x scored``: answer tokens for the packed and compact paths,
    every token for the naive and stock ones), attention on the (query, key) pairs the layout needs
    (``4 x hidden x pairs`` per layer: scores and the weighted sum), the projector on the image
    tokens, the frozen vision tower on each image. The trained parts cost 3 forwards (backward is
    two matmuls per forward one); TRL's reference adds one forward of everything. Input embeddings
    are a lookup. Recomputation (the packed head's chunks, checkpointing) is not counted: it is a
    choice of the implementation, not work the method needs.
    """
    t, n_img, scored = count["tokens"], count["images"], count["scored_positions"]
    vision = 2 * params["vision"] * (image_tokens + 1) * n_img
    language = (2 * params["language"] * t + 2 * params["head"] * scored + 4 * hidden * layers * count["attention_pairs_needed"]
                + 2 * params["projector"] * image_tokens * n_img)
    return 3 * language + vision + (language + vision if count["reference_forward"] else 0)


# The same step's arithmetic at LLaVA-1.5-7B's shapes (Vicuna-7B, CLIP ViT-L/14-336, mlp2x_gelu), to
# tell what the benchmark model's proportions (a 32000 x 256 head on a 3M-parameter trunk) do to the ratios.
LLAVA_7B = {"params": {"language": 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008), "head": 32000 * 4096,
                       "projector": 1024 * 4096 + 4096 ** 2 + 2 * 4096, "vision": 303_507_456},
            "hidden": 4096, "layers": 32}


RUN_RATIO = "mcm+reference/trl_dpo"


def work_ratios(tokens: dict, params: dict, image_tokens: int, hidden: int, layers: int) -> dict:
    """The timed ratios as the ratios of ``step_flops``: on the benchmark model, and on LLaVA-1.5-7B's shapes."""
    out = {}
    for label, (prm, d, n) in {"benchmark model": (params, hidden, layers),
                               "LLaVA-1.5-7B shapes": (LLAVA_7B["params"], LLAVA_7B["hidden"], LLAVA_7B["layers"])}.items():
        flops = {v: step_flops(prm, c, image_tokens, d, n) for v, c in tokens.items()}
        out[label] = {name: flops[num] / flops[den] for name, (num, den, kind, _) in RATIOS.items()
                      if kind == "seconds" and num in flops and den in flops}
        if "mcm" in tokens and "trl_dpo" in tokens:  # a whole run (bench_run.py): the cached reference's forward too
            with_reference = step_flops(prm, dict(tokens["mcm"], reference_forward=True), image_tokens, d, n)
            out[label][RUN_RATIO] = with_reference / flops["trl_dpo"]
    return out


# ---------------------------------------------------------------------------------------------
# Memory, in a fresh process per variant


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class MemoryProbe:
    """Peak memory growth: CUDA allocator statistics, or the process's resident-set high-water mark."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM after clear_refs=5"

    def _settle(self) -> None:
        gc.collect()
        if not self.cuda:
            try:
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so RSS is what is live
            except OSError:
                pass

    def current(self) -> int:
        import torch

        self._settle()
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _proc_status_kb("VmRSS") * 1024

    def reset_peak(self) -> None:
        import torch

        self._settle()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.method = "VmHWM (not resettable here: includes loading)"

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _proc_status_kb("VmHWM") * 1024


def memory_child(variant: str, work: str, result: str) -> None:
    """Runs in a fresh process: batches, then model/optimizer, then steps; writes the peak to ``result``."""
    import torch

    warnings.filterwarnings("ignore")
    meta = json.loads((Path(work) / "meta.json").read_text())
    torch.set_num_threads(meta["threads"])
    _quiet()
    from transformers import AutoProcessor

    dtype = getattr(torch, meta["dtype"])
    work_p = Path(work)
    processor = AutoProcessor.from_pretrained(meta["model_dir"])
    data = Data(Path(meta["data_path"]), processor, meta["seed"], meta.get("batch_size", 1))
    if variant not in TRL_VARIANTS:
        batches = data.project_batches(variant)
    else:
        data.trl_examples()  # images opened and padded before the baseline, like the project's batches
    tables = torch.load(work_p / "reference.pt") if (work_p / "reference.pt").is_file() else None
    probe = MemoryProbe(meta["device"])
    base = probe.current()
    if variant in TRL_VARIANTS:
        runner = make_runner(variant, Path(meta["model_dir"]), data, meta["device"], dtype, meta["seed"], work_p / "mem")
    else:
        table = (tables or {}).get("dpo" if variant == "dpo" else "mcm")
        runner = project_runner(variant, Path(meta["model_dir"]), data, meta["device"], dtype, meta["seed"],
                                work_p / "mem", table, meta.get("packed_attention", "sdpa_tree"))
        runner.set_batches(batches)
    loaded = probe.current()
    probe.reset_peak()
    for i in range(meta["memory_steps"]):
        runner.step(i)
    peak = probe.peak()
    Path(result).write_text(json.dumps({
        "variant": variant, "method": probe.method, "peak_mb": (peak - base) / MiB, "loaded_mb": (loaded - base) / MiB,
        "step_growth_mb": (peak - loaded) / MiB, "absolute_peak_mb": peak / MiB, "steps": meta["memory_steps"],
    }))


def measure_memory(variants, work: Path, ctx, timeout: float) -> dict:
    out = {}
    for v in variants:
        result = work / f"memory_{v}.json"
        proc = ctx.Process(target=memory_child, args=(v, str(work), str(result)), daemon=False)
        t0 = time.perf_counter()
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
        if proc.exitcode != 0 or not result.is_file():
            raise RuntimeError(f"memory run of {v} failed (exit code {proc.exitcode})")
        out[v] = json.loads(result.read_text())
        out[v]["wall_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------
# Reporting


def machine_info(device: str) -> dict:
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    info = {"nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu_model": cpu, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
            "torch_threads": torch.get_num_threads(), "device": device,
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def compute_ratios(seconds: dict, peaks: dict) -> dict:
    out = {}
    for name, (num, den, kind, target) in RATIOS.items():
        src = seconds if kind == "seconds" else peaks
        if num in src and den in src and src[den] > 0:
            value = src[num] / src[den]
            out[name] = {"value": value, "target": target, "pass": value <= target}
    return out


def paired_ratios(samples: dict) -> dict:
    """Median over rounds of each round's own time ratio: the variants of a round run back to back, so a
    change of machine load between rounds cancels out (the headline ratios use the medians, as asked)."""
    out = {}
    for name, (num, den, kind, target) in RATIOS.items():
        if kind == "seconds" and num in samples and den in samples:
            value = statistics.median(a / b for a, b in zip(samples[num], samples[den]))
            out[name] = {"value": value, "target": target, "pass": value <= target}
    return out


def print_report(res: dict) -> None:
    sec, smin, peak = res["seconds_per_step"], res["seconds_per_step_min"], res["peak_mem_mb"]
    print()
    print(f"{'variant':<15} {'median s/step':>14} {'min s/step':>11} {'peak MB':>9} {'tokens/step':>12} {'tok/s':>9} "
          f"{'naive-eq tok/s':>15}" + ("  MFU" if res.get("mfu") else ""))
    for v in res["variants"]:
        t = res["tokens"].get(v, {})
        tps = res["tokens_per_second"].get(v, {})
        mfu = f"  {100 * res['mfu'][v]:.1f}%" if res.get("mfu") else ""
        print(f"{v:<15} {sec[v]:>14.3f} {smin[v]:>11.3f} {peak.get(v, float('nan')):>9.0f} {t.get('tokens', 0):>12.0f} "
              f"{tps.get('distinct', 0):>9.0f} {tps.get('naive_equivalent', 0):>15.0f}{mfu}")
    print()
    paired, mins = res.get("ratios_paired_by_round", {}), res.get("ratios_of_minimums", {})
    bare, work = res.get("ratios_without_update", {}), res.get("work_ratios", {})
    model_work, work_7b = work.get("benchmark model", {}), work.get("LLaVA-1.5-7B shapes", {})

    def cell(table: dict, name: str, width: int) -> str:
        value = table.get(name)
        return f"{(value['value'] if isinstance(value, dict) else value):{width}.3f}" if value is not None else " " * width

    print(f"{'ratio':<24} {'of medians':>10}  {'target':<8} {'':<4}  {'paired/round':>12} {'of minimums':>11} "
          f"{'w/o update':>10} {'work':>6} {'work 7B':>8}")
    for name, r in res["ratios"].items():
        print(f"{name:<24} {r['value']:10.3f}  <= {r['target']:<5} {'PASS' if r['pass'] else 'MISS':<4}  "
              f"{cell(paired, name, 12)} {cell(mins if name in paired else {}, name, 11)} {cell(bare, name, 10)} {cell(model_work, name, 6)} "
              f"{cell(work_7b, name, 8)}")
    if RUN_RATIO in model_work:
        print(f"{RUN_RATIO:<24} {'(bench_run.py: a whole run, its target <= 1.0)':<74} {model_work[RUN_RATIO]:6.3f} "
              f"{work_7b.get(RUN_RATIO, float('nan')):8.3f}")
    if update := res.get("update_seconds_per_step"):
        print("w/o update: medians less each variant's optimizer update (clip, AdamW, zero_grad; median s: "
              + ", ".join(f"{v} {s:.3f}" for v, s in update.items()) + ")")
        print("work: the same ratio of step_flops (the arithmetic each step needs, head where it runs); work 7B: "
              "the same tokens at LLaVA-1.5-7B's shapes")
    print()
    print("trl_dpo / trl_dpo_stock include TRL's reference forward (TRL refuses cached reference log-probs for image "
          "data); naive_mcm / mcm / dpo use cached reference log-probs (no reference forward).")
    c = res["checks"]
    if "mcm_vs_naive" in c:
        m = c["mcm_vs_naive"]
        print(f"equal work, mcm vs naive_mcm: log-probs rel {m['logps_max_rel']:.1e}, loss rel {m['loss_cached_rel']:.1e} "
              f"(shifted reference {m['loss_shifted_rel']:.1e}) -> {'OK' if m['passed'] else 'MISMATCH'}")
    if "trl_vs_dpo" in c:
        t = c["trl_vs_dpo"]
        rels = ", ".join(f"{k[:-len('_logps_max_rel')]} {v:.1e}" for k, v in t.items() if k.endswith("_logps_max_rel"))
        print(f"equal work, TRL vs dpo: same token ids {t.get('same_token_ids')}, pixels max diff "
              f"{t.get('pixels_max_abs_diff', float('nan')):.1e}, log-probs rel {rels} -> {'OK' if t['passed'] else 'MISMATCH'}")
    print(f"memory: {res['memory_method']}")
    m = res["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), torch threads {m['torch_threads']}, load average "
          f"{m['loadavg_start']} -> {m.get('loadavg_end')}" + (f", GPU {m['gpu']}" if m.get("gpu") else ""))


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    import logging

    for name in ("trl", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# How the cost grows (--scaling): one axis at a time from a base point


SCALING_VARIANTS = ("mcm", "dpo", "trl_dpo")
# axis -> values; the first value of each axis is the base point's. Image tokens: the square grids of
# 14-px patches nearest to LLaVA-NeXT anyres's 576 / 1152 / 2880 (336, 476, 756 px: 24^2, 34^2, 54^2).
SCALING_AXES = {"image_tokens": (576, 1156, 2916), "context_tokens": (100, 400, 1600), "batch": (1, 4)}
SCALING_QUICK_AXES = {"image_tokens": (576, 1156), "context_tokens": (100, 400), "batch": (1, 2)}


def scaling_points(axes: dict) -> list[dict]:
    """The base point, then each axis's other values with the rest at base: every axis's second value
    before any third one, so a run cut short still has two points on every axis."""
    base = {k: v[0] for k, v in axes.items()}
    longest = max(len(v) for v in axes.values())
    return [dict(base)] + [dict(base, **{k: values[i]}) for i in range(1, longest) for k, values in axes.items()
                           if i < len(values)]


def growth_per_doubling(sizes, values) -> float:
    """``2 ** slope`` of the least-squares line of log(value) on log(size): how the value multiplies when the size doubles."""
    import math

    xs, ys = [math.log2(x) for x in sizes], [math.log2(y) for y in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return 2 ** slope


def scaling_point(point: dict, a, work: Path, models: dict) -> dict:
    """Median seconds per step and the step's memory growth of each scaling variant at one grid point."""
    import torch
    from dataclasses import replace

    from transformers import AutoProcessor

    image_px = {n: 14 * round(n ** 0.5) for n in SCALING_AXES["image_tokens"] + SCALING_QUICK_AXES["image_tokens"]}
    size = replace(PRESETS[a.preset], image_size=image_px[point["image_tokens"]])
    if size.image_tokens != point["image_tokens"]:
        raise ValueError(f"{point['image_tokens']} image tokens is not a square grid of 14-px patches")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model_dir = work / f"model_{size.image_size}px"
    if model_dir not in models:
        models[model_dir] = write_checkpoint(model_dir, size, a.seed, a.device, dtype)
    processor = AutoProcessor.from_pretrained(model_dir)
    name = "_".join(f"{k}{v}" for k, v in point.items())
    records = 2 * point["batch"]  # two different batches to cycle through
    ctx = (point["context_tokens"], point["context_tokens"])
    # 2916 image tokens or a 1600-token context do not fit the main run's 2048-token limit
    data = Data(write_records(work / name, processor.tokenizer, records, a.seed, ctx), processor, a.seed, point["batch"],
                max_length=8192)
    runners = {v: make_runner(v, model_dir, data, a.device, dtype, a.seed, work / name / "runs") for v in SCALING_VARIANTS}
    reference_tables(runners)
    probe = MemoryProbe(a.device)
    times: dict[str, list[float]] = {v: [] for v in SCALING_VARIANTS}
    growth: dict[str, float] = {}
    for rnd in range(a.warmup + a.steps):
        order = list(SCALING_VARIANTS[rnd % 3:] + SCALING_VARIANTS[:rnd % 3])
        for v in order:
            measure = rnd == a.warmup  # the first timed round: AdamW's state exists already (after warm-up)
            if measure:
                before = probe.current()
                probe.reset_peak()
            seconds, _ = runners[v].step(rnd)
            if measure:
                growth[v] = (probe.peak() - before) / MiB
            if rnd >= a.warmup:
                times[v].append(seconds)
    tokens = token_counts(runners, data)
    del runners
    gc.collect()
    out = {"point": point, "image_px": size.image_size, "records": records,
           "seconds_per_step": {v: statistics.median(t) for v, t in times.items()}, "seconds_samples": times,
           "step_peak_mb": growth, "tokens_per_step": {v: tokens[v]["tokens"] for v in SCALING_VARIANTS},
           "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print(f"{name}: " + ", ".join(f"{v} {out['seconds_per_step'][v]:.2f}s {growth[v]:.0f}MB" for v in SCALING_VARIANTS),
          flush=True)
    return out


def scaling_fits(points: list[dict], axes: dict) -> dict:
    """Per axis and variant: how seconds per step and step memory multiply when the axis doubles."""
    base = {k: v[0] for k, v in axes.items()}
    fits = {}
    for axis in axes:
        on_axis = [p for p in points if all(p["point"][k] == base[k] for k in axes if k != axis)]
        sizes = [p["point"][axis] for p in on_axis]
        if len(set(sizes)) < 2:
            continue  # a run cut short before this axis moved
        fits[axis] = {v: {"seconds": growth_per_doubling(sizes, [p["seconds_per_step"][v] for p in on_axis]),
                          "memory": growth_per_doubling(sizes, [max(p["step_peak_mb"][v], 1.0) for p in on_axis])}
                      for v in SCALING_VARIANTS}
    return fits


def print_scaling(res: dict) -> None:
    print()
    head = f"{'image tok':>9} {'context':>7} {'batch':>5} " + " ".join(f"{v + ' s':>10} {v + ' MB':>11}" for v in SCALING_VARIANTS)
    print(head + f" {'mcm/trl_dpo':>11}")
    for p in res["points"]:
        pt = p["point"]
        cells = " ".join(f"{p['seconds_per_step'][v]:>10.2f} {p['step_peak_mb'][v]:>11.0f}" for v in SCALING_VARIANTS)
        ratio = p["seconds_per_step"]["mcm"] / p["seconds_per_step"]["trl_dpo"]
        print(f"{pt['image_tokens']:>9} {pt['context_tokens']:>7} {pt['batch']:>5} {cells} {ratio:>11.2f}")
    print()
    print("growth when the axis doubles (x time, x step memory), least-squares fit on log-log over the axis's points:")
    for axis, per in res["fits"].items():
        print(f"  {axis:<15} " + "  ".join(f"{v} x{f['seconds']:.2f} t, x{f['memory']:.2f} mem" for v, f in per.items()))
    print("MB: growth of the resident high-water mark over one step (activations and temporaries); weights, gradients "
          "and AdamW state are the same at every point and left out. trl_dpo includes its reference forward.")


def run_scaling(a, work: Path) -> dict:
    import torch

    _quiet()
    torch.set_num_threads(a.threads)
    axes = SCALING_QUICK_AXES if a.quick else SCALING_AXES
    models: dict = {}
    t0 = time.perf_counter()
    res = {"scaling": True, "axes": axes, "points": [], "variants": list(SCALING_VARIANTS),
           "settings": {"steps": a.steps, "warmup": a.warmup, "preset": a.preset, "dtype": a.dtype, "threads": a.threads},
           "machine": machine_info(a.device), "command": shlex.join(["python", "benchmarks/bench_step.py", *sys.argv[1:]])}
    for pt in scaling_points(axes):
        res["points"].append(scaling_point(pt, a, work, models))
        res["wall_seconds"] = time.perf_counter() - t0
        if a.json:  # after every point, so a run cut short keeps what it measured
            write_json(a.json, res)
    res["fits"] = scaling_fits(res["points"], axes)
    return res


# ---------------------------------------------------------------------------------------------
# Dry run (no allocation) and the main run


def dry_run(a) -> dict:
    p = PRESETS[a.preset]
    model, _ = build("llava", a.seed, p, device="meta")
    params = param_counts(model)
    bytes_per = 2 if a.dtype == "bf16" else 4
    trainable = params["language"] + params["head"] + params["embeddings"] + params["projector"]
    weights_gb = params["total"] * bytes_per / 1e9
    # weights + gradients + AdamW's two moments (same dtype as the weights) per variant, plus TRL's reference copies
    train_gb = (params["total"] + 3 * trainable) * bytes_per / 1e9
    n_trl = sum(v in TRL_VARIANTS for v in a.variants)
    resident = len(a.variants) * train_gb + n_trl * weights_gb
    return {"dry_run": True, "preset": a.preset, "config": asdict(p), "params": params, "image_tokens": p.image_tokens,
            "dtype": a.dtype, "device": a.device, "variants": list(a.variants),
            "estimated_resident_gb_timing_process": resident, "estimated_per_variant_gb": train_gb,
            "command": shlex.join(["python", "benchmarks/bench_step.py", *sys.argv[1:]])}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--quick", action="store_true", help="CI: 1 step, no warm-up, 2 records, 1 memory step")
    ap.add_argument("--records", type=int, default=4, help="preference records (steps cycle through them; >= 2)")
    ap.add_argument("--memory_steps", type=int, default=2, help="steps run in each memory process")
    ap.add_argument("--no_memory", action="store_true", help="skip the memory processes (peak_mem_mb left out)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--packed_attention", choices=["sdpa_tree", "sdpa"], default="sdpa_tree",
                    help="the packed rows' kernel: sdpa_tree (masked-out pairs skipped; what the trainer's auto picks) or "
                         "sdpa (the dense tree mask, every pair computed: the previous figures)")
    ap.add_argument("--peak_tflops", type=float, default=None,
                    help="the device's peak dense matrix TFLOP/s for the MFU column (default with --device cuda: 989, "
                         "H100 SXM dense bf16; on the CPU no MFU unless given)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scaling", action="store_true",
                    help="how seconds per step and step memory of mcm, dpo and trl_dpo grow with image tokens (576/1156/2916), "
                         "context (100/400/1600 tokens) and batch (1/4), one axis at a time (with --quick: a 2-value grid)")
    ap.add_argument("--dry_run", action="store_true", help="build the configs and count parameters on the meta device; no run")
    ap.add_argument("--workdir", help="keep models, data and results here instead of a temporary directory")
    a = ap.parse_args(argv)
    if a.peak_tflops is None and a.device == "cuda":
        a.peak_tflops = 989.0
    if a.quick:
        a.steps, a.warmup, a.records, a.memory_steps = 1, 0, 2, 1
    elif a.scaling and "--steps" not in (argv if argv is not None else sys.argv):
        a.steps, a.warmup = 2, 1  # 6 grid points x 3 variants: keep the full grid to minutes on a CPU
    if a.records < 2:
        ap.error("--records must be >= 2 (context swapping needs another record)")
    if a.steps < 1 or a.warmup < 0 or a.memory_steps < 1:
        ap.error("--steps >= 1, --warmup >= 0, --memory_steps >= 1")
    return a


def run(a, work: Path, ctx) -> dict:
    import torch

    _quiet()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    p = PRESETS[a.preset]
    machine = machine_info(a.device)
    t_setup = time.perf_counter()
    model_dir = work / "model"
    facts = write_checkpoint(model_dir, p, a.seed, a.device, dtype)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    data_path = write_records(work / "data", processor.tokenizer, a.records, a.seed)
    data = Data(data_path, processor, a.seed)
    variants = list(a.variants)
    runners = {v: make_runner(v, model_dir, data, a.device, dtype, a.seed, work / "runs", packed_attention=a.packed_attention)
               for v in variants}
    tables = reference_tables(runners)
    torch.save(tables, work / "reference.pt")
    checks = {}
    tol = REL_TOL if dtype == torch.float32 else BF16_REL_TOL
    if {"mcm", "naive_mcm"} <= set(runners):
        checks["mcm_vs_naive"] = check_mcm_vs_naive(runners, tables, tol)
    if "dpo" in runners and set(TRL_VARIANTS) & set(runners):
        checks["trl_vs_dpo"] = check_trl_vs_dpo(runners, data, tables, tol)
    tokens = token_counts(runners, data, a.packed_attention)
    setup_s = time.perf_counter() - t_setup
    print(f"setup {setup_s:.0f}s: {facts['params']['total'] / 1e6:.1f}M parameters, tokenizer {facts['tokenizer_vocab']} "
          f"tokens (model vocabulary {facts['config_vocab_size']}), {a.records} records; timing {a.warmup} + {a.steps} "
          f"rounds of {len(variants)} variants", flush=True)

    # Timing: round-robin, the starting variant rotating each round.
    loadavg_rounds = []
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, list[float]] = {v: [] for v in variants}
    for rnd in range(a.warmup + a.steps):
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        this_round = {}
        for v in order:
            this_round[v], loss = runners[v].step(rnd)
            losses[v].append(loss)
            if rnd >= a.warmup:
                times[v].append(this_round[v])
        loadavg_rounds.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        print(f"round {rnd + 1}/{a.warmup + a.steps}{' (warm-up)' if rnd < a.warmup else ''}: "
              + ", ".join(f"{v} {this_round[v]:.2f}s" for v in variants), flush=True)
    if "mcm_vs_naive" in checks:
        # the first optimizer step of both ran on record 0 from the same weights
        m = checks["mcm_vs_naive"]
        m["first_step_loss_rel"] = _rel(losses["naive_mcm"][0], losses["mcm"][0])
        m["passed"] = m["passed"] and m["first_step_loss_rel"] <= tol
    update = {v: statistics.median(runners[v].update_seconds[a.warmup:]) for v in variants}
    any_runner = next(iter(runners.values()))
    optimizer = f"{type(any_runner.trainer.optimizer).__name__} (TrainingArguments.optim={any_runner.trainer.args.optim})"
    del runners, any_runner
    gc.collect()
    if a.device == "cuda":
        torch.cuda.empty_cache()  # the memory processes need the GPU this one no longer uses

    memory = {}
    if not a.no_memory:
        (work / "meta.json").write_text(json.dumps({
            "model_dir": str(model_dir), "data_path": str(data_path), "seed": a.seed, "device": a.device,
            "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32", "threads": a.threads,
            "memory_steps": a.memory_steps, "packed_attention": a.packed_attention}))
        memory = measure_memory(variants, work, ctx, timeout=1800)

    seconds = {v: statistics.median(times[v]) for v in variants}
    peaks = {v: memory[v]["peak_mb"] for v in memory}
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    machine["loadavg_1min_after_each_round"] = loadavg_rounds
    tps = {v: {"distinct": tokens[v]["tokens"] / seconds[v], "naive_equivalent": tokens[v]["naive_equivalent_tokens"] / seconds[v]}
           for v in variants}
    image_tokens = p.image_tokens
    hidden, layers = p.text_hidden, p.text_layers
    flops = {v: step_flops(facts["params"], tokens[v], image_tokens, hidden, layers) for v in variants}
    res = {
        "seconds_per_step": seconds,
        "seconds_per_step_min": {v: min(times[v]) for v in variants},
        "seconds_per_step_samples": times,
        "peak_mem_mb": peaks,
        "memory": memory,
        "memory_method": (f"{memory[next(iter(memory))]['method']}: peak minus the footprint before the model was loaded, "
                          f"in a fresh process per variant ({a.memory_steps} step(s))" if memory else "not measured"),
        "ratios": compute_ratios(seconds, peaks),
        "ratios_of_minimums": compute_ratios({v: min(times[v]) for v in variants}, peaks),
        "ratios_paired_by_round": paired_ratios(times),
        # the part of a step every variant pays alike (AdamW over all trainable weights), and the
        # ratios with it left out: what the step's own work costs
        "update_seconds_per_step": update,
        "ratios_without_update": compute_ratios({v: seconds[v] - update[v] for v in variants}, {}),
        # the ratios the arithmetic alone would give (step_flops), here and at LLaVA-1.5-7B's shapes
        "work_ratios": work_ratios({v: tokens[v] for v in variants}, facts["params"], image_tokens, hidden, layers),
        "checks": checks,
        "tokens": tokens,
        "tokens_per_second": tps,
        "flops_per_step": flops,
        "achieved_tflops": {v: flops[v] / seconds[v] / 1e12 for v in variants},
        "mfu": {v: flops[v] / seconds[v] / (a.peak_tflops * 1e12) for v in variants} if a.peak_tflops else None,
        "peak_tflops": a.peak_tflops,
        "losses": losses,
        "variants": variants,
        "model": {"preset": a.preset, "config": asdict(p), "params": facts["params"], "tokenizer_vocab": facts["tokenizer_vocab"],
                  "config_vocab_size": facts["config_vocab_size"], "dtype": a.dtype, "image_tokens": image_tokens},
        "settings": {"steps": a.steps, "warmup": a.warmup, "records": a.records, "batch_size": 1, "learning_rate": LEARNING_RATE,
                     "beta": BETA, "optimizer": optimizer, "max_grad_norm": 1.0,
                     "trainable": "language model + projector (vision tower frozen)", "gradient_checkpointing": False,
                     "attn_implementation": {v: attention_of(v, a.packed_attention) if v not in TRL_VARIANTS else "sdpa"
                                             for v in variants},
                     "setup_seconds": setup_s},
        "notes": [
            "trl_dpo and trl_dpo_stock include TRL's reference forward: TRL refuses precomputed reference "
            "log-probs for image data. naive_mcm, mcm and dpo use cached reference log-probs (no reference forward).",
            "trl_dpo: TRL's fused log-prob head limited to answer positions (its CUDA/Triton path); trl_dpo_stock: unpatched "
            "(on a CPU: full vocabulary at every position; on a GPU the two are the same).",
        ],
        "machine": machine,
        "command": shlex.join(["python", "benchmarks/bench_step.py", *sys.argv[1:]]),
    }
    return res



def in_workdir(workdir: str | None, prefix: str, fn):
    """``fn(folder)`` in ``--workdir`` (made if needed, kept) when given, else in a temporary folder removed after."""
    if workdir:
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
        return fn(work)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        return fn(Path(tmp))


def write_json(path: str | Path, res: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(res, indent=1))


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.dry_run:
        res = dry_run(a)
        pr = res["params"]
        print(f"preset {a.preset}: {pr['total'] / 1e9:.3f}B parameters (language {pr['language'] / 1e6:.0f}M + embeddings "
              f"{pr['embeddings'] / 1e6:.0f}M, vision {pr['vision'] / 1e6:.0f}M, projector {pr['projector'] / 1e6:.1f}M); "
              f"{res['image_tokens']} image tokens; est. {res['estimated_resident_gb_timing_process']:.0f} GB resident "
              f"in the timing process ({a.dtype}, {len(a.variants)} variants)")
        if a.json:
            write_json(a.json, res)
        return 0
    if a.scaling:
        res = in_workdir(a.workdir, "bench_scaling_", lambda work: run_scaling(a, work))
        print_scaling(res)
        if a.json:
            write_json(a.json, res)
        return 0
    import multiprocessing as mp

    # Memory processes fork from a server that has the libraries imported already (no re-import per variant).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "trl", "llava.train.trainer", "llava.data.datasets",
                                "llava.model.load", "datasets"])
    if not a.no_memory:
        from multiprocessing import forkserver

        forkserver.ensure_running()  # the server imports while this process sets up (setup is not timed)
    res = in_workdir(a.workdir, "bench_step_", lambda work: run(a, work, ctx))
    print_report(res)
    if a.json:
        write_json(a.json, res)
    ok = all(c.get("passed", True) for c in res["checks"].values())
    if not ok:
        print("equal-work check FAILED (see above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
