"""LLaVA's ``load_pretrained_model``, as a thin adapter over ``llava.model.load``, for scripts written for LLaVA.

    tokenizer, model, image_processor, context_len = load_pretrained_model(model_path, model_base, model_name)
    output_ids = model.generate(input_ids, images=image_tensor, image_sizes=[image.size], max_new_tokens=64)

* The checkpoint is whatever ``load_model`` reads: an HF LLaVA / LLaVA-NeXT directory, a LoRA adapter on
  ``model_base`` (merged), or an original-format LLaVA directory, each also by hub name (``revision=`` pins
  the checkpoint's). ``model_name`` is accepted and not used:
  the directory's own files say what it is.
* ``model`` is a ``LlavaCompatModel``: the native transformers model behind LLaVA's calling convention.
  Its ``generate`` takes LLaVA's input ids, with one ``IMAGE_TOKEN_INDEX`` (-200) where each image goes,
  splices each image's projected features in (``llava.model.forward.image_features``, the same features
  training uses), left-pads several rows, and returns the new tokens only, as LLaVA's does. Every other
  attribute (``config``, ``device``, ``dtype``, ``eval``, ``generation_config``...) is the native model's.
* ``model.config.image_aspect_ratio`` is the checkpoint's when its config.json has one, else ``"pad"``
  (also for LLaVA-NeXT: one view, as the paper runs LLaVA-1.6); ``process_images`` reads it.
* ``image_processor`` is the checkpoint's HF image processor (``preprocess``, ``image_mean``, ``crop_size``).
* ``context_len`` is the language model's ``max_position_embeddings`` (2048 when it has none).
* 8-bit / 4-bit loading is not supported (``NotImplementedError``); ``device="cuda"`` without CUDA falls
  back to the CPU with a warning; ``device_map`` other than a device name is not used (one device).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model.parts import stack_tiles
from llava.model.forward import image_features, is_llava_next, unwrap
from llava.model.load import ModelLoadError, checkpoint_kind, load_model, lora_base, parse_dtype, resolve

__all__ = ["load_pretrained_model", "LlavaCompatModel"]


def _device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("load_pretrained_model: CUDA is not available; loading the model on the CPU", stacklevel=3)
        return torch.device("cpu")
    return device


def _checkpoint_config(path: Path, model_base) -> dict:
    """config.json of the directory holding the weights (the base's, for a LoRA adapter)."""
    if checkpoint_kind(path) == "lora":
        try:
            path = lora_base(path, model_base)
        except ModelLoadError:
            pass
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def load_pretrained_model(model_path, model_base, model_name, load_8bit=False, load_4bit=False, device_map="auto",
                          device="cuda", use_flash_attn=False, **kwargs):
    """``(tokenizer, model, image_processor, context_len)`` as LLaVA's function of this name returns them."""
    if load_8bit or load_4bit:
        raise NotImplementedError(
            "load_pretrained_model: 8-bit / 4-bit (bitsandbytes) loading is not supported by this package; "
            "load in 16 or 32 bits (drop load_8bit/load_4bit, or pass torch_dtype=torch.float16)"
        )
    if isinstance(device_map, str) and device_map not in ("auto", "") and device == "cuda":
        device = device_map  # "cpu", "cuda:1"...: LLaVA's one-device map
    dev = _device(device)
    dtype = parse_dtype(kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None))
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32  # LLaVA loads in fp16 on GPUs
    attn = kwargs.pop("attn_implementation", None)
    if use_flash_attn and attn is None:
        if dev.type == "cuda":
            attn = "flash_attention_2"
        else:
            warnings.warn("load_pretrained_model: use_flash_attn needs CUDA; using the default attention", stacklevel=2)
    vision_tower = kwargs.pop("vision_tower", None)
    model_path = resolve(model_path, kwargs.pop("revision", None))  # a hub name becomes its local snapshot
    if kwargs:
        raise TypeError(f"load_pretrained_model: unsupported arguments {sorted(kwargs)}")

    kind = checkpoint_kind(model_path)
    if model_base is not None and kind != "lora":
        warnings.warn(f"load_pretrained_model: model_base is only used for LoRA adapters; {model_path} is a full "
                      f"{kind} checkpoint, so {model_base} is ignored", stacklevel=2)
        model_base = None
    model, processor = load_model(model_path, model_base, dtype=dtype, merge_lora=True, vision_tower=vision_tower,
                                  attn_implementation=attn)
    model = unwrap(model).to(dev).eval()

    cfg = model.config
    ratio = _checkpoint_config(model_path, model_base).get("image_aspect_ratio") or getattr(cfg, "image_aspect_ratio", None)
    if ratio is None or (str(ratio).startswith("anyres") and not is_llava_next(model)):
        ratio = "pad"
    cfg.image_aspect_ratio = ratio
    if getattr(cfg, "mm_use_im_start_end", None) is None:
        cfg.mm_use_im_start_end = False  # LLaVA scripts branch on it; this package never wraps images in tags
    text_cfg = getattr(cfg, "text_config", cfg)
    context_len = getattr(text_cfg, "max_position_embeddings", None) or 2048
    return processor.tokenizer, LlavaCompatModel(model), processor.image_processor, context_len


