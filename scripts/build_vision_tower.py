"""Train the demo's small CLIP vision tower on drawn scenes, contrastively, the way CLIP is trained.

    python scripts/build_vision_tower.py --out llava/model/assets/sample_clip [--seed 0] [--steps 400]

The result is a plain transformers ``CLIPModel`` directory (config, safetensors, CLIP image
processor, the word-level tokenizer of its text side), laid out like OpenAI's released CLIP, so
the demo composes it with a language model by the same path as CLIP ViT-L/14-336 with Vicuna
(``llava.model.load.compose``). Only the vision half is used by LLaVA.

Data: scenes drawn by ``scripts/make_sample_data.py`` (fresh ones every step, from this script's
own seed stream), each captioned with every visual fact of both of its things. Half of each batch
are "twins": the same scene with one visual fact changed (a colour, a count, a shape, the tallest
bar), so telling an image's caption from its twin's needs exactly the facts alt-text must state.
Objective: ``CLIPModel(..., return_loss=True)``, the symmetric InfoNCE loss of CLIP.

Deterministic: one CPU thread and deterministic algorithms, so the same arguments give the same
bytes (``tests/test_build_vision_tower.py`` checks it at a reduced size).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llava.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402


def _load_sample_data():
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO / "scripts" / "make_sample_data.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_sample_data"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


msd = _load_sample_data()

SPECIALS = ("<pad>", "<|startoftext|>", "<unk>", "<|endoftext|>")  # the end token's id is 3, not 2 (see build_tokenizer)


def twin(scene, rng: random.Random):
    """``scene`` with one visual fact of one of its two things changed (drawn as changed)."""
    name = rng.choice(msd.FOCI[scene.kind])
    obj = scene.objects[name]
    new = msd.wrong_detail(scene, name, rng)
    if isinstance(obj, msd.Group) and new.count != obj.count:  # the shapes must be placed again
        new = msd._place_group(rng, new.colour, new.shape, new.count, obj.box)
    return replace(scene, objects={**scene.objects, name: new})


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[^\sa-z]", text.lower())


def vocabulary() -> list[str]:
    """Every word the captions can use: all templates filled with every value they can take."""
    vocab: set[str] = set()
    fills = dict(metric=" ".join(msd.METRICS), n=" ".join(msd.COUNT_WORDS.values()), c=" ".join(msd.COLOUR_NAMES),
                 s=" ".join(msd.SIGN_SHAPES), w=" ".join(msd.SIGN_WORD_LIST),
                 p=" ".join(msd.COUNT_WORDS.values()) + " " + " ".join(msd.COLOUR_NAMES) + " "
                 + " ".join(s + " " + s + "s" for s in msd.SHAPES),
                 loc=" ".join(msd.LOCATIONS.values()))
    for t in msd.GROUP_TEMPLATES + msd.CHART_TEMPLATES + msd.SIGN_TEMPLATES:
        vocab.update(words(t.format(**fills)))
    return list(SPECIALS) + sorted(vocab)


def build_tokenizer(max_length: int):
    """A word-level ``PreTrainedTokenizerFast`` over ``vocabulary()``: ``<|startoftext|> words <|endoftext|>``.

    CLIP's text model pools at the first end token, unless the end token's id is 2 (a legacy
    rule that pools at the largest id instead), hence the order of ``SPECIALS``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation marks, as `words` splits
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<unk>", model_max_length=max_length)


def batch(rng: random.Random, pairs: int, image_processor, tokenizer, image_size: int):
    """``pairs`` scenes and their twins: pixel values, input ids and attention masks."""
    scenes = []
    for _ in range(pairs):
        s = msd.sample_scene(rng)
        scenes += [s, twin(s, rng)]
    images = [msd.draw_scene(s, image_size) for s in scenes]
    texts = [msd.caption(s, rng) for s in scenes]
    pixels = image_processor(images, return_tensors="pt")["pixel_values"]
    text = tokenizer(texts, padding=True, return_tensors="pt")
    return pixels, text["input_ids"], text["attention_mask"]


def build_config(image_size: int, vocab_size: int, max_length: int, eos_token_id: int, *, hidden: int, layers: int):
    from transformers import CLIPConfig

    vision = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                  image_size=image_size, patch_size=14, projection_dim=hidden)
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=max_length, projection_dim=hidden, pad_token_id=0, bos_token_id=1,
                eos_token_id=eos_token_id)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden)


@torch.no_grad()
def twin_accuracy(model, pixels, ids, mask) -> tuple[float, float]:
    """(share of images whose own caption beats their twin's, share whose caption is the best in the batch)."""
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    sim = out.logits_per_image
    own = sim.diagonal()
    twin_of = torch.arange(len(own)) ^ 1  # 0<->1, 2<->3, ...
    beats_twin = (own > sim[torch.arange(len(own)), twin_of]).float().mean().item()
    best = (sim.argmax(1) == torch.arange(len(own))).float().mean().item()
    return beats_twin, best


def train_tower(out: str | Path, *, seed: int = 0, steps: int = 400, pairs: int = 64, lr: float = 1e-3,
                image_size: int = 112, hidden: int = 96, layers: int = 3, log_every: int = 100) -> dict:
    from transformers import CLIPImageProcessorPil, CLIPModel

    torch.set_num_threads(1)  # reductions in one fixed order: the same bytes on every run
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    max_length = 64
    tokenizer = build_tokenizer(max_length)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    config = build_config(image_size, len(tokenizer), max_length, tokenizer.eos_token_id, hidden=hidden, layers=layers)
    model = CLIPModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps))))
    train_rng, held_rng = random.Random(f"tower:{seed}:train"), random.Random(f"tower:{seed}:held-out")
    held = batch(held_rng, 128, image_processor, tokenizer, image_size)
    model.train()
    for step in range(1, steps + 1):
        pixels, ids, mask = batch(train_rng, pairs, image_processor, tokenizer, image_size)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            model.eval()
            beats, best = twin_accuracy(model, *held)
            model.train()
            print(f"step {step:5d}  loss {loss.item():.4f}  held-out: caption beats twin's {100 * beats:.1f}%, "
                  f"best of 256 {100 * best:.1f}%", flush=True)
    model.eval()
    beats, best = twin_accuracy(model, *held)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"beats_twin": beats, "best_of_batch": best, "parameters": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write the CLIPModel to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--pairs", type=int, default=64, help="scenes per batch; each comes with its twin")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=96, help="vision tower width")
    p.add_argument("--layers", type=int, default=3, help="vision tower depth")
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--log_every", type=int, default=100)
    a = p.parse_args(argv)
    r = train_tower(a.out, seed=a.seed, steps=a.steps, pairs=a.pairs, lr=a.lr, image_size=a.image_size,
                    hidden=a.hidden, layers=a.layers, log_every=a.log_every)
    print(f"wrote CLIPModel ({r['parameters']} parameters) to {a.out}: held-out caption beats its twin's "
          f"{100 * r['beats_twin']:.1f}%, best of 256 {100 * r['best_of_batch']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
