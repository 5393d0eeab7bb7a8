"""Saved training states (``--save_state`` / ``--resume``): complete or absent, and never code.

A state folder holds accelerate's files (``model*.safetensors``, ``optimizer*.bin``,
``scheduler*.bin``, ``random_states_<rank>.pkl``, ``scaler.pt`` with fp16) plus ours:

* ``sdxl_trainer_state.json``: the completion marker, written last. It holds the format version,
  the training progress (epoch, global step, position in the epoch, noise-RNG state) and the
  size of every file in the folder.
* ``custom_state_<i>.safetensors``: the state of each object registered with
  ``accelerator.register_for_checkpointing`` (EMA, ...), tensors as safetensors and the rest as
  JSON in its metadata. accelerate itself would write ``custom_checkpoint_<i>.pkl`` and load it with
  ``weights_only=False`` (arbitrary code); we take those objects out of its hands while it saves
  and loads.
* ``train_state.json``: sd-scripts' readable counters.

Saving writes everything under ``.<name>.partial_.tmp`` and renames the folder into place when
complete, so a kill leaves only a temporary (removed at the next start) and never a half folder
under the final name. Loading refuses, with one line, a folder without a valid marker (incomplete
or foreign), with files missing or changed, with ``custom_checkpoint_*.pkl`` files, or with any
pickle that needs more than tensors and plain numbers (every ``.bin``/``.pkl``/``.pt`` file is
first opened with ``torch.load(weights_only=True)``, memory-mapped, which never runs code);
accelerate then loads with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import UserError
from library.models.atomic import is_no_space, no_space_error, replace_dir
from library.training.checkpointing import TrainProgress, write_train_state

logger = logging.getLogger(__name__)

MARKER_FILE = "sdxl_trainer_state.json"
STATE_FORMAT = "sdxl-trainer-state"
STATE_VERSION = 1
PARTIAL_SUFFIX = ".partial_.tmp"  # matches library.training.output_dir's temp-name pattern
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")
_ACCELERATE_PICKLE = re.compile(r"^custom_checkpoint_\d+\.pkl$")


def partial_dir(target: Path) -> Path:
    """The temporary name a state folder is written under before it is renamed to ``target``."""
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def _custom_objects_withheld(accelerator) -> Iterator[list]:
    """Take the registered custom objects away from accelerate for the block (we save/load them)."""
    objects = getattr(accelerator, "_custom_objects", None)
    if objects is None:
        yield []
        return
    held = list(objects)
    objects.clear()
    try:
        yield held
    finally:
        objects.extend(held)


# --- custom objects as safetensors + JSON ------------------------------------------------------------


def _split(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` with every tensor replaced by a reference into ``tensors``."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("state dict keys must be strings")
        return {k: _split(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a state file")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_object_state(state: dict, path: Path) -> None:
    """Write a state dict of tensors and plain values as safetensors (structure in the metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _split(state, tensors)
    save_file(tensors, str(path), metadata={"structure": json.dumps(structure)})


def load_object_state(path: Path) -> dict:
    """Read what :func:`save_object_state` wrote."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        structure = json.loads((f.metadata() or {})["structure"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _join(structure, tensors)


# --- saving ------------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def save_state(accelerator, target: Path, progress: TrainProgress) -> Path:
    """Write the complete training state to folder ``target`` (all processes call this)."""
    tmp = partial_dir(target)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with _custom_objects_withheld(accelerator) as objects:
            accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for i, obj in enumerate(objects):
                save_object_state(obj.state_dict(), tmp / f"custom_state_{i}.safetensors")
            write_train_state(tmp, progress)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            _write_json(tmp / MARKER_FILE, {"format": STATE_FORMAT, "version": STATE_VERSION,
                                            "progress": progress.state_dict(), "custom_objects": len(objects),
                                            "files": files})
            replace_dir(tmp, target)
    except Exception as exc:
        if not is_no_space(exc):
            raise
        written = sum(p.stat().st_size for p in tmp.glob("*") if p.is_file()) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        raise no_space_error(target, written or None, exc) from None
    accelerator.wait_for_everyone()
    return target


# --- loading -----------------------------------------------------------------------------------------


def read_marker(state_dir: Path) -> dict:
    """The completion marker of a state folder, after checking the folder is complete and ours."""
    if not state_dir.exists():
        raise UserError(f"--resume: {state_dir} does not exist; give a folder saved with --save_state")
    if not state_dir.is_dir():
        raise UserError(f"--resume: {state_dir} is a file, not a state folder saved with --save_state")
    marker = state_dir / MARKER_FILE
    if not marker.is_file():
        what = ("an interrupted save (it was never completed)" if state_dir.name.endswith(PARTIAL_SUFFIX)
                else "incomplete or not written by --save_state of this toolkit")
        raise UserError(f"--resume: {state_dir} is {what}: it has no {MARKER_FILE}; resume from a complete "
                        "state folder (a *-state folder beside the saved models)")
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume: {marker} is unreadable ({exc}); the state folder is damaged") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT or data.get("version") != STATE_VERSION:
        raise UserError(f"--resume: {marker} is not a state marker of this toolkit (format/version differ)")
    for name, size in data.get("files", {}).items():
        path = state_dir / name
        if not path.is_file() or path.stat().st_size != size:
            raise UserError(f"--resume: {path} is missing or changed since the state was saved; the state "
                            "folder is damaged")
    return data


def check_pickles(state_dir: Path) -> None:
    """Refuse custom-checkpoint pickles and any pickle that is more than tensors and numbers."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    for path in sorted(state_dir.iterdir()):
        if _ACCELERATE_PICKLE.match(path.name):
            raise UserError(f"--resume: {path} is a pickled custom checkpoint, which could run code when "
                            "loaded; this toolkit never writes or loads one. Remove it only if you trust it")
        if path.suffix.lower() not in _PICKLE_SUFFIXES or not path.is_file():
            continue
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise UserError(f"--resume: {path} is not a plain tensor file and was not loaded: "
                                f"{_refusal_reason(exc)}") from None


def _refusal_reason(exc: Exception) -> str:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found:
        return f"unpickling it would call {found.group(1)}, i.e. run code"
    return f"it cannot be read as tensors only ({type(exc).__name__}); it may be damaged or hold code"


def load_state(accelerator, state_dir: Path) -> TrainProgress:
    """Load a complete state folder safely into the prepared objects; returns the progress."""
    data = read_marker(state_dir)
    check_pickles(state_dir)
    with _custom_objects_withheld(accelerator) as objects:
        if data.get("custom_objects", 0) != len(objects):
            raise UserError(f"--resume: {state_dir} holds {data.get('custom_objects', 0)} extra state object(s) "
                            f"(EMA, ...) but this run has {len(objects)}; resume with the same options")
        try:
            accelerator.load_state(str(state_dir), load_kwargs={"weights_only": True})
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--resume: {state_dir} does not fit this run (other model, network or optimizer "
                            f"options?): {first[:300]}") from None
    for i, obj in enumerate(objects):
        obj.load_state_dict(load_object_state(state_dir / f"custom_state_{i}.safetensors"))
    progress = TrainProgress()
    progress.load_state_dict({k: v for k, v in data["progress"].items()
                              if k in TrainProgress.__dataclass_fields__})
    return progress
