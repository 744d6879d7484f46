"""The original LLaVA checkpoint layout: its names, recognising it, and loading it into transformers' classes.

What both conversion directions share (layout constants, ``KEY_MAP`` of weight names, format detection)
and the import direction: ``load_original`` (an original checkpoint -> ``(model, processor)``) and
``original_to_hf`` (the same, saved). Which HF class a checkpoint maps to, what is supported, where the
vision tower and the tokenizer come from: docs/original-layout.md.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.model.hub import HubError, is_repo_id, local_dir, snapshot
from llava.model.weights import clip_vision_weights, from_state_dict, read_weights, weight_files, weight_names
from llava.model.parts import (add_llava_tokens, clip_image_settings, grow_rows, llava_processor, parse_dtype, save_model,
                              set_generation_tokens)

logger = logging.getLogger(__name__)

ORIGINAL_ARCHITECTURE = "LlavaLlamaForCausalLM"
# Other classes of the original code base: recognised as "original format", rejected with a clear message.
OTHER_ORIGINAL_ARCHITECTURES = ("LlavaMistralForCausalLM", "LlavaMptForCausalLM", "LlavaQwenForCausalLM")
LLAVA = "LlavaForConditionalGeneration"
LLAVA_NEXT = "LlavaNextForConditionalGeneration"

# The one key map between the two layouts, as transformers' own conversion scripts keep theirs: rows of
# (original prefix, HF in-memory prefix, transformers 5), read left to right on import (``to_hf_key``) and right
# to left on export (``to_original_key``); the first row whose prefix matches renames the key. Only the
# ``linear`` projector (one layer in the original, two in HF) lies outside it: ``projector_to_hf`` here,
# ``_projector_to_original`` in ``llava.model.convert``.
KEY_MAP = (
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
    ("model.image_newline", "model.image_newline"),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
)
ORIGINAL_VISION = "model.vision_tower.vision_tower."  # tower weights inside an original checkpoint (v1.6)
ORIGINAL_PROJECTOR = "model.mm_projector."
HF_VISION = "model.vision_tower."
HF_PROJECTOR = "model.multi_modal_projector."
IMAGE_NEWLINE = "model.image_newline"


def _rename(key: str, to_hf: bool) -> str | None:
    for original, hf in KEY_MAP:
        old, new = (original, hf) if to_hf else (hf, original)
        if key.startswith(old):
            return new + key[len(old):]
    return None


def to_hf_key(key: str) -> str | None:
    """The HF in-memory name of an original weight name (``KEY_MAP``); None when it has none."""
    return _rename(key, to_hf=True)


def to_original_key(key: str) -> str | None:
    """The original name of an HF in-memory weight name (``KEY_MAP`` inverted); None when it has none."""
    return _rename(key, to_hf=False)


# The CLIP towers LLaVA-1.5 / 1.6 name in `mm_vision_tower` (their config.json, vision part).
KNOWN_CLIP_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
}

# Llama keys of the original config.json that become the HF text config (the rest is multimodal or bookkeeping).
LLAMA_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp", "tie_word_embeddings",
    "attention_bias", "attention_dropout", "mlp_bias",
)


# ----------------------------------------------------------------------------------------------------------------
# Format detection and the class mapping
# ----------------------------------------------------------------------------------------------------------------


def read_config(path: str | Path) -> dict | None:
    f = Path(path) / "config.json"
    if not f.is_file():
        return None
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def is_original_format(path: str | Path) -> bool:
    """True when ``path`` is a directory whose config.json is an original LLaVA config (reads nothing else)."""
    cfg = read_config(path)
    if cfg is None:
        return False
    archs = cfg.get("architectures") or []
    if ORIGINAL_ARCHITECTURE in archs or any(a in OTHER_ORIGINAL_ARCHITECTURES for a in archs):
        return True
    # No architectures recorded: the flat Llama config with mm_* keys is the tell (HF configs nest text_config).
    return not archs and "mm_vision_tower" in cfg and "text_config" not in cfg


def target_architecture(config: dict) -> str:
    """The HF class name an original config maps to (see the module docstring); ``ValueError`` if none does."""
    ratio = config.get("image_aspect_ratio") or "square"
    merge = config.get("mm_patch_merge_type") or "flat"
    if merge not in ("flat", "spatial", "spatial_unpad"):
        raise ValueError(f"unsupported mm_patch_merge_type {merge!r} (expected flat, spatial or spatial_unpad)")
    if ratio in ("pad", "square"):
        # A single view per image: the original code flattens it whatever the merge type says.
        return LLAVA
    if ratio == "anyres":
        if merge != "spatial_unpad":
            raise ValueError(
                f"image_aspect_ratio 'anyres' with mm_patch_merge_type {merge!r} has no transformers class: "
                "LlavaNextForConditionalGeneration implements only 'spatial_unpad' (unpadded grid + image_newline)"
            )
        return LLAVA_NEXT
    raise ValueError(
        f"unsupported image_aspect_ratio {ratio!r}: expected 'pad', 'square' (LLaVA-1.5 class) or 'anyres' "
        "(LLaVA-NeXT class); anyres_max_* (LLaVA-OneVision) is not supported"
    )


def _check_supported(cfg: dict, arch: str) -> str:
    """Validate the multimodal keys of an original config; return the projector type."""
    archs = cfg.get("architectures") or [ORIGINAL_ARCHITECTURE]
    if ORIGINAL_ARCHITECTURE not in archs:
        raise ValueError(
            f"only {ORIGINAL_ARCHITECTURE} (Llama/Vicuna) checkpoints are supported, this one is {archs}"
        )
    projector = cfg.get("mm_projector_type") or "linear"  # the original code's default
    if projector not in ("mlp2x_gelu", "linear"):
        raise ValueError(
            f"unsupported mm_projector_type {projector!r}: only 'mlp2x_gelu' and 'linear' map onto the two-layer "
            "projector of the transformers LLaVA classes"
        )
    if cfg.get("mm_use_im_start_end"):
        raise ValueError(
            "mm_use_im_start_end=True is not supported: the original code wraps image features in <im_start>/<im_end>"
            " tokens, a prompt format the transformers processors do not produce"
        )
    feature = cfg.get("mm_vision_select_feature") or "patch"
    if feature not in ("patch", "cls_patch"):
        raise ValueError(f"unsupported mm_vision_select_feature {feature!r} (expected patch or cls_patch)")
    if feature == "cls_patch" and arch == LLAVA_NEXT:
        raise ValueError("mm_vision_select_feature 'cls_patch' cannot be combined with anyres (the grid needs patches only)")
    if not isinstance(cfg.get("mm_vision_select_layer", -2), int):
        raise ValueError(f"mm_vision_select_layer must be an int, got {cfg.get('mm_vision_select_layer')!r}")
    return projector


# ----------------------------------------------------------------------------------------------------------------
# Reading original checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _load_original_weights(path: Path) -> dict[str, torch.Tensor]:
    files = weight_files(path)
    if not files:
        if (path / "adapter_config.json").is_file() or (path / "non_lora_trainables.bin").is_file():
            raise ValueError(
                f"{path} is a LoRA checkpoint: merge it with its base model first (LLaVA's merge_lora_weights.py)"
            )
        if (path / "mm_projector.bin").is_file():
            raise ValueError(
                f"{path} holds only a pre-trained projector (mm_projector.bin): it has no language model to convert"
            )
        raise FileNotFoundError(f"no model weights (*.safetensors / pytorch_model*.bin) in {path}")
    return read_weights(files)


# Files of a CLIP repository needed when the checkpoint carries the tower's weights itself (v1.6).
_CLIP_CONFIG_FILES = ["config.json", "preprocessor_config.json"]


def _resolve_clip_dir(ckpt: Path, cfg: dict, vision_tower: str | Path | None, has_inside_weights: bool = False):
    """``(CLIP directory or None, why the hub name was not found or None)``; see "Vision tower" above."""
    if vision_tower is not None:
        try:
            p = local_dir(vision_tower, what="vision_tower")
        except HubError as e:
            raise FileNotFoundError(f"vision_tower={str(vision_tower)!r}: {e.reason}") from e
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"vision_tower={str(vision_tower)!r} is not a local CLIP directory (no config.json)")
        return p, None
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    why = None
    if name:
        for cand in (Path(name).expanduser(), ckpt / name):
            if (cand / "config.json").is_file():
                return cand, None
        if is_repo_id(name):
            try:  # the weights inside the checkpoint win: then only the tower's config files are fetched
                found = snapshot(name, what="vision tower", allow_patterns=_CLIP_CONFIG_FILES if has_inside_weights else None)
            except HubError as e:
                why = e.reason
            else:
                if (found / "config.json").is_file():
                    return found, None
    side = ckpt / "vision_tower"
    if (side / "config.json").is_file():
        return side, None
    return None, why


def _vision_config(clip_dir: Path | None, name: str | None, has_inside_weights: bool, why: str | None = None):
    from transformers import CLIPVisionConfig

    if clip_dir is not None:
        raw = read_config(clip_dir) or {}
        if raw.get("model_type") not in ("clip", "clip_vision_model"):
            raise ValueError(
                f"{clip_dir} is not a CLIP model (model_type {raw.get('model_type')!r}); only CLIP vision towers are supported"
            )
        return CLIPVisionConfig.from_pretrained(str(clip_dir))
    if has_inside_weights and name in KNOWN_CLIP_TOWERS:
        return CLIPVisionConfig(**KNOWN_CLIP_TOWERS[name])
    raise FileNotFoundError(
        f"the vision tower {name!r} is not a local directory, and as a hub name: {why or 'not a hub name'}; "
        "pass vision_tower=<CLIP directory or hub name> (CLI: --vision_tower), e.g. "
        f"{name or 'openai/clip-vit-large-patch14-336'}"
    )


def _prepare_tokenizer(path: Path, cfg: dict):
    """Load the checkpoint's tokenizer; add <image> and a pad token when missing. Returns it."""
    from llava.model.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    add_llava_tokens(tok)
    if cfg.get("tokenizer_padding_side") in ("left", "right"):
        tok.padding_side = cfg["tokenizer_padding_side"]
    if cfg.get("tokenizer_model_max_length"):
        tok.model_max_length = int(cfg["tokenizer_model_max_length"])
    return tok


