"""``modelspec.*`` (SAI ModelSpec 1.0.1) metadata and the hashes sd-scripts writes beside it."""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from typing import Mapping

import torch

ARCH_BASE = "stable-diffusion-xl-v1-base"
ARCHITECTURES = {
    "checkpoint": ARCH_BASE,
    "lora": ARCH_BASE + "/lora",
    "textual-inversion": ARCH_BASE + "/textual-inversion",
    "control-net-lllite": ARCH_BASE + "/control-net-lllite",
}
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
IMPLEMENTATION_VERSION = "sdxl-trainer/0.1.0"


def modelspec_metadata(
    title: str,
    kind: str = "checkpoint",
    resolution: tuple[int, int] = (1024, 1024),
    v_parameterization: bool = False,
    timestep_range: tuple[int, int] | None = None,
    extra: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """The ``modelspec.*`` keys for an SDXL output (``kind``: checkpoint, lora, textual-inversion, control-net-lllite).

    ``extra`` carries the user's ``--metadata_*`` values, e.g. ``{"author": "me"}``; None values are left out.
    """
    meta = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURES[kind],
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.implementation_version": IMPLEMENTATION_VERSION,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": _dt.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
    if timestep_range is not None and tuple(timestep_range) != (0, 1000):
        meta["modelspec.timestep_range"] = f"{timestep_range[0]},{timestep_range[1]}"
    for key, value in (extra or {}).items():
        if value is not None and value != "":
            meta[f"modelspec.{key}"] = str(value)
    return meta


def tensor_payload_hashes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` (sha256 of the safetensors bytes as written) and ``sshs_legacy_hash``.

    Computed over the serialised file with only ``ss_*``-free metadata, so a tool can recompute it
    from the file without the training metadata.
    """
    from safetensors.torch import save

    core = {k: v for k, v in metadata.items() if not k.startswith("ss_")}
    data = save(dict(state), metadata=core)
    full = hashlib.sha256(data).hexdigest()
    legacy = hashlib.sha256(data[0x100000:0x110000] if len(data) > 0x110000 else data).hexdigest()[:8]
    return {"sshs_model_hash": full, "sshs_legacy_hash": legacy}


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def json_metadata(value) -> str:
    """Stable JSON text for metadata values (sorted keys, unicode kept)."""
    buf = io.StringIO()
    json.dump(value, buf, ensure_ascii=False, sort_keys=True)
    return buf.getvalue()
