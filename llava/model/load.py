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

import logging
from pathlib import Path

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.model.hub import HubError, local_dir, repo_of_snapshot
from llava.model.parts import (ModelLoadError, add_llava_tokens, clip_image_settings, default_pinpoints, grow_rows,  # noqa: F401
                               llava_processor, parse_dtype, read_json, save_model, set_generation_tokens)
from llava.model.original_layout import load_original
from llava.model.tokenizer import load_processor, load_tokenizer
from llava.model.weights import import_model_classes

logger = logging.getLogger(__name__)

LLAVA_MODEL_TYPES = ("llava", "llava_next")
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")


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
    cfg = read_json(path / "config.json")
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
    adapter = read_json(adapter_dir / "adapter_config.json")
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
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = resolve(path, revision)
    kind = checkpoint_kind(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization and kind == "original":
        raise ModelLoadError(f"{path}: quantized loading needs an HF-format checkpoint: convert it first (python -m llava.model.convert)")
    kwargs.update(quantization or {})
    if kind == "hf":
        import_model_classes(AutoConfig.from_pretrained(path))
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        return model, load_processor(path)
    if kind == "original":
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
    if not tower_cfg.is_file() or read_json(tower_cfg).get("model_type") not in ("clip", "clip_vision_model"):
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
            # name the CLIP hub id anyway); an original-format one is given its own tower (weights
            # inside, mm_vision_tower, or a vision_tower/ beside it), which it says it cannot find if
            # it has none: only a run that needs the flag's tower must find it
            kind = checkpoint_kind(model_args.model_name_or_path)
            if kind == "original":
                logger.warning("--vision_tower %s is not here (offline, not cached): %s uses its own tower",
                               model_args.vision_tower, model_args.model_name_or_path)
                model_args.vision_tower = None
            elif kind != "hf":
                raise
    if model_args.pretrain_mm_mlp_adapter:
        try:
            model_args.pretrain_mm_mlp_adapter = str(local_file(model_args.pretrain_mm_mlp_adapter,
                                                                what="--pretrain_mm_mlp_adapter"))
        except HubError as e:
            raise ModelLoadError(str(e)) from e
