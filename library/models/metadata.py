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
    """``sshs_model_hash`` and ``sshs_legacy_hash`` of the safetensors file ``state`` is written to.

    A1111 and Civitai read these instead of hashing the file. ``sshs_model_hash`` is the sha256 of
    the bytes after the safetensors header (8-byte length + header JSON), which do not depend on the
    metadata, so it equals the hash of the final file whatever metadata it gets. ``sshs_legacy_hash``
    is, as sd-scripts and sd-webui-additional-networks compute it, the first 8 hex digits of the
    sha256 of bytes 0x100000..0x110000 of the file serialised with only its ``ss_*`` metadata.
    """
    from safetensors.torch import save

    training_meta = {k: str(v) for k, v in metadata.items() if k.startswith("ss_")}
    data = save(dict(state), metadata=training_meta)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(memoryview(data)[8 + header_len:]).hexdigest()
    legacy = hashlib.sha256(memoryview(data)[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}


def safetensors_payload_sha256(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a safetensors file's bytes after its header (what ``sshs_model_hash`` holds)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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
