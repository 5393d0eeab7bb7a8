"""SDXL textual-inversion embedding files: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.

The layout is the one sd-scripts, A1111/Forge and ComfyUI use for SDXL: one tensor per text
encoder, the rows being the n vectors of the token. Files are ``.safetensors`` (with string
metadata) or a torch pickle (``.pt`` / ``.ckpt``) holding the same dict; pickles are read with
``torch.load(weights_only=True)``, so a file can never run code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError

from library.errors import UserError
from library.models.atomic import atomic_path

KEYS = ("clip_l", "clip_g")  # TE1 (CLIP ViT-L), TE2 (OpenCLIP ViT-bigG)
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin")


def _as_matrix(value, path: Path, key: str, option: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or value.numel() == 0:
        raise UserError(f"{option}: {path}: '{key}' is not a [vectors, width] tensor")
    return value.reshape(-1, value.shape[-1])  # a single vector may be stored 1-D


def read_embedding(path: str | os.PathLike, option: str = "--weights") -> tuple[torch.Tensor, torch.Tensor]:
    """``(clip_l [n, C1], clip_g [n, C2])`` of an SDXL embedding file, as float32 CPU tensors.

    ``option`` names the command-line option in messages. Raises a one-line UserError for a
    missing, unreadable or non-SDXL file (an SD 1.x embedding has no ``clip_l``/``clip_g``).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option}: {path} not found")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        # a broken or foreign file: say so on one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{option}: cannot read {path}: {reason}") from None
    if not isinstance(data, dict) or not all(k in data for k in KEYS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{option}: {path} is not an SDXL embedding: it must hold 'clip_l' and 'clip_g' "
                        f"tensors (found {found})")
    clip_l, clip_g = (_as_matrix(data[k], path, k, option) for k in KEYS)
    if clip_l.shape[0] != clip_g.shape[0]:
        raise UserError(f"{option}: {path}: 'clip_l' has {clip_l.shape[0]} vectors but 'clip_g' has "
                        f"{clip_g.shape[0]}")
    return clip_l.float().contiguous(), clip_g.float().contiguous()


def write_embedding(path: str | os.PathLike, clip_l: torch.Tensor, clip_g: torch.Tensor,
                    dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write ``{"clip_l", "clip_g"}`` to ``path`` atomically (temp file + rename).

    ``.safetensors`` gets ``metadata`` (string to string); ``.pt``/``.ckpt`` are a plain torch
    pickle of the dict, as sd-scripts writes them (no metadata). ``dtype`` casts both tensors
    (None keeps float32).
    """
    path = Path(path)
    state = {key: t.detach().to("cpu", dtype or torch.float32).contiguous() for key, t in zip(KEYS, (clip_l, clip_g))}
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata=dict(metadata or {}))
        elif path.suffix.lower() in PICKLE_SUFFIXES:
            torch.save(state, tmp)
        else:
            raise UserError(f"--save_model_as: cannot write an embedding as {path.suffix!r}; use pt, ckpt or "
                            "safetensors")
    return path
