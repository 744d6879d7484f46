"""Tiny LLaVA checkpoints built locally: random weights, a locally trained tokenizer.

    python -m llava.model.tiny --out DIR --arch {llava,llava_next,llama} [--seed N] [--size tiny|small]

The directory is a complete HF-format checkpoint (config, safetensors, CLIP image processor,
Llama-style BPE tokenizer with the Vicuna v1 special tokens and chat template) that plain
transformers loads with ``AutoProcessor`` / ``AutoModelForImageTextToText``. It is the default
model of every test and of the demo: nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from llava.flags import FlagParser
from llava.constants import DEFAULT_IMAGE_TOKEN, PAD_TOKEN
from llava.conversation import VICUNA_V1_CHAT_TEMPLATE
from llava.model.parts import clip_image_settings, default_pinpoints, llava_processor, set_generation_tokens
from llava.model.weights import save_llava_weights


@dataclass(frozen=True)
class TinySize:
    image_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vocab_size: int  # asked of the tokenizer trainer; the model's vocabulary is at least this
    patch_size: int = 14

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # the "default" feature strategy drops CLS


SIZES = {
    # Tests: 16 image tokens, a forward pass takes milliseconds.
    "tiny": TinySize(56, 32, 2, 2, 64, 2, 4, 128, 2000),
    # The demo: big enough to learn the sample corpus on 2 CPU cores in minutes.
    "small": TinySize(112, 64, 2, 4, 192, 4, 4, 512, 2000),
}


def tokenizer_corpus() -> Path:
    return Path(str(resources.files("llava.model") / "assets" / "tokenizer_corpus.txt"))


@lru_cache(maxsize=4)
def _trained_bpe(vocab_size: int) -> tuple[dict, list]:
    """Train a Llama-style BPE (metaspace, byte fallback) on the shipped corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    # Split on words while training so merges never cross a space, as in Llama's vocabulary.
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    bpe.train([str(tokenizer_corpus())], trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def build_tokenizer(vocab_size: int = 2000):
    """A ``LlamaTokenizer`` with <s>, </s>, <unk>, <image>, <pad> and the Vicuna v1 chat template."""
    from transformers import LlamaTokenizer

    vocab, merges = _trained_bpe(vocab_size)
    tok = LlamaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True, add_eos_token=False)
    tok.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": [DEFAULT_IMAGE_TOKEN]})
    tok.chat_template = VICUNA_V1_CHAT_TEMPLATE
    tok.model_max_length = 2048
    tok.padding_side = "right"
    return tok


def text_config(s: TinySize, tok):
    """The Llama configuration of a tiny language model of size ``s`` for tokenizer ``tok``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        # a tokenizer trained on the small shipped corpus may learn fewer tokens than asked for:
        # the embedding is then padded with unused rows up to the size asked
        vocab_size=max(len(tok), s.vocab_size), hidden_size=s.text_hidden, intermediate_size=s.text_intermediate,
        num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads, num_key_value_heads=s.text_heads,
        max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )


def build_language_model(seed: int = 0, size: str | TinySize = "tiny"):
    """Return ``(model, tokenizer)``: a plain tiny ``LlamaForCausalLM`` with seeded random weights.

    It stands where Vicuna stands in LLaVA: ``llava.model.load.compose`` joins it with a CLIP
    vision tower directory into a new LLaVA.
    """
    from transformers import LlamaForCausalLM

    s = SIZES[size] if isinstance(size, str) else size
    tok = build_tokenizer(s.vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(text_config(s, tok))
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    return model.eval(), tok


def build(arch: str = "llava", seed: int = 0, size: str | TinySize = "tiny", device: str | torch.device | None = None):
    """Return ``(model, processor)`` of a tiny LLaVA-1.5 or LLaVA-NeXT with seeded random weights.

    ``size`` names one of ``SIZES`` or gives its own ``TinySize`` (the step benchmark's larger
    models); ``device`` is where the weights are created (``"meta"``: sizes only, nothing allocated).
    """
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    if arch not in ("llava", "llava_next"):
        raise ValueError(f"--arch must be llava or llava_next, got {arch!r}")
    s = SIZES[size] if isinstance(size, str) else size
    tok = build_tokenizer(s.vocab_size)
    vision = CLIPVisionConfig(
        hidden_size=s.vision_hidden, intermediate_size=4 * s.vision_hidden, num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads, image_size=s.image_size, patch_size=s.patch_size, projection_dim=s.vision_hidden,
    )
    text = text_config(s, tok)
    common = dict(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    pinpoints = default_pinpoints(s.image_size) if arch == "llava_next" else None
    processor = llava_processor(tok, clip_image_settings(None, s.image_size), patch_size=s.patch_size, pinpoints=pinpoints)
    torch.manual_seed(seed)
    with torch.device(device) if device else contextlib.nullcontext():  # weights are made where they will live
        if arch == "llava":
            model = LlavaForConditionalGeneration(LlavaConfig(**common))
        else:
            model = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=pinpoints, **common))
    set_generation_tokens(model, tok)
    return model.eval(), processor


def write(out: str | Path, arch: str = "llava", seed: int = 0, size: str = "tiny") -> Path:
    """Build a tiny checkpoint (``arch`` llama: a plain language model) and save it to ``out`` in HF format."""
    model, processor = build_language_model(seed, size) if arch == "llama" else build(arch, seed, size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if arch == "llama":
        model.save_pretrained(out)
    else:
        save_llava_weights(model, out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write the checkpoint to")
    p.add_argument("--arch", choices=["llava", "llava_next", "llama"], default="llava",
                   help="llama: a plain language model, to compose with a vision tower (llava.model.load.compose)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    a = p.parse_args(argv)
    out = write(a.out, a.arch, a.seed, a.size)
    print(f"wrote tiny {a.arch} ({a.size}, seed {a.seed}) to {out}")


if __name__ == "__main__":
    main()
