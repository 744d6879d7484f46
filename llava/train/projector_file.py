"""Stage 1's own output file: ``mm_projector.bin``, the projector weights alone, as LLaVA writes them.

LLaVA's pre-training (``--tune_mm_mlp_adapter True``) trains only the projector and saves it as
``mm_projector.bin`` with keys ``model.mm_projector.0.weight`` (first linear layer) and
``model.mm_projector.2.weight`` (second; 1 is the GELU); stage 2 reads it with
``--pretrain_mm_mlp_adapter``. Here the run also saves the whole model in HF format, and the
projector file is cut from that saved checkpoint, so it holds exactly the weights that were saved
(under ZeRO-3 too, where the Trainer gathers them for the save).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llava.train.params import part_of

PROJECTOR_FILE = "mm_projector.bin"
# HF LLaVA's projector layers -> the indices of LLaVA's nn.Sequential(Linear, GELU, Linear)
LLAVA_LAYER_NAMES = {"linear_1.": "0.", "linear_2.": "2."}


def trains_projector_only(model: torch.nn.Module) -> bool:
    """True when the projector is all that trains (``--tune_mm_mlp_adapter True``, stage 1)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return bool(names) and all(part_of(n) == "projector" for n in names)


def projector_state(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The projector's tensors of a saved HF LLaVA checkpoint, under LLaVA's ``mm_projector`` names."""
    from safetensors import safe_open

    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir}: no .safetensors file to take the projector from")
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if "multi_modal_projector." not in key:
                    continue
                layer = key.split("multi_modal_projector.")[-1]
                for hf, llava in LLAVA_LAYER_NAMES.items():
                    layer = layer.replace(hf, llava, 1) if layer.startswith(hf) else layer
                state[f"model.mm_projector.{layer}"] = f.get_tensor(key)
    if not state:
        raise ValueError(f"{checkpoint_dir}: the checkpoint has no multi_modal_projector weights")
    return state


def load_projector_file(model, path: str | Path) -> None:
    """``--pretrain_mm_mlp_adapter``: projector weights from stage 1 into an HF LLaVA model.

    Takes LLaVA's ``mm_projector.bin`` (``model.mm_projector.0.weight``...) or a file with HF names
    (``multi_modal_projector.linear_1.weight``...), as ``.bin`` or ``.safetensors``; the weights must
    fit the projector exactly (a missing or extra tensor is an error, not a silent partial load).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter {path}: file not found")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(file)
    else:
        weights = torch.load(file, map_location="cpu", weights_only=True)
    hf_layer_names = {llava: hf for hf, llava in LLAVA_LAYER_NAMES.items()}
    own = {}
    for key, value in weights.items():
        layer = key.split("mm_projector.")[-1].split("multi_modal_projector.")[-1]
        prefix = next((p for p in hf_layer_names if layer.startswith(p)), None)
        own[hf_layer_names[prefix] + layer[len(prefix):] if prefix else layer] = value
    model.model.multi_modal_projector.load_state_dict(own)


def write_projector_file(checkpoint_dir: str | Path) -> Path:
    """Write ``mm_projector.bin`` next to the saved checkpoint; return its path."""
    path = Path(checkpoint_dir) / PROJECTOR_FILE
    torch.save(projector_state(checkpoint_dir), path)
    return path
