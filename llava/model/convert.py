"""Convert LLaVA checkpoints between the original layout and transformers' native classes.

    python -m llava.model.convert to-hf       --src ORIGINAL_DIR --out HF_DIR [--vision_tower CLIP_DIR]
    python -m llava.model.convert to-original --src HF_DIR --out ORIGINAL_DIR [--separate_vision_tower]

The command line and the export direction, ``hf_to_original``; the layout itself and the import
direction are ``llava.model.original_layout``. What an export writes: docs/original-layout.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from llava.flags import FlagParser
from llava.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from llava.model.hub import local_dir
from llava.model.original_layout import (
    HF_PROJECTOR,
    HF_VISION,
    KNOWN_CLIP_TOWERS,
    LLAMA_CONFIG_KEYS,
    LLAVA,
    LLAVA_NEXT,
    ORIGINAL_ARCHITECTURE,
    ORIGINAL_PROJECTOR,
    ORIGINAL_VISION,
    copy_sentencepiece,
    is_original_format,
    original_to_hf,
    read_config,
    to_original_key,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Writing original checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _load_hf(path: Path):
    import transformers

    from llava.model.tokenizer import load_processor

    path = local_dir(path, what="checkpoint")
    if is_original_format(path):
        raise ValueError(f"{path} is already in the original LLaVA format")
    cfg = read_config(path)
    archs = (cfg or {}).get("architectures") or []
    arch = next((a for a in archs if a in (LLAVA, LLAVA_NEXT)), None)
    if arch is None:
        raise ValueError(f"{path} is not an HF LLaVA checkpoint (architectures {archs}); expected {LLAVA} or {LLAVA_NEXT}")
    model = getattr(transformers, arch).from_pretrained(str(path), dtype="auto")
    return model.eval(), load_processor(path)


def _size_dict(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, int):
        return {"shortest_edge": value}
    items = value.items() if hasattr(value, "items") else vars(value).items()
    return {k: v for k, v in items if v is not None}


def _clip_preprocessor_config(image_processor, image_size: int) -> dict:
    """A CLIPImageProcessor preprocessor_config.json (the form openai/clip-* ship) from an HF image processor."""
    d = image_processor.to_dict()
    size = _size_dict(d.get("size")) or {"shortest_edge": image_size}
    crop = _size_dict(d.get("crop_size")) or {"height": image_size, "width": image_size}
    return {
        "crop_size": crop, "do_center_crop": bool(d.get("do_center_crop", True)),
        "do_convert_rgb": bool(d.get("do_convert_rgb", True)), "do_normalize": bool(d.get("do_normalize", True)),
        "do_rescale": bool(d.get("do_rescale", True)), "do_resize": bool(d.get("do_resize", True)),
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(d.get("image_mean") or OPENAI_CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor", "image_std": list(d.get("image_std") or OPENAI_CLIP_STD),
        "resample": int(d.get("resample") if d.get("resample") is not None else 3),
        "rescale_factor": float(d.get("rescale_factor") or 1 / 255), "size": size,
    }


def _standard_tower(vision_config, preprocessor: dict) -> str | None:
    """The hub id of a standard OpenAI CLIP tower when config and image settings are exactly that tower's."""
    for name, known in KNOWN_CLIP_TOWERS.items():
        if any(getattr(vision_config, k, None) != v for k, v in known.items() if k != "projection_dim"):
            continue
        n = known["image_size"]
        if (
            preprocessor["size"] == {"shortest_edge": n} and preprocessor["crop_size"] == {"height": n, "width": n}
            and all(abs(a - b) < 1e-8 for a, b in zip(preprocessor["image_mean"], OPENAI_CLIP_MEAN))
            and all(abs(a - b) < 1e-8 for a, b in zip(preprocessor["image_std"], OPENAI_CLIP_STD))
            and preprocessor["resample"] == 3
        ):
            return name
    return None


