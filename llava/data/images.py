"""Images: open a record's image and turn it into the pixel tensor its model expects.

``--image_aspect_ratio``:

* ``pad``: pad to a square in the processor's mean colour, then resize (LLaVA-1.5's choice, and how
  the paper runs LLaVA-1.6: one view, ``(size / patch)^2`` image tokens, no multi-crop);
* ``square``: the processor's own resize and centre crop (what LLaVA does for any other value);
* ``anyres``: LLaVA-NeXT's multi-crop tiling (LLaVA-NeXT models only), with its variable token count.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from PIL import Image, UnidentifiedImageError

from llava.data.records import DataError, DataProblem, ImageRef, Record, image_field

# pad: a square in the mean colour, one view; square: resize and centre crop; anyres: LLaVA-NeXT tiles
AspectRatio = Literal["pad", "square", "anyres"]
ASPECT_RATIOS: tuple[str, ...] = get_args(AspectRatio)


def image_path(ref: ImageRef, image_folder: str | Path | None) -> Path | None:
    """Where a record's image file is: an absolute path as written, a relative one under ``image_folder``
    (the current directory when there is none). ``None`` for image bytes."""
    if ref.path is None:
        return None
    p = Path(ref.path)
    return p if p.is_absolute() or image_folder is None else Path(image_folder) / p


def folder_name(image_folder: str | Path | None) -> str:
    """The image folder as messages name it."""
    return f"--image_folder {image_folder}" if image_folder is not None else "the current directory (no --image_folder given)"


def not_found(record: Record, path: Path, image_folder: str | Path | None) -> str:
    """The message for ``record``'s missing image file at ``path``: the absolute path tried, the folder it
    was taken relative to and, when the file is beside the data file or in a sibling ``image/`` (or
    ``images/``) folder, the ``--image_folder`` that finds it."""
    where = f"under --image_folder {image_folder}" if image_folder is not None else "no --image_folder: from the current directory"
    message = f"image file not found: {os.path.abspath(path)} ({where})"
    written = record.image.path if record.image is not None else None
    if written is None or Path(written).is_absolute() or not record.source:
        return message
    here = Path(record.source).parent
    for folder in (here, here / "image", here / "images"):
        if folder != Path(image_folder or ".") and (folder / written).is_file():
            return f"{message}; it is in {folder}: pass --image_folder {folder}"
    return message


def outside_image_folder(written: str, image_folder: str | Path | None) -> str | None:
    """Why the image path ``written`` in a record reaches outside the image folder, or ``None`` when it stays in.

    Records come from data a user may not control (scraped posts, shared files); the image folder is
    the user's choice. A path is outside when, with ``..`` taken as written, it leaves the folder (an
    absolute path elsewhere, or a relative one climbing out). Symbolic links inside the folder are
    the folder owner's and are followed wherever they lead, except that a path with ``..`` must stay
    in the folder once links are resolved too (``link/../..`` climbs from the link's target, not from
    the folder). Without an image folder the current directory is the folder; the released data's
    absolute paths keep working with ``--image_folder /``, under which everything is.
    """
    folder = Path(os.path.abspath(image_folder if image_folder is not None else "."))
    joined = folder / written  # an absolute path replaces the folder
    if not Path(os.path.normpath(joined)).is_relative_to(folder):
        return f"image path {written} is outside {folder_name(image_folder)}"
    if ".." in Path(written).parts and not Path(os.path.realpath(joined)).is_relative_to(os.path.realpath(folder)):
        return f"image path {written} climbs out of {folder_name(image_folder)} through a symbolic link"
    return None


def _decode(source, verify: bool) -> Image.Image:
    """The image at ``source`` (a path or a bytes buffer) as RGB; with ``verify``, PIL's structure check first.

    ``verify()`` reads the whole file and checks its structure and checksums (a PNG cut inside its last
    chunk decodes fine but fails it); decoding catches what it does not (pixel data cut short).
    """
    if verify:
        with Image.open(source) as im:
            im.verify()
        if hasattr(source, "seek"):
            source.seek(0)
    with Image.open(source) as im:
        return im.convert("RGB")


# PIL's format plugins raise more than OSError on malformed files: SyntaxError ("broken PNG file"),
# struct.error, EOFError, IndexError. DecompressionBombError (an image over twice PIL's
# MAX_IMAGE_PIXELS) is not an OSError either: without it here one huge image would stop a whole run
# instead of being reported.
BAD_IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error,
                    Image.DecompressionBombError)


def record_image_field(record: Record) -> str:
    """The field of its row that ``record``'s image came from, as messages name it."""
    return image_field(record.raw) if record.raw else "image"


