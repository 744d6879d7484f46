"""LLaVA's ``llava.mm_utils`` names, as thin adapters over this package, so LLaVA scripts port unchanged.

    from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token

* ``tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")``: LLaVA's
  piecewise tokenization (``llava.conversation.tokenize_with_images``), each ``<image>`` replaced by
  ``IMAGE_TOKEN_INDEX`` (-200) and the BOS token once, at the start: the ids this package trains and
  infers with, the image id aside.
* ``process_images(images, image_processor, model.config)``: ``[N, 3, S, S]`` for ``pad`` (square in the
  processor's mean colour, then resize) and ``square`` (resize and centre crop), through
  ``llava.data.images.ImageProcessor`` exactly as training preprocesses; ``[N, P, 3, S, S]`` (LLaVA-NeXT
  tiles, zero-padded to the largest P) for ``anyres``. ``model.config.image_aspect_ratio`` chooses.
* ``get_model_name_from_path``, ``expand2square``, ``load_image_from_base64``, ``KeywordsStoppingCriteria``.
"""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import torch
from PIL import Image
from transformers import StoppingCriteria

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import tokenize_with_images
from llava.model.parts import stack_tiles
from llava.data.images import ImageProcessor, expand_to_square

__all__ = ["tokenizer_image_token", "process_images", "get_model_name_from_path", "expand2square",
           "load_image_from_base64", "KeywordsStoppingCriteria"]


def get_model_name_from_path(model_path: str) -> str:
    """The last path component, or ``parent_last`` when the last is a ``checkpoint-N`` folder."""
    parts = str(model_path).strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors=None):
    """Ids of ``prompt`` with one ``image_token_index`` per ``<image>`` and BOS once at the start."""
    ids = tokenize_with_images(tokenizer, prompt, image_token_index)
    if return_tensors is None:
        return ids
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    raise ValueError(f"Unsupported tensor type: {return_tensors}")


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """LLaVA's name for padding an image to a square, centred, in ``background_color``."""
    return expand_to_square(pil_img.convert("RGB") if pil_img.mode != "RGB" else pil_img, tuple(background_color))


def load_image_from_base64(image: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image)))


def aspect_ratio_of(model_cfg) -> str:
    """``pad``, ``square`` or ``anyres`` from a model config's ``image_aspect_ratio`` (LLaVA's meaning)."""
    ratio = getattr(model_cfg, "image_aspect_ratio", None) if model_cfg is not None else None
    if ratio == "pad":
        return "pad"
    if isinstance(ratio, str) and ratio.startswith("anyres"):
        return "anyres"
    return "square" if ratio is not None else "pad"


def _hf_image_processor(image_processor):
    """The HF image processor inside whatever was passed (itself, a full processor, or our ImageProcessor)."""
    if isinstance(image_processor, ImageProcessor):
        return image_processor.processor.image_processor
    inner = getattr(image_processor, "image_processor", None)
    return inner if inner is not None else image_processor


def process_images(images, image_processor, model_cfg):
    """Pixel values of PIL ``images`` for the model, as LLaVA's ``process_images`` returns them."""
    ip = _hf_image_processor(image_processor)
    ratio = aspect_ratio_of(model_cfg)
    if ratio == "anyres":
        if not hasattr(ip, "image_grid_pinpoints"):
            raise ValueError("image_aspect_ratio 'anyres' needs a LLaVA-NeXT image processor (with image_grid_pinpoints)")
        return stack_tiles([ip(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"][0] for im in images])
    vision = getattr(model_cfg, "vision_config", None)
    patch = getattr(vision, "patch_size", None) or 14
    views = ImageProcessor(SimpleNamespace(image_processor=ip, patch_size=patch), ratio)
    return torch.stack([views(im.convert("RGB")).pixel_values for im in images])


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop generating once every row's new text ends with one of ``keywords`` (LLaVA's stopping rule).

    Works with ``generate(inputs_embeds=...)``, where the ids seen are the new tokens only.
    """

    def __init__(self, keywords, tokenizer, input_ids=None):
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.keyword_ids = [tokenizer(k, add_special_tokens=False).input_ids for k in self.keywords]
        self.window = max((len(k) for k in self.keyword_ids), default=1) + 3

    def _row_done(self, ids: torch.Tensor) -> bool:
        tail = ids[-self.window:].tolist()
        for k in self.keyword_ids:
            if k and tail[-len(k):] == k:
                return True
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(k in text for k in self.keywords)

    def __call__(self, output_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        done = [self._row_done(row) for row in output_ids] if output_ids.shape[1] else [False] * output_ids.shape[0]
        return torch.tensor(done, dtype=torch.bool, device=output_ids.device)
