"""Load, compose and save LLaVA checkpoints: local directories, or hub names (``org/name``, ``llava.model.hub``).

* an HF-format LLaVA-1.5 / LLaVA-NeXT directory (what ``llava-hf/*`` checkpoints look like);
* a peft LoRA adapter directory on a base (``model_base``), optionally merged;
* an original-format LLaVA directory (``liuhaotian/llava-v1.5-*`` layout), converted on load;
* a new LLaVA composed of a CLIP vision tower and a causal language model, as LLaVA's
  pre-training does (``compose``).

Every path here may also be a hub repository name: it is resolved through ``huggingface_hub`` (its cache,
``HF_HUB_OFFLINE``, tokens) to the local snapshot directory, which is then read as any directory; ``revision``
pins the main checkpoint's branch, tag or commit. A LoRA adapter's base is its ``--model_base`` or the
``base_model_name_or_path`` (and ``revision``) its adapter_config.json records.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PAD_TOKEN
from llava.conversation import VICUNA_V1_CHAT_TEMPLATE
from llava.model.hub import HubError, local_dir, repo_of_snapshot
from llava.model.tokenizer import load_processor, load_tokenizer

LLAVA_MODEL_TYPES = ("llava", "llava_next")
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")


class ModelLoadError(ValueError):
    """A model path that cannot be loaded, with the reason in words."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read ({e})")


def resolve(path: str | Path, revision: str | None = None, *, what: str = "model") -> Path:
    """The local directory of ``path``: itself, or the hub snapshot of a hub name (``llava.model.hub``)."""
    try:
        return local_dir(path, revision, what=what)
    except HubError as e:
        raise ModelLoadError(str(e)) from e


def checkpoint_kind(path: str | Path, revision: str | None = None) -> str:
    """``hf``, ``lora``, ``original`` (LLaVA's own layout) or ``causal_lm`` for a directory or hub name."""
    path = resolve(path, revision)
    if not path.is_dir():
        raise ModelLoadError(f"model path not found: {path} (neither a local directory nor a hub name org/name)")
    if (path / "adapter_config.json").is_file():
        return "lora"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (not a model directory)")
    cfg = _read_json(path / "config.json")
    if cfg.get("model_type") in LLAVA_MODEL_TYPES and "text_config" in cfg:
        return "hf"
    if "mm_vision_tower" in cfg or any("Llava" in a for a in cfg.get("architectures") or []):
        return "original"
    return "causal_lm"


def lora_base(adapter_dir: Path, model_base: str | Path | None = None) -> Path:
    """The local directory of a LoRA adapter's base: ``model_base``, else the one its adapter_config.json names.

    A base recorded as a hub-cache snapshot path that is not on this machine (an adapter trained elsewhere)
    is looked up again by its repository name and commit.
    """
    adapter = _read_json(adapter_dir / "adapter_config.json")
    base, revision = model_base, None
    if base is None:
        base, revision = adapter.get("base_model_name_or_path"), adapter.get("revision")
        cached = repo_of_snapshot(base) if base and not Path(base).exists() else None
        if cached:
            base, revision = cached
    if not base:
        raise ModelLoadError(f"{adapter_dir} is a LoRA adapter: pass its base model with --model_base (a directory or hub name)")
    try:
        found = local_dir(base, revision, what=f"base model of the LoRA adapter {adapter_dir}")
    except HubError as e:
        raise ModelLoadError(f"{e} (pass the base with --model_base)") from e
    if not found.is_dir():
        raise ModelLoadError(f"{adapter_dir} is a LoRA adapter: pass its base model directory with --model_base (got {str(base)!r})")
    return found


