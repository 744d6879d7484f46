"""Weights as files and as state dicts: reading a checkpoint's tensors, and building a model from them.

The original LLaVA layout and a model composed from a language model and a CLIP tower both become
an HF-named state dict first (``llava.model.original_layout``, ``llava.model.load.compose``), and a
model is built from it with ``from_state_dict``: transformers' own ``from_pretrained``, which under
DeepSpeed ZeRO-3 constructs the model inside ``deepspeed.zero.Init`` (each rank holds its shard)
and copies the tensors into the partitions. Nothing here instantiates a full model outside it, so
the same code loads a 7B model on a ZeRO-3 node and a tiny one on a laptop.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Buffers older transformers saved (rotary inv_freq, CLIP position_ids): rebuilt by the model, never loaded.
REBUILT_BUFFERS = (".inv_freq", ".position_ids")


def weight_files(path: Path) -> list[Path]:
    """The model weight files of a checkpoint directory (an index's files first, then the usual names)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / n for n in names]
    for pattern in ("model.safetensors", "model-*-of-*.safetensors", "pytorch_model.bin", "pytorch_model-*-of-*.bin"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    return []


def weight_names(files: list[Path]) -> set[str]:
    """The tensor names of weight files, read without their values where the format allows (safetensors)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as opened:
                names.update(opened.keys())
        else:
            names.update(torch.load(str(f), map_location="meta", weights_only=True).keys())
    return names


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` (safetensors or torch pickles) on the CPU, rebuilt buffers left out."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            sd.update(load_file(str(f)))
        else:
            try:
                sd.update(torch.load(str(f), map_location="cpu", weights_only=True, mmap=True))
            except RuntimeError:  # a pre-zipfile torch.save cannot be memory-mapped
                sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return {k: v for k, v in sd.items() if not k.endswith(REBUILT_BUFFERS)}


def clip_vision_weights(clip_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The vision weights of a CLIP directory (a CLIPModel or a CLIPVisionModel), read from its files, their
    ``vision_model.`` prefix replaced by ``prefix`` (transformers 5's in-memory names for a CLIP tower
    hold no ``vision_model.``); the text half of a CLIPModel left out.

    Read as tensors, not through ``CLIPVisionModel.from_pretrained``: under ZeRO-3 that would hand back
    partitioned (empty) parameters."""
    files = weight_files(clip_dir)
    if not files:
        raise FileNotFoundError(f"no model weights (*.safetensors / pytorch_model*.bin) in the CLIP directory {clip_dir}")
    weights = read_weights(files)
    if any(k.startswith("vision_model.") for k in weights):  # a CLIPModel, or a CLIPVisionModel saved before transformers 5
        vision = {prefix + k.removeprefix("vision_model."): v for k, v in weights.items() if k.startswith("vision_model.")}
    else:  # a CLIPVisionModel saved by transformers 5: the tower's own names
        vision = {prefix + k: v for k, v in weights.items() if k.startswith(("embeddings.", "pre_layrnorm.", "encoder.",
                                                                              "post_layernorm."))}
    if not vision:
        raise ValueError(f"{clip_dir} holds no CLIP vision weights")
    return vision


def full_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> whole shape of every parameter and persistent buffer; under ZeRO-3 a parameter's local
    tensor is an empty shard and its whole shape is ``ds_shape``."""
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    shapes.update({name: tuple(b.shape) for name, b in model.state_dict(keep_vars=True).items() if name not in shapes})
    return shapes


def check_names_and_shapes(expected: dict[str, tuple[int, ...]], sd: dict[str, torch.Tensor], what: str) -> None:
    """``ValueError`` naming what is missing, unexpected or of the wrong shape in ``sd`` against ``expected``."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k])}" for k in wrong[:8]))
        raise ValueError(f"{what}: " + "; ".join(parts))


def import_model_classes(config) -> None:
    """Import the modeling modules of ``config`` and its sub-configs (language model, vision tower) now.

    transformers imports a model family's module lazily, at its first use. Under ZeRO-3 that is inside
    ``deepspeed.zero.Init``, which wraps the ``__init__`` of every class defined there and puts back, on
    exit, the one it saw first: the ``__init__`` that hub-kernel decorators (the ``kernels`` package)
    install after it is lost, and the next model built in the process (a live reference) breaks with
    "'LlamaAttention' object has no attribute '_kernel_funcs'". Imported first, the classes are whole.
    """
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    for cfg in (config, *(getattr(config, name, None) for name in getattr(config, "sub_configs", {}))):
        if cfg is not None and type(cfg) in MODEL_MAPPING:
            MODEL_MAPPING[type(cfg)]  # the lookup imports the family's modeling module


def from_state_dict(cls, config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, what: str, source: str = ""):
    """A ``cls`` model of ``config`` holding exactly ``state_dict`` (HF in-memory names), in ``dtype``.

    Built by ``from_pretrained`` (ZeRO-3 aware); then every name and whole shape is checked against
    the model, so a tensor the model does not have, or lacks, is an error rather than a fresh init.
    ``source``: the directory the model loads from again (its ``name_or_path``, which a LoRA adapter
    records as its base); empty for a model that no single directory holds.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    import_model_classes(config)
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=sd, dtype=dtype, output_loading_info=True)
    except RuntimeError as e:  # transformers' own size-mismatch report
        raise ValueError(f"{what}: {e}") from e
    # Under ZeRO-3 transformers reports no unexpected or mismatched keys: the check below is the only one there.
    check_names_and_shapes(full_shapes(model), sd, what)
    if not is_deepspeed_zero3_enabled() and (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]):
        raise ValueError(f"{what}: transformers did not take the weights as they are: {info}")
    model.config.name_or_path = model.name_or_path = source  # from_pretrained(None) leaves the string "None"
    return model


# transformers 5's in-memory names of a LLaVA / LLaVA-NeXT -> the names of the llava-hf checkpoints on the
# hub, which vLLM, SGLang and transformers 4 read as written and transformers 5 renames on load. Left to
# ``save_pretrained``, the names written depend on how the model was built (its recorded load-time
# renames: a ZeRO-3 run wrote ``language_model.model.model.*``); with this table every launch writes these.
HUB_NAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)


def hub_name(key: str) -> str:
    """The llava-hf checkpoint name of an in-memory weight name (``HUB_NAMES``); unknown names as they are."""
    for memory, hub in HUB_NAMES:
        if key.startswith(memory):
            return hub + key[len(memory):]
    return key


def memory_name(key: str) -> str:
    """The in-memory name of a llava-hf checkpoint name: ``hub_name``'s inverse; unknown names as they are."""
    for memory, hub in HUB_NAMES:
        if key.startswith(hub):
            return memory + key[len(hub):]
    return key


def save_llava_weights(model, out_dir, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``model.save_pretrained`` with the weights under their llava-hf names (``HUB_NAMES``).

    ``state_dict``: the whole model's tensors by in-memory name, when the caller has gathered them
    (ZeRO-3's consolidated 16-bit weights); else the model's own. Tied weights are written once.
    """
    state_dict = model.state_dict() if state_dict is None else state_dict
    if model.config.get_text_config().tie_word_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    named = {hub_name(k): v.contiguous() for k, v in state_dict.items()}
    model.save_pretrained(out_dir, state_dict=named, safe_serialization=True, save_original_format=False)