def _text_config(cfg: dict, vocab_size: int, tok):
    from transformers import LlamaConfig

    kwargs = {k: cfg[k] for k in LLAMA_CONFIG_KEYS if k in cfg}
    kwargs["vocab_size"] = vocab_size
    # transformers 5 keeps theta and scaling together in rope_parameters; the original config has them apart.
    rope = {k: v for k, v in (cfg.get("rope_scaling") or {}).items() if k != "type"}
    rope["rope_type"] = (cfg.get("rope_scaling") or {}).get("rope_type") or (cfg.get("rope_scaling") or {}).get("type") or "default"
    rope["rope_theta"] = cfg.get("rope_theta", 10000.0)
    kwargs["rope_parameters"] = rope
    kwargs["pad_token_id"] = tok.pad_token_id
    kwargs.setdefault("bos_token_id", tok.bos_token_id)
    kwargs.setdefault("eos_token_id", tok.eos_token_id)
    kwargs.setdefault("tie_word_embeddings", False)
    return LlamaConfig(**kwargs)


def load_original(
    path: str | Path,
    vision_tower: str | Path | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    image_aspect_ratio: str | None = None,
):
    """Load an original-format LLaVA checkpoint into ``(model, processor)`` of the native transformers classes.

    ``path`` is a directory or a hub name; ``vision_tower`` is a CLIP directory or hub name that overrides ``mm_vision_tower``; ``dtype`` defaults to the dtype
    the language model is stored in; ``image_aspect_ratio`` overrides the config's (e.g. ``"pad"`` to use a
    LLaVA-1.6 checkpoint with one 336 view, as the MCM-DPO paper does).
    """
    import transformers
    from transformers import LlavaConfig, LlavaNextConfig

    path = local_dir(path, what="checkpoint")  # a directory, or a hub name resolved to its snapshot
    if not is_original_format(path):
        cfg = read_config(path)
        what = "no config.json" if cfg is None else f"architectures {cfg.get('architectures')}"
        raise ValueError(f"{path} is not an original-format LLaVA checkpoint ({what}); expected {ORIGINAL_ARCHITECTURE}")
    cfg = dict(read_config(path) or {})
    if image_aspect_ratio is not None:
        cfg["image_aspect_ratio"] = image_aspect_ratio
    arch = target_architecture(cfg)
    projector = _check_supported(cfg, arch)
    ratio = cfg.get("image_aspect_ratio") or "square"
    if arch == LLAVA_NEXT and not cfg.get("image_grid_pinpoints"):
        raise ValueError("an anyres checkpoint needs image_grid_pinpoints in its config.json")

    sd = _load_original_weights(path)
    if "model.embed_tokens.weight" not in sd:
        raise ValueError(f"{path} has no model.embed_tokens.weight: not a full LLaVA checkpoint")
    target_dtype = parse_dtype(dtype) or sd["model.embed_tokens.weight"].dtype

    # Vision tower: weights inside the checkpoint win; the CLIP directory gives config + image settings.
    inside = any(k.startswith(ORIGINAL_VISION) for k in sd)
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    clip_dir, why = _resolve_clip_dir(path, cfg, vision_tower, has_inside_weights=inside)
    vision_config = _vision_config(clip_dir, name, inside, why)
    if cfg.get("mm_hidden_size") not in (None, vision_config.hidden_size):
        raise ValueError(f"mm_hidden_size {cfg['mm_hidden_size']} != vision tower hidden_size {vision_config.hidden_size}")

    # Tokenizer first: it decides the vocabulary size.
    tok = _prepare_tokenizer(path, cfg)
    embed = sd["model.embed_tokens.weight"]
    vocab = max(embed.shape[0], len(tok))
    if vocab > embed.shape[0]:
        logger.info("growing embeddings and lm_head from %d to %d rows (mean init)", embed.shape[0], vocab)

    text_config = _text_config(cfg, vocab, tok)
    strategy = "full" if cfg.get("mm_vision_select_feature") == "cls_patch" else "default"
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    common = dict(
        vision_config=vision_config, text_config=text_config,
        image_token_id=tok.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
        projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear",
        vision_feature_select_strategy=strategy, vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
        multimodal_projector_bias=True, tie_word_embeddings=text_config.tie_word_embeddings,
        image_seq_length=n_patches + (strategy == "full"),
    )
    if arch == LLAVA_NEXT:
        config = LlavaNextConfig(image_grid_pinpoints=[list(p) for p in cfg["image_grid_pinpoints"]], **common)
    else:
        config = LlavaConfig(**common)
    cls = getattr(transformers, arch)

    # Map the weights to the in-memory names of the HF class (KEY_MAP); the projector apart.
    embed = to_hf_key("model.embed_tokens.weight")
    hf: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(ORIGINAL_PROJECTOR):
            continue
        if key == IMAGE_NEWLINE and arch != LLAVA_NEXT:
            logger.info("dropping model.image_newline: unused with image_aspect_ratio %r", ratio)
            continue
        name = to_hf_key(key) or key  # a name the map does not know is reported as unexpected below
        hf[name] = grow_rows(value, vocab) if name in (embed, "lm_head.weight") else value
    hf.update(projector_to_hf(sd, projector, text_config.hidden_size))
    if "lm_head.weight" not in hf and text_config.tie_word_embeddings:
        hf["lm_head.weight"] = hf[embed]
    if arch == LLAVA_NEXT and IMAGE_NEWLINE not in hf:
        raise ValueError("an anyres/spatial_unpad checkpoint needs model.image_newline, which this one lacks")
    if not inside:
        if clip_dir is None:  # unreachable: _vision_config raised already
            raise FileNotFoundError("no vision tower weights")
        hf.update(clip_vision_weights(clip_dir, HF_VISION))
    model = from_state_dict(cls, config, hf, target_dtype, f"converting {path}", source=str(path))
    model.eval()
    set_generation_tokens(model, tok)

    processor = _processor(tok, cfg, arch, clip_dir, vision_config)
    return model, processor


