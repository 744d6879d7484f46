"""Which parameters train, LoRA, and the optimizer's parameter groups.

The three parts of a LLaVA model, by parameter name:

* ``vision``: the CLIP vision tower;
* ``projector``: the multimodal projector (and LLaVA-NeXT's ``image_newline``);
* ``language``: the language model, its embeddings and its head.

Rules (the paradigms of docs/method.md#paradigms choose ``unfreeze_mm_vision_tower`` per stage): all three parts
train by default, the vision tower included, as in the released code (whose tower trains whatever
its flags say); ``unfreeze_mm_vision_tower False`` freezes the tower; ``tune_mm_mlp_adapter``
trains the projector alone (and the tower only if ``unfreeze_mm_vision_tower`` is True);
``freeze_backbone`` freezes the language model; ``freeze_mm_mlp_adapter`` freezes the projector.
With LoRA, the language model's linear layers get adapters and its weights stay frozen, while the
projector and the vision tower, where they train, train in full as peft ``modules_to_save``. A
``linear`` projector keeps its identity second layer frozen. Integer (quantized) weights never
train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    vision: bool = True

    @classmethod
    def from_flags(cls, *, tune_mm_mlp_adapter: bool = False, freeze_backbone: bool = False,
                   unfreeze_mm_vision_tower: bool | None = None, freeze_mm_mlp_adapter: bool = False) -> "Trainable":
        """``unfreeze_mm_vision_tower`` None (not given): the tower trains unless ``tune_mm_mlp_adapter``."""
        vision = not tune_mm_mlp_adapter if unfreeze_mm_vision_tower is None else unfreeze_mm_vision_tower
        trainable = cls(language=not (tune_mm_mlp_adapter or freeze_backbone), projector=not freeze_mm_mlp_adapter, vision=vision)
        if not (trainable.language or trainable.projector or trainable.vision):
            raise ValueError("these flags freeze every parameter (language model, projector and vision tower): nothing would train")
        return trainable


def _frozen_identity(name: str, projector_type: str | None) -> bool:
    return projector_type == "linear" and "multi_modal_projector" in name and "linear_2" in name


def set_trainable(model: torch.nn.Module, trainable: Trainable) -> None:
    """Set ``requires_grad`` on a plain (not peft) LLaVA model."""
    projector_type = getattr(model.config, "mm_projector_type", None)
    for name, p in model.named_parameters():
        trains = getattr(trainable, part_of(name)) and not _frozen_identity(name, projector_type)
        p.requires_grad_(trains and p.is_floating_point())


def apply_lora(model, trainable: Trainable, *, r: int, alpha: int, dropout: float, bias: str = "none",
               adapters_in_model_dtype: bool = False):
    """Wrap ``model`` (a LLaVA model, or the ``ScoringModel`` that holds one under the same names) in peft
    LoRA adapters on the language model; a trainable projector/vision tower as modules_to_save.

    The result is a plain ``PeftModel``: its forward is ``model``'s own, and its adapters are saved as
    a LLaVA model's (``task_type`` ``CAUSAL_LM``, the same names), loadable onto the base model.
    peft keeps new adapters in float32 over a half-precision model (they train under autocast);
    ``adapters_in_model_dtype``: in the model's dtype instead, as DeepSpeed wants every trained weight
    in one dtype (it keeps the float32 master copies itself)."""
    from peft import LoraConfig, PeftModel

    modules_to_save = [module for module, trains in (("multi_modal_projector", trainable.projector),
                                                     ("vision_tower", trainable.vision)) if trains]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, target_modules=LORA_TARGETS,
                        modules_to_save=modules_to_save or None, task_type="CAUSAL_LM",
                        base_model_name_or_path=model.config.name_or_path or None)
    peft_model = PeftModel(model, config, autocast_adapter_dtype=not adapters_in_model_dtype)
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


def quantization(bits: int, *, quant_type: str, double_quant: bool, compute_dtype: torch.dtype, device) -> dict:
    """``from_pretrained`` arguments that load the language model in ``bits`` (4 or 8) with bitsandbytes (QLoRA).

    The vision tower, the projector and the head stay in full precision: the released code quantizes
    only the language model (its tower is loaded afterwards, unquantized, and it skips the projector).
    """
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_compute_dtype=compute_dtype,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_type=quant_type,
                                llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
    return {"quantization_config": config, "device_map": {"": device}}