def load_model(path: str | Path, model_base: str | Path | None = None, *, dtype: torch.dtype | None = None,
               merge_lora: bool = False, vision_tower: str | None = None, attn_implementation: str | None = None,
               revision: str | None = None, quantization: dict | None = None):
    """``(model, processor)`` for an HF, LoRA-adapter or original-format LLaVA directory or hub name.

    ``quantization``: ``from_pretrained``'s ``quantization_config`` and ``device_map`` (QLoRA), for
    HF-format checkpoints.
    """
    from transformers import AutoModelForImageTextToText

    path = resolve(path, revision)
    kind = checkpoint_kind(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization and kind == "original":
        raise ModelLoadError(f"{path}: quantized loading needs an HF-format checkpoint: convert it first (python -m llava.model.convert)")
    kwargs.update(quantization or {})
    if kind == "hf":
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        return model, load_processor(path)
    if kind == "original":
        from llava.model.original_layout import load_original

        model, processor = load_original(path, vision_tower=vision_tower, dtype=dtype)
        return model, processor
    if kind == "lora":
        from peft import PeftModel

        base = lora_base(path, model_base)
        model, processor = load_model(base, dtype=dtype, vision_tower=vision_tower, attn_implementation=attn_implementation,
                                      quantization=quantization)
        model = PeftModel.from_pretrained(model, str(path))
        if merge_lora:
            model = model.merge_and_unload()
        if (Path(path) / "processor_config.json").is_file() or (Path(path) / "preprocessor_config.json").is_file():
            processor = load_processor(path)
        return model, processor
    raise ModelLoadError(
        f"{path} is a plain language model, not a LLaVA: give a CLIP directory with --vision_tower to compose one"
    )


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
        raw = _read_json(saved)
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


def compose(language_model: str | Path, vision_tower: str | Path, *, projector_type: str = "mlp2x_gelu",
            select_layer: int = -2, select_feature: str = "patch", next_arch: bool = False,
            dtype: torch.dtype | None = None, seed: int = 0):
    """A new LLaVA from a CLIP vision tower and a causal LM (directories or hub names), projector freshly initialised.

    The parts' tensors are read from their files and renamed into one LLaVA state dict, which
    ``from_state_dict`` loads (ZeRO-3 aware): no part is instantiated on its own, so under ZeRO-3 no
    partitioned (empty) parameter is ever read. The projector is drawn from ``seed`` alone
    (``fresh_projector``), so every launch (ZeRO-2, ZeRO-3, one process) composes the same model.
    ``linear`` (a single linear projector) is written exactly in the native two-layer projector:
    ``projector_hidden_act="linear"`` and an identity second layer, which ``llava.train`` keeps frozen.
    """
    from transformers import (AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from llava.model.weights import clip_vision_weights, from_state_dict, read_weights, weight_files

    if projector_type not in PROJECTOR_TYPES:
        raise ModelLoadError(f"--mm_projector_type must be one of {PROJECTOR_TYPES}, got {projector_type!r}")
    if select_feature not in ("patch", "cls_patch"):
        raise ModelLoadError(f"--mm_vision_select_feature must be patch or cls_patch, got {select_feature!r}")
    language_model = resolve(language_model, what="language model")
    vision_tower = resolve(vision_tower, what="--vision_tower")
    tower_cfg = vision_tower / "config.json"
    if not tower_cfg.is_file() or _read_json(tower_cfg).get("model_type") not in ("clip", "clip_vision_model"):
        raise ModelLoadError(f"--vision_tower {vision_tower}: not a local CLIP model directory")
    lm_config = AutoConfig.from_pretrained(language_model)
    tower_config = CLIPVisionConfig.from_pretrained(vision_tower)
    tokenizer = load_tokenizer(language_model)
    add_llava_tokens(tokenizer)

    files = weight_files(language_model)
    if not files:
        raise ModelLoadError(f"{language_model}: no model weights (*.safetensors / pytorch_model*.bin)")
    lm_weights = read_weights(files)
    # the causal LM's base model (``model.*`` for Llama, Vicuna, Mistral) is LLaVA's ``model.language_model``
    prefix = MODEL_FOR_CAUSAL_LM_MAPPING[type(lm_config)].base_model_prefix + "."
    sd = {("model.language_model." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in lm_weights.items()}
    embed = "model.language_model.embed_tokens.weight"
    if "lm_head.weight" not in sd and lm_config.tie_word_embeddings:
        sd["lm_head.weight"] = sd[embed]
    vocab = max(sd[embed].shape[0], len(tokenizer))
    for name in (embed, "lm_head.weight"):
        sd[name] = grow_rows(sd[name], vocab)
    lm_config.vocab_size = vocab
    sd.update(clip_vision_weights(vision_tower, "model.vision_tower."))
    sd.update(fresh_projector(tower_config.hidden_size, lm_config.hidden_size, projector_type,
                              std=getattr(lm_config, "initializer_range", 0.02), seed=seed))

    common = dict(
        vision_config=tower_config, text_config=lm_config, image_token_id=tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
        projector_hidden_act="gelu" if projector_type == "mlp2x_gelu" else "linear",
        vision_feature_select_strategy="default" if select_feature == "patch" else "full",
        vision_feature_layer=select_layer, tie_word_embeddings=lm_config.tie_word_embeddings,
    )
    pinpoints = default_pinpoints(tower_config.image_size) if next_arch else None
    processor = llava_processor(tokenizer, clip_image_settings(vision_tower, tower_config.image_size),
                                patch_size=tower_config.patch_size, strategy=common["vision_feature_select_strategy"],
                                pinpoints=pinpoints)
    if next_arch:
        config, cls = LlavaNextConfig(image_grid_pinpoints=pinpoints, **common), LlavaNextForConditionalGeneration
        # the row LLaVA-NeXT appends after each row of tiles: drawn like the original code's (randn / sqrt(hidden))
        generator = torch.Generator().manual_seed(seed + 1)
        sd["model.image_newline"] = torch.randn(lm_config.hidden_size, generator=generator) / lm_config.hidden_size ** 0.5
    else:
        config, cls = LlavaConfig(**common), LlavaForConditionalGeneration
    config.mm_projector_type = projector_type
    dtype = dtype or sd[embed].dtype
    model = from_state_dict(cls, config, sd, dtype, f"composing {language_model} with {vision_tower}")
    set_generation_tokens(model, tokenizer)
    return model, processor


def fresh_projector(vision_hidden: int, text_hidden: int, projector_type: str, *, std: float, seed: int) -> dict[str, torch.Tensor]:
    """The HF projector's tensors for a new LLaVA: normal(0, ``std``) weights and zero biases (transformers'
    own initialisation of a Linear), drawn from ``seed``; for ``linear`` the second layer is the identity."""
    generator = torch.Generator().manual_seed(seed)
    out = {
        "model.multi_modal_projector.linear_1.weight": torch.randn(text_hidden, vision_hidden, generator=generator) * std,
        "model.multi_modal_projector.linear_1.bias": torch.zeros(text_hidden),
        "model.multi_modal_projector.linear_2.weight": torch.randn(text_hidden, text_hidden, generator=generator) * std,
        "model.multi_modal_projector.linear_2.bias": torch.zeros(text_hidden),
    }
    if projector_type == "linear":
        out["model.multi_modal_projector.linear_2.weight"] = torch.eye(text_hidden)
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


def resolve_hub_arguments(model_args) -> None:
    """Replace hub names in training's ``ModelArguments`` by local paths, in place, before anything reads them:
    ``--model_name_or_path`` (at ``--model_revision``), ``--vision_tower`` and ``--pretrain_mm_mlp_adapter``
    (``org/name``: its ``mm_projector.bin``; ``org/name/FILE``). Fingerprints, loaders and the saved
    adapter's base then all see the same local snapshot."""
    from llava.model.hub import local_file

    model_args.model_name_or_path = str(resolve(model_args.model_name_or_path, getattr(model_args, "model_revision", None),
                                                what="--model_name_or_path"))
    if model_args.vision_tower:
        try:
            model_args.vision_tower = str(resolve(model_args.vision_tower, what="--vision_tower"))
        except (HubError, ModelLoadError):
            # an HF-format LLaVA brings its own tower and never reads this flag (the released scripts
            # name the CLIP hub id anyway); an original-format one that names the same tower finds it as
            # it would without the flag (its weights inside, or a vision_tower/ beside): only a run
            # that needs the tower must find it
            kind = checkpoint_kind(model_args.model_name_or_path)
            own = _read_json(Path(model_args.model_name_or_path) / "config.json").get("mm_vision_tower") if kind == "original" else None
            if kind == "original" and own == model_args.vision_tower:
                model_args.vision_tower = None
            elif kind != "hf":
                raise
    if model_args.pretrain_mm_mlp_adapter:
        try:
            model_args.pretrain_mm_mlp_adapter = str(local_file(model_args.pretrain_mm_mlp_adapter,
                                                                what="--pretrain_mm_mlp_adapter"))
        except HubError as e:
            raise ModelLoadError(str(e)) from e
