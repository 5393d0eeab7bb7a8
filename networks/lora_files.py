"""Reading LoRA files: kohya keys on SAI paths, kohya keys on diffusers paths, or PEFT-style keys."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from library.errors import UserError

UNET_PREFIX = "lora_unet"
_KEY_SUFFIXES = {"lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight", "alpha": "alpha",
                 "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_PEFT_PREFIXES = {"unet.": UNET_PREFIX, "text_encoder.": "lora_te1", "text_encoder_2.": "lora_te2"}


def load_lora_file(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a LoRA file's tensors (safetensors, or a torch pickle for .pt/.ckpt) on the CPU."""
    path = Path(file)
    if not path.is_file():
        raise UserError(f"{path}: LoRA file not found")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, wrong format
        raise UserError(f"{path}: cannot read the LoRA file ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a LoRA state dict")
    return state


def normalize_lora_keys(weights_sd: Mapping[str, torch.Tensor],
                        unet_aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Rename diffusers-style keys to kohya SAI names; other keys pass through unchanged.

    Accepts kohya names with diffusers U-Net paths (``lora_unet_down_blocks_...``) and PEFT-style
    keys (``unet.<path>.lora_A.weight`` / ``text_encoder(_2).<path>.lora_B.weight``; no alpha means
    alpha = rank).
    """
    out: dict[str, torch.Tensor] = {}
    peft_modules: set[str] = set()
    for key, tensor in weights_sd.items():
        suffix = next((s for s in _KEY_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            out[key] = tensor
            continue
        module = key[: -len(suffix) - 1]
        for prefix, kohya in _PEFT_PREFIXES.items():
            if module.startswith(prefix):
                path = module[len(prefix):]
                if kohya != UNET_PREFIX and not path.startswith("text_model."):
                    path = "text_model." + path
                module = unet_aliases.get(f"{kohya}_{path.replace('.', '_')}", f"{kohya}_{path.replace('.', '_')}")
                peft_modules.add(module)
                break
        module = unet_aliases.get(module, module)
        out[f"{module}.{_KEY_SUFFIXES[suffix]}"] = tensor
    for module in peft_modules:
        down = out.get(f"{module}.lora_down.weight")
        if down is not None and f"{module}.alpha" not in out:
            out[f"{module}.alpha"] = torch.tensor(float(down.shape[0]))
    return out