class LlavaCompatModel:
    """A native LLaVA / LLaVA-NeXT model with LLaVA's ``generate(input_ids, images=..., image_sizes=...)``."""

    def __init__(self, model):
        self.__dict__["hf_model"] = model  # the native model; every attribute not defined here is its

    def __getattr__(self, name):
        return getattr(self.__dict__["hf_model"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["hf_model"], name, value)

    def __repr__(self) -> str:
        return f"LlavaCompatModel({self.hf_model!r})"

    # Methods that return the model return this wrapper, so `model = model.to(...)` keeps LLaVA's generate.
    def to(self, *args, **kwargs):
        self.hf_model.to(*args, **kwargs)
        return self

    def eval(self):
        self.hf_model.eval()
        return self

    def train(self, mode: bool = True):
        self.hf_model.train(mode)
        return self

    def cuda(self, device=None):
        return self.to(torch.device("cuda") if device is None else torch.device("cuda", device))

    def cpu(self):
        return self.to("cpu")

    def half(self):
        return self.to(torch.float16)

    def float(self):
        return self.to(torch.float32)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def get_model(self):
        return unwrap(self.hf_model).model

    def get_vision_tower(self):
        return unwrap(self.hf_model).model.vision_tower

    # -----------------------------------------------------------------------------------------

    def _pixels(self, images) -> tuple[torch.Tensor, str]:
        """``images`` as ``[N, 3, S, S]`` (one view each) or ``[N, P, 3, S, S]`` (NeXT tiles)."""
        if isinstance(images, (list, tuple)):
            images = [torch.as_tensor(im) for im in images]
            if all(im.dim() == 3 for im in images):
                return torch.stack(images), "views"
            if all(im.dim() == 4 for im in images):
                return stack_tiles(images), "tiles"
            raise ValueError("images: a list of [3, S, S] or of [patches, 3, S, S] tensors")
        if images.dim() == 3:
            return images.unsqueeze(0), "views"
        if images.dim() == 4:
            return images, "views"
        if images.dim() == 5:
            return images, "tiles"
        raise ValueError(f"images: expected a 3-, 4- or 5-D tensor, got shape {tuple(images.shape)}")

    def _image_features(self, images, image_sizes) -> list[torch.Tensor]:
        inner = unwrap(self.hf_model)
        tower = next(inner.model.vision_tower.parameters())
        pixels, kind = self._pixels(images)
        pixels = pixels.to(device=tower.device, dtype=tower.dtype)
        sizes = None
        if kind == "tiles":
            if image_sizes is None:
                raise ValueError("tiled (anyres) images need image_sizes=[image.size for each image]")
            # LLaVA passes PIL sizes, (width, height); transformers wants (height, width).
            sizes = torch.tensor([[int(s[1]), int(s[0])] for s in image_sizes], device=tower.device)
        return image_features(self.hf_model, pixels, sizes)

    def prepare_inputs(self, input_ids, images=None, image_sizes=None, attention_mask=None, labels=None):
        """``(inputs_embeds, attention_mask, labels)``, left-padded, with image features at the placeholders.

        Rows are first stripped of their padding (``attention_mask``), as LLaVA does; labels of image
        positions and of padding are ``IGNORE_INDEX``.
        """
        inner = unwrap(self.hf_model)
        device = inner.get_input_embeddings().weight.device
        input_ids = torch.as_tensor(input_ids, device=device)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
        if labels is not None:
            labels = torch.as_tensor(labels, device=device).reshape(input_ids.shape)
        features = self._image_features(images, image_sizes) if images is not None else []
        slots = int((input_ids[keep] == IMAGE_TOKEN_INDEX).sum())
        if slots != len(features):
            raise ValueError(f"{slots} image placeholders ({IMAGE_TOKEN_INDEX}) in the input ids but {len(features)} images")

        embed_tokens = inner.get_input_embeddings()
        rows, row_labels, feature_iter = [], [], iter(features)
        for b in range(input_ids.shape[0]):
            ids = input_ids[b][keep[b]]
            lab = labels[b][keep[b]] if labels is not None else None
            pieces, lab_pieces, start = [], [], 0
            cuts = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            for cut in cuts + [len(ids)]:
                if cut > start:
                    pieces.append(embed_tokens(ids[start:cut]))
                    if lab is not None:
                        lab_pieces.append(lab[start:cut])
                if cut < len(ids):
                    feature = next(feature_iter)
                    pieces.append(feature.to(pieces[-1].dtype if pieces else embed_tokens.weight.dtype))
                    lab_pieces.append(torch.full((feature.shape[0],), IGNORE_INDEX, dtype=torch.long, device=device))
                start = cut + 1
            rows.append(torch.cat(pieces))
            row_labels.append(torch.cat(lab_pieces) if lab is not None else None)

        longest = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), longest, rows[0].shape[-1])
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        out_labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long, device=device) if labels is not None else None
        for b, row in enumerate(rows):
            embeds[b, longest - row.shape[0]:] = row
            mask[b, longest - row.shape[0]:] = 1
            if out_labels is not None:
                out_labels[b, longest - row.shape[0]:] = row_labels[b]
        return embeds, mask, out_labels

    @torch.no_grad()
    def generate(self, inputs=None, images=None, image_sizes=None, **kwargs):
        """New token ids ``[rows, new]`` for LLaVA input ids (``IMAGE_TOKEN_INDEX`` where images go)."""
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None:
            raise ValueError("generate needs the input ids (LLaVA's `inputs`)")
        if "inputs_embeds" in kwargs:
            raise ValueError("pass LLaVA input ids with images=..., not inputs_embeds")
        kwargs.pop("position_ids", None)  # positions follow from the expanded, left-padded mask
        embeds, mask, _ = self.prepare_inputs(inputs, images, image_sizes, kwargs.pop("attention_mask", None))
        return self.hf_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    def __call__(self, input_ids=None, attention_mask=None, images=None, image_sizes=None, labels=None, **kwargs):
        """LLaVA's forward: with ``images``, the features are spliced in as ``generate`` does."""
        if images is None and (input_ids is None or not bool((torch.as_tensor(input_ids) == IMAGE_TOKEN_INDEX).any())):
            return self.hf_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        embeds, mask, labels = self.prepare_inputs(input_ids, images, image_sizes, attention_mask, labels)
        return self.hf_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)

    forward = __call__