def _processor(tok, cfg: dict, arch: str, clip_dir: Path | None, vision_config):
    """The native processor of an original checkpoint: its tokenizer, its CLIP directory's image settings."""
    from llava.conversation import VICUNA_V1_CHAT_TEMPLATE

    tok.chat_template = VICUNA_V1_CHAT_TEMPLATE
    strategy = "full" if cfg.get("mm_vision_select_feature") == "cls_patch" else "default"
    return llava_processor(
        tok, clip_image_settings(clip_dir, vision_config.image_size), patch_size=vision_config.patch_size,
        strategy=strategy, aspect_ratio=cfg.get("image_aspect_ratio") or "square",
        pinpoints=cfg["image_grid_pinpoints"] if arch == LLAVA_NEXT else None,
    )


def original_processor(path: str | Path, vision_tower: str | Path | None = None):
    """The processor ``load_original`` returns, built from the config, the tokenizer and the CLIP settings
    without reading a weight (only the weight files' names): the data checks that need the tokenizer and
    the image token count run before the model loads."""
    path = local_dir(path, what="checkpoint")
    cfg = dict(read_config(path) or {})
    arch = target_architecture(cfg)
    _check_supported(cfg, arch)
    inside = any(k.startswith(ORIGINAL_VISION) for k in weight_names(weight_files(path)))
    clip_dir, why = _resolve_clip_dir(path, cfg, vision_tower, has_inside_weights=inside)
    vision_config = _vision_config(clip_dir, cfg.get("mm_vision_tower") or cfg.get("vision_tower"), inside, why)
    return _processor(_prepare_tokenizer(path, cfg), cfg, arch, clip_dir, vision_config)


