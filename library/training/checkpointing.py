"""Output names, rotation of old saves, and the training progress kept in saved states.

Names follow sd-scripts: epoch saves ``{name}-{epoch:06d}.{ext}``, step saves
``{name}-step{step:08d}.{ext}``, the final save ``{name}.{ext}``; states add ``-state``.
Unlike sd-scripts, every trainer's state records the epoch, the global step and the position in the
epoch, so ``--resume`` continues the counters (sd-scripts issues #1559 and #2248).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"


def default_name(output_name: str | None, kind: str) -> str:
    """sd-scripts' fallback names when --output_name is not given: "epoch", "at", "last"."""
    return output_name or {"epoch": "epoch", "step": "at", "final": "last"}[kind]


def save_stem(output_name: str | None, epoch: int | None = None, step: int | None = None) -> str:
    """File stem for an epoch save, a step save or (neither) the final save."""
    if epoch is not None:
        return f"{default_name(output_name, 'epoch')}-{epoch:06d}"
    if step is not None:
        return f"{default_name(output_name, 'step')}-step{step:08d}"
    return default_name(output_name, "final")


def state_dir_name(output_name: str | None, epoch: int | None = None, step: int | None = None) -> str:
    return save_stem(output_name, epoch, step) + "-state"


def save_every_n_epochs_for_ratio(num_epochs: int, ratio: int) -> int:
    """sd-scripts' ``--save_n_epoch_ratio N``: save every ``floor(epochs / N)`` epochs (at least every
    epoch), so a run of ``num_epochs`` epochs gets at least N saves, the final one included."""
    return max(1, num_epochs // ratio)


def with_save_n_epoch_ratio(cfg, num_epochs: int):
    """``cfg`` (a TrainConfig) with ``save_every_n_epochs`` set from ``save_n_epoch_ratio`` (which
    overrides it, as in sd-scripts)."""
    every = save_every_n_epochs_for_ratio(num_epochs, cfg.save_n_epoch_ratio)
    if cfg.save_every_n_epochs and cfg.save_every_n_epochs != every:
        logger.info("--save_n_epoch_ratio %d: saving every %d epochs instead of --save_every_n_epochs %d",
                    cfg.save_n_epoch_ratio, every, cfg.save_every_n_epochs)
    return dataclasses.replace(cfg, save_every_n_epochs=every)


def remove_old(output_dir: Path, output_name: str | None, ext: str, keep_last: int | None, current: int,
               per: str, every: int | None, state: bool = False) -> None:
    """Delete the save that fell out of a ``--save_last_n_*`` window (files or state folders)."""
    if not keep_last or not every:
        return
    old = current - every * keep_last
    if old <= 0:
        return
    stem = save_stem(output_name, epoch=old) if per == "epoch" else save_stem(output_name, step=old)
    path = output_dir / (stem + ("-state" if state else f".{ext}"))
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed old state %s", path)
    elif path.exists():
        path.unlink()
        logger.info("removed old save %s", path)


@dataclass
class TrainProgress:
    """Counters and the noise RNG; registered with accelerate so states carry them."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken
    step_in_epoch: int = 0  # batches consumed in the current epoch
    rng_state: list[int] = field(default_factory=list)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class NoiseRNG:
    """The generator that draws noise and timesteps, with a state that survives save/resume."""

    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def state(self) -> list[int]:
        return self.generator.get_state().tolist()

    def restore(self, state: list[int]) -> None:
        if state:
            self.generator.set_state(torch.tensor(state, dtype=torch.uint8))


def write_train_state(state_dir: Path, progress: TrainProgress) -> None:
    """A readable copy of the counters next to accelerate's files (sd-scripts writes the same file)."""
    data = {"current_epoch": progress.epoch, "current_step": progress.global_step,
            "step_in_epoch": progress.step_in_epoch}
    (state_dir / TRAIN_STATE_FILE).write_text(json.dumps(data, indent=2), encoding="utf-8")
