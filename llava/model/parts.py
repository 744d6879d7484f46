"""What loading, composing, converting and saving a LLaVA share: the image and text parts of a processor,
vocabulary growth, dtypes, anyres tiles in one batch tensor and the HF save. ``llava.model.load`` (hub
names, LoRA, compose), ``llava.model.original_layout`` (LLaVA's own layout) and the collators build on
it; it imports none of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PAD_TOKEN
from llava.conversation import VICUNA_V1_CHAT_TEMPLATE


class ModelLoadError(ValueError):
    """A model path that cannot be loaded, with the reason in words."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read ({e})")


def add_llava_tokens(tokenizer) -> None:
    """Add ``<image>`` (a special token) and ``<pad>`` when the tokenizer lacks them, in that order, as every
    LLaVA this package builds or converts has them; the embeddings grow to match (``grow_embeddings``)."""
    extra = {}
    if DEFAULT_IMAGE_TOKEN not in tokenizer.get_vocab():
        extra["additional_special_tokens"] = [DEFAULT_IMAGE_TOKEN]
    if tokenizer.pad_token is None:
        extra["pad_token"] = PAD_TOKEN
    if extra:
        tokenizer.add_special_tokens(extra)


def grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with rows appended up to ``rows``, each the mean of the existing rows (computed in float32):
    new tokens start where the old ones are on average, so the logits of the old tokens do not change."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0)


def parse_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from a dtype or its name (``float16``, ``torch.bfloat16``, ``bf16``, ``half``...); None
    for None or ``auto`` (the checkpoint's own)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    if name == "auto":
        return None
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


# Settings of a CLIP preprocessor_config.json that the image processors take.
CLIP_IMAGE_KEYS = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor", "do_normalize",
    "image_mean", "image_std", "do_convert_rgb",
)


def clip_image_settings(clip_dir: str | Path | None, image_size: int) -> dict:
    """Image processor settings: those saved with the CLIP tower (its preprocessor_config.json), over OpenAI
    CLIP's defaults at ``image_size`` (mean/std, bicubic, shortest edge = crop = the tower's image size)."""
    settings: dict = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                          image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), resample=3)
    saved = Path(clip_dir) / "preprocessor_config.json" if clip_dir is not None else None
    if saved is not None and saved.is_file():
        raw = read_json(saved)
        settings.update({k: raw[k] for k in CLIP_IMAGE_KEYS if raw.get(k) is not None})
        if isinstance(settings["size"], int):
            settings["size"] = {"shortest_edge": settings["size"]}
        if isinstance(settings["crop_size"], int):
            settings["crop_size"] = {"height": settings["crop_size"], "width": settings["crop_size"]}
    return settings


def default_pinpoints(side: int) -> list[list[int]]:
    """LLaVA-NeXT tile grids (height, width) for a new model whose tower sees ``side`` pixels."""
    return [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]


def llava_processor(tokenizer, image_settings: dict, *, patch_size: int, strategy: str = "default",
                    aspect_ratio: str = "square", pinpoints: list | None = None):
    """The native processor of a LLaVA: ``LlavaNextProcessor`` with its tiling image processor when
    ``pinpoints`` are given, else ``LlavaProcessor`` with the image processor ``aspect_ratio`` asks for
    (``pad``: the mean-colour square first, as LLaVA's ``expand2square``; ``square``: plain CLIP)."""
    from transformers import (CLIPImageProcessorPil, LlavaImageProcessorPil, LlavaNextImageProcessorPil,
                              LlavaNextProcessor, LlavaProcessor)

    if pinpoints:
        image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=[list(p) for p in pinpoints], **image_settings)
        processor_class = LlavaNextProcessor
    else:
        image_processor = (LlavaImageProcessorPil(do_pad=True, **image_settings) if aspect_ratio == "pad"
                           else CLIPImageProcessorPil(**image_settings))
        processor_class = LlavaProcessor
    return processor_class(image_processor, tokenizer, patch_size=patch_size, vision_feature_select_strategy=strategy,
                           num_additional_image_tokens=1, chat_template=VICUNA_V1_CHAT_TEMPLATE)


def set_generation_tokens(model, tokenizer) -> None:
    """The generation config's pad/eos/bos ids are the tokenizer's (generate pads and stops with them)."""
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))


def stack_tiles(tiles: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[N, P, 3, S, S]`` from N anyres images' ``[patches, 3, S, S]``, zero-padded to the most patches
    (the native LLaVA-NeXT classes read each image's real count from its ``image_sizes``)."""
    most = max(t.shape[0] for t in tiles)
    out = tiles[0].new_zeros(len(tiles), most, *tiles[0].shape[1:])
    for i, t in enumerate(tiles):
        out[i, : t.shape[0]] = t
    return out


def save_model(model, processor, out_dir: str | Path) -> Path:
    """Save in HF format (safetensors under the llava-hf names, config, processor) so plain transformers loads it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from llava.model.weights import save_llava_weights

    if hasattr(model, "peft_config"):  # a LoRA adapter: peft writes the adapter's own files
        model.save_pretrained(out, safe_serialization=True)
    else:
        save_llava_weights(model, out)
    processor.save_pretrained(out)
    return out
