"""The forward pass of every stage: batch -> image features -> hidden states -> log-probabilities.

Built from the native model's own parts (vision tower, projector, language model, head), so any
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` (plain, peft-wrapped or
inside a DeepSpeed engine) runs it. The batch layout is the collators' (``llava.data.collate``).

``response_logps`` runs the language-model head on the scored positions only, in chunks, each
chunk recomputed in backward rather than stored, so no ``[positions x vocabulary]`` tensor ever
exists for whole sequences. Tree-packed rows run through ``llava.model.tree_attention`` when the
language model's kernel is ``sdpa_tree`` (masked-out pairs skipped), and through the dense masked
kernel otherwise (``sdpa``/``eager``, the reference, with the mask built from the layout here). Nothing
in ``response_logps`` reads a value back from the device (no ``.item()``, ``.tolist()``, boolean
indexing): the layout and the gather plan come from the collator as host integers and index tensors,
so a GPU step is queued without waiting (tests/test_host_syncs.py). ``response_logps_naive`` is the published
computation (full logits at every position of every sequence, then a log-softmax over the
vocabulary), kept as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llava.model.tree_attention import TREE_SDPA

LOGP_CHUNK = 1024  # scored positions per head chunk


def unwrap(model):
    """The LLaVA model inside a DeepSpeed engine, DDP wrapper or peft model (LoRA layers stay in)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DeepSpeed, DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


def is_llava_next(model) -> bool:
    return hasattr(unwrap(model).model, "image_newline")


def image_features(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Projected features of each image, ``[tokens_i, hidden]``, in the order of ``pixel_values``.

    ``[N, 3, S, S]`` is one view per image: LLaVA-1.5's path, and for LLaVA-NeXT the single padded
    view the paper uses (576 tokens at 336 px, no newline embedding), as the original LLaVA code
    does for a 4-D image batch. ``[N, P, 3, S, S]`` with ``image_sizes`` is LLaVA-NeXT's multi-crop.
    """
    llava = unwrap(model).model
    cfg = llava.config
    if pixel_values.dim() == 5:
        return list(llava.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output)
    if not is_llava_next(model):
        return list(llava.get_image_features(pixel_values, return_dict=True).pooler_output)
    out = llava.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    layer = cfg.vision_feature_layer
    layers = [layer] if isinstance(layer, int) else list(layer)
    selected = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
    if cfg.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]
    return list(llava.multi_modal_projector(selected))


def embed(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
          image_sizes: torch.Tensor | None = None, image_tokens: int | None = None) -> torch.Tensor:
    """Input embeddings ``[R, L, H]`` with each image's features written over its image tokens.

    ``image_tokens``: how many image token ids ``input_ids`` holds, when the caller counted them on the
    host (the collators do); otherwise they are counted here, which waits for the device."""
    llava = unwrap(model)
    embeds = llava.get_input_embeddings()(input_ids)
    if pixel_values is None:
        return embeds
    pixels = pixel_values.to(next(llava.model.vision_tower.parameters()).dtype)
    features = torch.cat(image_features(model, pixels, image_sizes)).to(embeds.dtype)
    slots = input_ids == llava.config.image_token_id
    if image_tokens is None:
        image_tokens = int(slots.sum())
    if image_tokens != features.shape[0]:
        raise ValueError(f"{image_tokens} image tokens in the batch but {features.shape[0]} image features")
    return embeds.masked_scatter(slots.unsqueeze(-1), features)


def hidden_states(model, batch: dict) -> torch.Tensor:
    """Last hidden states ``[R, L, H]`` of the language model with the images in place."""
    llava = unwrap(model)
    embeds = embed(model, batch["input_ids"], batch.get("pixel_values"), batch.get("image_sizes"), batch.get("image_tokens"))
    tree, extra = batch.get("tree"), {}
    if tree is None:
        mask = batch["attention_mask"]
    elif llava.model.language_model.config._attn_implementation == TREE_SDPA:
        # The kernel reads the layout. transformers passes a 4-D mask through its mask preparation untouched
        # (a 2-D one or none would be turned into a dense mask); this one is a stride-0 view of one element.
        mask = torch.ones((), dtype=torch.bool, device=embeds.device).expand(tree.rows, 1, tree.length, tree.length)
        extra["tree_layout"] = tree
    else:  # the dense reference: an additive float mask in the model's dtype (0 = attend)
        allowed = tree.dense(embeds.device)
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(~allowed, torch.finfo(embeds.dtype).min)
    out = llava.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=batch.get("position_ids"), use_cache=False, return_dict=True,
        **extra,
    )
    return out.last_hidden_state


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor, chunk: int = LOGP_CHUNK) -> torch.Tensor:
    """``log p(target_t | hidden_t)`` for ``hidden [T, H]``; the head sees ``chunk`` rows at a time."""
    parts = []
    for h, t in zip(hidden.split(chunk), target.split(chunk)):
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_logps, head, h, t, use_reentrant=False))
        else:
            parts.append(_chunk_logps(head, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def response_logps(model, batch: dict, chunk: int = LOGP_CHUNK) -> torch.Tensor:
    """Summed log-probabilities ``[B, C]`` of the scored tokens of each record and condition."""
    hidden = hidden_states(model, batch)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["scored_index"])
    logps = token_logps(unwrap(model).lm_head, flat, batch["scored_target"], chunk)
    shape = batch["logp_mask"].shape
    out = logps.new_zeros(shape.numel()).index_copy(0, batch["scored_slot"], logps)  # each slot once: deterministic
    return out.view(shape).sum(-1)


def response_logps_naive(model, batch: dict) -> torch.Tensor:
    """The published computation: the native forward over full sequences, full-vocabulary log-softmax.

    Only for the padding-masked (naive) layout, which gives each condition its own row and image.
    """
    if "tree" in batch:
        raise ValueError("the naive forward needs the naive (one row per condition) batch layout")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes") if k in batch}
    inputs["attention_mask"] = inputs["attention_mask"].long()
    if "pixel_values" in inputs and inputs["pixel_values"].dim() == 4 and is_llava_next(model):
        # LLaVA-NeXT's own forward always tiles: give it the single-view features it cannot compute.
        features = image_features(model, inputs.pop("pixel_values"))
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    logits = model(**inputs, use_cache=False, return_dict=True).logits
    logps = F.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    mask = batch["logp_mask"]
    picked = logps[batch["logp_index"], batch["logp_target"]]
    return (picked * mask).sum(-1)