def open_image(record: Record, image_folder: str | Path | None, *, verify: bool = False) -> Image.Image:
    """The record's image as RGB; a missing or unreadable image raises ``DataError`` naming it."""
    ref = record.image
    if ref is None:
        raise record.error("image", "no image")
    path = image_path(ref, image_folder)
    field = record_image_field(record)
    try:
        return _decode(path if path is not None else io.BytesIO(ref.data), verify)
    except FileNotFoundError:
        raise record.error(field, not_found(record, path, image_folder))
    except BAD_IMAGE_ERRORS as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())  # one line, whatever the plugin wrote
        raise record.error(field, f"unreadable image {ref.describe()} ({reason})")


def missing_image(record: Record, image_folder: str | Path | None) -> DataProblem | None:
    """The problem of a record whose image file does not exist (a stat, no decode), or ``None``."""
    path = image_path(record.image, image_folder) if record.image is not None else None
    if path is not None and not path.is_file():
        return DataProblem(record.source, record.number, "image", not_found(record, path, image_folder), record.line)
    return None


def missing_images(records: list[Record], image_folder: str | Path | None) -> list[DataProblem]:
    """Records whose image file does not exist."""
    return [p for r in records if (p := missing_image(r, image_folder)) is not None]


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # [3, S, S] (pad/square) or [patches, 3, S, S] (anyres)
    image_size: tuple[int, int]  # (height, width) of the image given to the processor
    num_tokens: int  # image tokens this image occupies in the sequence


class ImageProcessor:
    """Pixels and token count of one image for a model's processor and an aspect-ratio mode."""

    def __init__(self, processor, aspect_ratio: str = "pad", vision_feature_select_strategy: str = "default"):
        if aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"--image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}")
        self.processor = processor
        self.aspect_ratio = aspect_ratio
        ip = processor.image_processor
        self.is_next = hasattr(ip, "image_grid_pinpoints")
        if aspect_ratio == "anyres" and not self.is_next:
            raise ValueError("--image_aspect_ratio anyres needs a LLaVA-NeXT model (its processor tiles images)")
        crop = getattr(ip, "crop_size", None) or {}
        size = getattr(ip, "size", None) or {}
        crop = dict(crop) if not isinstance(crop, dict) else crop
        size = dict(size) if not isinstance(size, dict) else size
        self.side = int(crop.get("height") or size.get("shortest_edge") or size.get("height"))
        self.mean = tuple(float(x) for x in ip.image_mean)
        # LLaVA's expand2square colour, truncated as released: int(mean * 255) = (122, 116, 104) for CLIP
        self.fill = tuple(int(255 * m) for m in self.mean)
        patch = int(processor.patch_size)
        extra = 1 if vision_feature_select_strategy == "full" else 0
        self.flat_tokens = (self.side // patch) ** 2 + extra
        self._single_view = self._clip_processor(ip)

    @classmethod
    def of(cls, processor, aspect_ratio: str = "pad") -> "ImageProcessor":
        """The image processor a run uses with a model's ``processor``: the model's feature-select strategy
        (``full`` keeps CLS: one image token more) read from the processor, as training and ``show`` both need."""
        return cls(processor, aspect_ratio, getattr(processor, "vision_feature_select_strategy", None) or "default")

    def _clip_processor(self, ip):
        """A plain resize + centre-crop + normalise processor with ``ip``'s settings (one view)."""
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(
            size={"shortest_edge": self.side}, crop_size={"height": self.side, "width": self.side},
            image_mean=list(ip.image_mean), image_std=list(ip.image_std), resample=getattr(ip, "resample", 3),
        )

    def __call__(self, image: Image.Image) -> ProcessedImage:
        if self.aspect_ratio == "anyres":
            out = self.processor.image_processor(images=[image], return_tensors="pt")
            h, w = (int(x) for x in out["image_sizes"][0])
            n = self.processor._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"][0]
            return ProcessedImage(out["pixel_values"][0], (h, w), int(n))
        if self.aspect_ratio == "pad":
            image = expand_to_square(image, self.fill)
        pixels = self._single_view(images=[image], return_tensors="pt")["pixel_values"][0]
        return ProcessedImage(pixels, (image.size[1], image.size[0]), self.flat_tokens)

    @property
    def most_tokens(self) -> int:
        """The most ``<image>`` tokens one image can take: one view's, or under ``anyres`` those of an image
        shaped as the largest tile grid (the grid that needs no unpadding)."""
        if self.aspect_ratio != "anyres":
            return self.flat_tokens
        grids = self.processor.image_processor.image_grid_pinpoints
        counts = self.processor._get_num_multimodal_tokens(image_sizes=[tuple(g) for g in grids])["num_image_tokens"]
        return max(int(n) for n in counts)

    def black(self, like: ProcessedImage) -> ProcessedImage:
        """An all-zero normalised tensor: the processor's mean colour everywhere."""
        return ProcessedImage(torch.zeros_like(like.pixel_values), like.image_size, like.num_tokens)


def check_image_readable(record: Record, image_folder) -> DataProblem | None:
    """The problem opening ``record``'s image (missing, failing PIL's ``verify()`` or its decode), or ``None``."""
    try:
        open_image(record, image_folder, verify=True)
    except DataError as e:
        return e.problems[0]
    return None
