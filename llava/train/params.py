"""Which parameters train, LoRA, and the optimizer's parameter groups.

The three parts of a LLaVA model, by parameter name:

* ``vision``: the CLIP vision tower;
* ``projector``: the multimodal projector (and LLaVA-NeXT's ``image_newline``);
* ``language``: the language model, its embeddings and its head.

Rules (the paradigms of METHOD.md choose ``unfreeze_mm_vision_tower`` per stage): language model
and projector train; the vision tower trains with ``unfreeze_mm_vision_tower``;
``tune_mm_mlp_adapter`` trains the projector alone; ``freeze_backbone`` freezes the language
model; with LoRA, the language model's linear layers get adapters and its weights stay frozen,
while the projector (and the vision tower, if unfrozen) train in full as peft
``modules_to_save``. A ``linear`` projector keeps its identity second layer frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARTS = ("vision", "projector", "language")
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def part_of(name: str) -> str:
    if "vision_tower" in name:
        return "vision"
    if "multi_modal_projector" in name or "image_newline" in name:
        return "projector"
    return "language"


@dataclass(frozen=True)
class Trainable:
    language: bool = True
    projector: bool = True
    vision: bool = False

    @classmethod
    def from_flags(cls, *, tune_mm_mlp_adapter: bool = False, freeze_backbone: bool = False,
                   unfreeze_mm_vision_tower: bool = False) -> "Trainable":
        if tune_mm_mlp_adapter:
            return cls(language=False, projector=True, vision=False)
        return cls(language=not freeze_backbone, projector=True, vision=unfreeze_mm_vision_tower)


def _frozen_identity(name: str, projector_type: str | None) -> bool:
    return projector_type == "linear" and "multi_modal_projector" in name and "linear_2" in name


def set_trainable(model: torch.nn.Module, trainable: Trainable) -> None:
    """Set ``requires_grad`` on a plain (not peft) LLaVA model."""
    projector_type = getattr(model.config, "mm_projector_type", None)
    for name, p in model.named_parameters():
        p.requires_grad_(getattr(trainable, part_of(name)) and not _frozen_identity(name, projector_type))


def apply_lora(model, trainable: Trainable, *, r: int, alpha: int, dropout: float, bias: str = "none"):
    """Wrap ``model`` in peft LoRA adapters on the language model; projector/vision as modules_to_save."""
    from peft import LoraConfig, get_peft_model

    if not trainable.projector:
        raise ValueError("LoRA needs a trainable projector")
    modules_to_save = ["multi_modal_projector"] + (["vision_tower"] if trainable.vision else [])
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, target_modules=LORA_TARGETS,
                        modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    projector_type = getattr(model.config, "mm_projector_type", None)
    for name, p in peft_model.named_parameters():
        if _frozen_identity(name, projector_type):
            p.requires_grad_(False)
    return peft_model


def parameter_groups(model: torch.nn.Module, *, lr: float, weight_decay: float, decay_names: set[str],
                     projector_lr: float | None = None, vision_lr: float | None = None) -> list[dict]:
    """Optimizer groups: (part, with/without weight decay), each part at its own learning rate."""
    lrs = {"language": lr, "projector": projector_lr or lr, "vision": vision_lr or lr}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((part_of(name), name in decay_names), []).append(p)
    return [
        {"params": params, "lr": lrs[part], "weight_decay": weight_decay if decay else 0.0, "name": f"{part}/{'decay' if decay else 'no_decay'}"}
        for (part, decay), params in sorted(groups.items())
    ]