def projector_to_hf(sd: dict[str, torch.Tensor], projector: str, hidden: int) -> dict[str, torch.Tensor]:
    """The HF projector weights of an original checkpoint's ``mlp2x_gelu`` (``KEY_MAP``) or ``linear`` projector."""
    if projector == "mlp2x_gelu":
        names = {old: to_hf_key(old) for old in (f"{ORIGINAL_PROJECTOR}{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))}
    else:
        names = {f"{ORIGINAL_PROJECTOR}{p}": f"{HF_PROJECTOR}linear_1.{p}" for p in ("weight", "bias")}
    found = {k for k in sd if k.startswith(ORIGINAL_PROJECTOR)}
    if found != set(names):
        raise ValueError(
            f"mm_projector_type {projector!r} expects weights {sorted(names)}, the checkpoint has {sorted(found)}"
        )
    out = {new: sd[old] for old, new in names.items()}
    if projector == "linear":
        w = out[f"{HF_PROJECTOR}linear_1.weight"]
        out[f"{HF_PROJECTOR}linear_2.weight"] = torch.eye(hidden, dtype=w.dtype)
        out[f"{HF_PROJECTOR}linear_2.bias"] = torch.zeros(hidden, dtype=w.dtype)
    return out


def original_to_hf(
    path: str | Path,
    out_dir: str | Path,
    vision_tower: str | Path | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    image_aspect_ratio: str | None = None,
) -> Path:
    """Convert an original-format checkpoint to an HF directory (``save_pretrained`` of model and processor)."""
    model, processor = load_original(path, vision_tower=vision_tower, dtype=dtype, image_aspect_ratio=image_aspect_ratio)
    out = save_model(model, processor, out_dir)
    copy_sentencepiece(local_dir(path, what="checkpoint"), out)
    return out


def copy_sentencepiece(src: Path, out: Path) -> None:
    """Carry tokenizer.model along (transformers 5 writes tokenizer.json only; older readers want the .model)."""
    f = src / "tokenizer.model"
    if f.is_file() and not (out / "tokenizer.model").exists():
        shutil.copyfile(f, out / "tokenizer.model")
