"""The losing image ``m_l`` and the losing context ``c_l`` of a preference record (docs/method.md#corrupted-images).

Every draw is a deterministic function of ``(global seed, record index, purpose)``: the released code
drew them afresh at each visit; seeding makes a run repeatable and lets the reference model's
log-probabilities be computed once and cached.

``--use_image_type``:

* ``diffusion``: forward-diffusion noise on the normalised pixels at ``--diffusion_step`` of a
  1000-step sigmoid schedule, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``;
* ``black``: all-zero normalised pixels (the processor's mean colour);
* ``crop``: a random crop of at most 240 px wide and 320 px tall, then processed as usual;
* ``rotate``: a random rotation by 10 to 80 degrees, nearest-neighbour, black corners (the defaults of
  torchvision's ``RandomRotation`` the released code used), before padding to a square;
* ``random``: the image of the record whose question is the swapped context ``c_l`` (as released).
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Literal, get_args

import torch
from PIL import Image

from llava.data.images import ImageProcessor, ProcessedImage

ImageType = Literal["diffusion", "black", "crop", "rotate", "random"]
IMAGE_TYPES: tuple[str, ...] = get_args(ImageType)
DIFFUSION_STEPS = 1000
CROP_MAX_WIDTH, CROP_MAX_HEIGHT = 240, 320
ROTATE_DEGREES = (10.0, 80.0)


def record_seed(seed: int, index: int, purpose: str) -> int:
    """A 63-bit seed for one draw; stable across processes and Python versions (no ``hash()``)."""
    digest = hashlib.sha256(f"{seed}:{index}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def alpha_bar(step: int) -> float:
    """``prod_{s<=t} (1 - beta_s)`` of the sigmoid schedule, ``beta = sigmoid(linspace(-6, 6)) * (5e-3 - 1e-5) + 1e-5``."""
    if not 0 <= step < DIFFUSION_STEPS:
        raise ValueError(f"--diffusion_step must be in [0, {DIFFUSION_STEPS - 1}], got {step}")
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return float(torch.cumprod(1.0 - betas, dim=0)[step])


def diffuse(pixels: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    a = alpha_bar(step)
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.dtype)
    return a**0.5 * pixels + (1.0 - a) ** 0.5 * eps


def random_crop(image: Image.Image, rng: random.Random) -> Image.Image:
    w, h = image.size
    cw, ch = min(w, CROP_MAX_WIDTH), min(h, CROP_MAX_HEIGHT)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return image.crop((x, y, x + cw, y + ch))


def random_rotation(image: Image.Image, rng: random.Random) -> Image.Image:
    """Counter-clockwise by 10-80 degrees about the centre, same size, nearest-neighbour, black corners."""
    angle = rng.uniform(*ROTATE_DEGREES)
    return image.rotate(angle, resample=Image.NEAREST, fillcolor=(0, 0, 0))


def other_index(index: int, n: int, seed: int, purpose: str) -> int:
    """Another record's index, uniformly among the ``n - 1`` others."""
    if n < 2:
        raise ValueError("context swapping and the `random` image need at least two records")
    j = random.Random(record_seed(seed, index, purpose)).randrange(n - 1)
    return j if j < index else j + 1


def swapped_context_index(index: int, n: int, seed: int) -> int:
    """The record whose question becomes this record's losing context ``c_l``."""
    return other_index(index, n, seed, "context")


def corrupted_image(
    kind: str,
    index: int,
    n: int,
    seed: int,
    image: Image.Image,
    processed: ProcessedImage,
    processor: ImageProcessor,
    open_other: Callable[[int], Image.Image],
    diffusion_step: int = 700,
) -> ProcessedImage:
    """The losing image ``m_l`` of record ``index`` (``processed`` is its true image, processed)."""
    rs = record_seed(seed, index, "image")
    if kind == "diffusion":
        g = torch.Generator().manual_seed(rs)
        return ProcessedImage(diffuse(processed.pixel_values, diffusion_step, g), processed.image_size, processed.num_tokens)
    if kind == "black":
        return processor.black(processed)
    if kind == "crop":
        return processor(random_crop(image, random.Random(rs)))
    if kind == "rotate":
        return processor(random_rotation(image, random.Random(rs)))
    if kind == "random":
        return processor(open_other(swapped_context_index(index, n, seed)))
    raise ValueError(f"--use_image_type must be one of {IMAGE_TYPES}, got {kind!r}")