def _unshare(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, one storage each (safetensors refuses shared storage, e.g. tied embeddings)."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def _save_safetensors(sd: dict[str, torch.Tensor], out: Path, max_shard_size: int | str = "5GB") -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    sd = _unshare(sd)
    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: sd[k] for k in keys}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_clip_dir(out: Path, vision_sd: dict[str, torch.Tensor], vision_config, preprocessor: dict) -> None:
    """A CLIPVisionModel directory in the legacy ``vision_model.*`` key layout (what every transformers reads)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = vision_config.to_dict()
    cfg["architectures"] = ["CLIPVisionModel"]
    cfg["model_type"] = "clip_vision_model"
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
    legacy = {(k if k.startswith("vision_model.") else "vision_model." + k): v for k, v in vision_sd.items()}
    save_file(_unshare(legacy), str(out / "model.safetensors"), metadata={"format": "pt"})


def _projector_to_original(model) -> tuple[str, dict[str, torch.Tensor]]:
    cfg = model.config
    proj = model.model.multi_modal_projector
    w1, w2 = proj.linear_1.weight.detach(), proj.linear_2.weight.detach()
    b1 = proj.linear_1.bias.detach() if proj.linear_1.bias is not None else torch.zeros(w1.shape[0], dtype=w1.dtype)
    b2 = proj.linear_2.bias.detach() if proj.linear_2.bias is not None else torch.zeros(w2.shape[0], dtype=w2.dtype)
    act = cfg.projector_hidden_act
    if act == "gelu":
        layers = {"linear_1.weight": w1, "linear_1.bias": b1, "linear_2.weight": w2, "linear_2.bias": b2}
        return "mlp2x_gelu", {to_original_key(HF_PROJECTOR + k): v for k, v in layers.items()}
    if act == "linear":
        eye = torch.eye(w2.shape[0], dtype=w2.dtype, device=w2.device)
        if not (torch.equal(w2, eye) and not b2.any()):
            logger.warning("folding a trained linear_2 into the linear projector (exact maths, float rounding)")
            w64, b64 = w2.double() @ w1.double(), w2.double() @ b1.double() + b2.double()
            w1, b1 = w64.to(w1.dtype), b64.to(b1.dtype)
        return "linear", {f"{ORIGINAL_PROJECTOR}weight": w1, f"{ORIGINAL_PROJECTOR}bias": b1}
    raise ValueError(
        f"projector_hidden_act {act!r} has no original projector (mlp2x_gelu uses exact 'gelu', linear uses 'linear')"
    )


def hf_to_original(
    model_or_path,
    out_dir: str | Path,
    include_vision_tower: bool = True,
    *,
    processor=None,
    vision_tower_name: str | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write an HF LLaVA / LLaVA-NeXT model in the original LLaVA layout; return ``out_dir``.

    ``model_or_path`` is an HF directory, a model (then pass ``processor=``, or have ``model.name_or_path`` be its
    directory) or a ``(model, processor)`` pair. With ``include_vision_tower`` the CLIP weights go into the main
    checkpoint (``model.vision_tower.vision_tower.vision_model.*``, ``unfreeze_mm_vision_tower: true``); without
    it they go to ``out_dir/vision_tower``. ``vision_tower_name`` sets ``mm_vision_tower`` (default: the OpenAI hub
    id when the tower is exactly a standard one, else the written ``vision_tower/`` directory).
    """
    src_dir = None
    if isinstance(model_or_path, (str, Path)):
        src_dir = local_dir(model_or_path, what="checkpoint")
        model, loaded_processor = _load_hf(src_dir)
        processor = processor or loaded_processor
    elif isinstance(model_or_path, tuple):
        model, processor = model_or_path
    else:
        model = model_or_path
    if processor is None:
        name = getattr(model, "name_or_path", "") or ""
        if name and Path(name).is_dir() and not is_original_format(name):  # an HF directory holds the processor
            from llava.model.tokenizer import load_processor

            src_dir = Path(name)
            processor = load_processor(name)
        else:
            raise ValueError("hf_to_original needs the processor: pass processor=... or a saved HF directory")

    arch = type(model).__name__
    if arch not in (LLAVA, LLAVA_NEXT):
        raise ValueError(f"expected {LLAVA} or {LLAVA_NEXT}, got {arch}")
    cfg = model.config
    text_cfg, vision_cfg = cfg.text_config, cfg.vision_config
    if text_cfg.model_type != "llama":
        raise ValueError(f"only Llama language models have an original layout here, got {text_cfg.model_type!r}")
    if vision_cfg.model_type != "clip_vision_model":
        raise ValueError(f"only CLIP vision towers have an original layout here, got {vision_cfg.model_type!r}")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError(f"a list vision_feature_layer ({cfg.vision_feature_layer}) has no original equivalent")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Weights: text + head + projector (+ newline) (+ tower).
    projector, proj_sd = _projector_to_original(model)
    original: dict[str, torch.Tensor] = {}
    vision_sd: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(HF_PROJECTOR):
            continue
        name = to_original_key(key)
        if name is None:
            raise ValueError(f"no original name for weight {key!r}")
        if name.startswith(ORIGINAL_VISION):
            vision_sd[key[len(HF_VISION):]] = value
            if not include_vision_tower:
                continue
        original[name] = value
    original.update(proj_sd)
    _save_safetensors(original, out, max_shard_size)

    # Vision tower name / side directory.
    image_processor = processor.image_processor
    preprocessor = _clip_preprocessor_config(image_processor, vision_cfg.image_size)
    tower = vision_tower_name if include_vision_tower else None
    if tower is None and include_vision_tower:
        tower = _standard_tower(vision_cfg, preprocessor)
    if tower is None:
        side = out / "vision_tower"
        _write_clip_dir(side, vision_sd, vision_cfg, preprocessor)
        tower = str(side.resolve())

    # Config.
    tok = processor.tokenizer
    if arch == LLAVA_NEXT:
        ratio, merge = "anyres", "spatial_unpad"
    elif getattr(image_processor, "do_pad", False) and type(image_processor).__name__.startswith("LlavaImageProcessor"):
        ratio, merge = "pad", "flat"
    else:
        ratio, merge = "square", "flat"
    dtype = model.dtype
    conf = _original_text_config(text_cfg)
    conf.update({
        "_name_or_path": str(src_dir) if src_dir else "",
        "architectures": [ORIGINAL_ARCHITECTURE],
        "model_type": "llava",
        "mm_vision_tower": tower,
        "mm_hidden_size": vision_cfg.hidden_size,
        "mm_projector_type": projector,
        "mm_vision_select_layer": int(cfg.vision_feature_layer),
        "mm_vision_select_feature": "cls_patch" if cfg.vision_feature_select_strategy == "full" else "patch",
        "mm_patch_merge_type": merge,
        "image_aspect_ratio": ratio,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": bool(include_vision_tower),
        "mm_projector_lr": None,
        "tokenizer_padding_side": tok.padding_side,
        "tokenizer_model_max_length": int(tok.model_max_length) if tok.model_max_length < 10**9 else None,
        "torch_dtype": str(dtype).replace("torch.", ""),
    })
    if arch == LLAVA_NEXT:
        conf["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
    import transformers

    conf["transformers_version"] = transformers.__version__
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")

    # Tokenizer (keeps <image>/<pad>; see the module docstring) and generation settings.
    tok.save_pretrained(out)
    _tidy_tokenizer_config(out / "tokenizer_config.json")
    model.generation_config.save_pretrained(out)
    if src_dir is not None:
        copy_sentencepiece(src_dir, out)
    return out


def _tidy_tokenizer_config(path: Path) -> None:
    """Name the class the way the releases do and drop load-time bookkeeping transformers 5 writes back."""
    if not path.is_file():
        return
    conf = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "processor_class", "name_or_path"):
        conf.pop(key, None)
    if conf.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        conf["tokenizer_class"] = "LlamaTokenizer"
    path.write_text(json.dumps(conf, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _original_text_config(text_cfg) -> dict:
    d = text_cfg.to_dict()
    conf = {k: d[k] for k in LLAMA_CONFIG_KEYS if k in d}
    rope = dict(d.get("rope_parameters") or {})
    conf["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope_type = rope.get("rope_type", "default")
    conf["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    return conf


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    from llava.constants import DTYPES

    p = FlagParser(prog="python -m llava.model.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", allow_abbrev=False, help="original LLaVA layout -> transformers LlavaForConditionalGeneration / LlavaNext")
    to_hf.add_argument("--model_name_or_path", "--src", dest="src", required=True, metavar="DIR",
                       help="original-format checkpoint directory or hub name")
    to_hf.add_argument("--output_dir", "--out", dest="out", required=True, metavar="DIR", help="directory to write the HF checkpoint to")
    to_hf.add_argument("--vision_tower", default=None, help="CLIP directory or hub name (overrides mm_vision_tower)")
    to_hf.add_argument("--dtype", default="auto", choices=DTYPES, help="precision to write (default auto: as stored)")
    to_hf.add_argument("--image_aspect_ratio", default=None, choices=["pad", "square", "anyres"],
                       help="override the config's image_aspect_ratio (e.g. pad for LLaVA-1.6 with one view)")
    to_orig = sub.add_parser("to-original", allow_abbrev=False, help="HF LLaVA / LLaVA-NeXT directory -> original LLaVA layout")
    to_orig.add_argument("--model_name_or_path", "--src", dest="src", required=True, metavar="DIR",
                         help="HF-format checkpoint directory or hub name")
    to_orig.add_argument("--output_dir", "--out", dest="out", required=True, metavar="DIR",
                         help="directory to write the original-format checkpoint to")
    to_orig.add_argument("--separate_vision_tower", action="store_true",
                         help="write the CLIP tower to OUT/vision_tower instead of into the main weights")
    to_orig.add_argument("--vision_tower_name", default=None, help="value of mm_vision_tower (default: automatic)")
    a = p.parse_args(argv)
    if a.command == "to-hf":
        out = original_to_hf(a.src, a.out, vision_tower=a.vision_tower, dtype=a.dtype,
                             image_aspect_ratio=a.image_aspect_ratio)
    else:
        out = hf_to_original(a.src, a.out, include_vision_tower=not a.separate_vision_tower,
                             vision_tower_name=a.vision_tower_name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
