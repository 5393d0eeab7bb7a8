"""Validation loss over the images held out by ``validation_split``, for every trainer.

The split itself is made per dataset when the data are scanned
(:meth:`library.data.dataset.DatasetGroup.validation_group`): held-out images never reach the
training batches. Here the loss of those images is computed:

* at fixed timesteps, as sd-scripts does: ``linspace(min_timestep, max_timestep, 6)`` cast to
  integers with both ends dropped (200, 400, 600 and 800 for the default 0..1000), every batch at
  each of them;
* with fixed noise: each validation batch gets its own generator seeded from
  (``--validation_seed`` or ``--seed``, batch index), which draws the noise (and the VAE latent
  sample when latents are not cached), so two evaluations of the same weights give the same number,
  whatever the number of processes (batch ``i`` is evaluated by process ``i % num_processes``);
* under ``torch.no_grad()`` with the trained modules in eval mode (no dropout) and the global RNGs
  forked, so the training run's own random streams are untouched and resume stays bit-exact;
* with the training loss function (loss type, weighting, masks), on the validation images' own
  batches (cached latents and text-encoder outputs are used when the run caches them).

Logged keys are sd-scripts': ``loss/validation/step_average`` and ``loss/validation/step_divergence``
after every ``--validate_every_n_steps`` steps, ``loss/validation/epoch_average`` and
``loss/validation/epoch_divergence`` at the end of every ``--validate_every_n_epochs``-th epoch
(every epoch when not given; the last epoch too when ``--max_train_steps`` cuts it short). A
divergence is the validation loss minus the mean training loss of the current epoch so far.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.utils import send_to_device

logger = logging.getLogger(__name__)

NUM_VALIDATION_TIMESTEPS = 4  # sd-scripts' fixed count: 200, 400, 600, 800 for 0..1000
NUM_TRAIN_TIMESTEPS = 1000


def validation_timesteps(min_timestep: int = 0, max_timestep: int = NUM_TRAIN_TIMESTEPS,
                         count: int = NUM_VALIDATION_TIMESTEPS) -> tuple[int, ...]:
    """The fixed timesteps of validation: ``count`` evenly spaced inner points of
    ``[min_timestep, max_timestep]`` (sd-scripts' rule), kept below the scheduler's 1000."""
    values = np.linspace(min_timestep, max_timestep, count + 2, dtype=int)[1:-1]
    return tuple(min(int(v), NUM_TRAIN_TIMESTEPS - 1) for v in values)


def batch_seed(seed: int, index: int) -> int:
    """The seed of validation batch ``index``'s generator (independent of the process count)."""
    return (int(seed) * 1_000_003 + 7919 * (index + 1)) % (2 ** 63)


@dataclass(frozen=True)
class ValidationSettings:
    """When and how much to validate (plain values from the options)."""

    seed: int = 0
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    max_steps: int | None = None  # validation batches per evaluation (None: all)
    timesteps: tuple[int, ...] = validation_timesteps()

    @classmethod
    def from_config(cls, cfg: Any) -> ValidationSettings:
        """From a :class:`~library.training.config.TrainConfig`."""
        seed = cfg.validation_seed if cfg.validation_seed is not None else (cfg.seed or 0)
        return cls(seed=seed, every_n_steps=cfg.validate_every_n_steps, every_n_epochs=cfg.validate_every_n_epochs,
                   max_steps=cfg.max_validation_steps,
                   timesteps=validation_timesteps(cfg.min_timestep, cfg.max_timestep))


class Validator:
    """Validation for one :class:`~library.training.trainer.Trainer`; a no-op without a split.

    The loop calls :meth:`add_train_loss` per batch, :meth:`after_step` after each optimizer step,
    :meth:`after_epoch` at the end of each epoch and :meth:`after_training` when it stops.
    """

    def __init__(self, trainer: Any, data: Any, settings: ValidationSettings):
        self.trainer = trainer
        self.data = data  # the validation DatasetGroup, or None
        self.settings = settings
        self.last: float | None = None
        self.history: list[dict] = []  # every result: {"kind", "step", "epoch", "loss"}
        self._train_sum: torch.Tensor | None = None
        self._train_count = 0
        self._loader = None
        if data is None and (settings.every_n_steps or settings.every_n_epochs or settings.max_steps):
            logger.warning("validation options are set but no dataset sets validation_split; no validation loss "
                           "is computed")
        if data is not None:
            data.set_current_step(1 << 40)  # token warm-up finished: whole captions, every time
            logger.info("validation: %d image(s) held out, %d batch(es) per evaluation at timesteps %s",
                        trainer.run.data.num_validation_images, self.num_batches, list(settings.timesteps))

    @classmethod
    def for_trainer(cls, trainer: Any) -> Validator:
        """The validator of ``trainer``'s run (inactive when no dataset sets ``validation_split``)."""
        make = getattr(trainer.run.data, "validation_group", None)
        data = make() if make is not None else None
        return cls(trainer, data, ValidationSettings.from_config(trainer.cfg))

    @property
    def active(self) -> bool:
        return self.data is not None and len(self.data) > 0

    @property
    def num_batches(self) -> int:
        """Validation batches per evaluation (``--max_validation_steps`` caps it)."""
        n = len(self.data) if self.data is not None else 0
        return min(n, self.settings.max_steps) if self.settings.max_steps is not None else n

    # --- hooks the loop calls -------------------------------------------------------------------
    def add_train_loss(self, loss: torch.Tensor) -> None:
        """Add one training batch's loss to the epoch's running mean (stays on the device)."""
        if not self.active:
            return
        value = loss.detach().float()
        self._train_sum = value if self._train_sum is None else self._train_sum + value
        self._train_count += 1

    def after_step(self, bar: Any = None) -> float | None:
        """Validate when the global step is a multiple of ``--validate_every_n_steps``."""
        every, step = self.settings.every_n_steps, self.trainer.run.progress.global_step
        if not self.active or not every or step % every:
            return None
        return self._run("step", bar)

    def after_epoch(self, bar: Any = None) -> float | None:
        """Validate at the end of an epoch (every ``--validate_every_n_epochs``-th, default each)."""
        epoch = self.trainer.run.progress.epoch  # epochs completed
        every = self.settings.every_n_epochs
        result = None
        if self.active and (not every or epoch % every == 0):
            result = self._run("epoch", bar, epoch=epoch)
        self._train_sum, self._train_count = None, 0
        return result

    def after_training(self, bar: Any = None) -> float | None:
        """The epoch validation of a last epoch that ``--max_train_steps`` cut short."""
        p = self.trainer.run.progress
        every = self.settings.every_n_epochs
        if not self.active or p.step_in_epoch == 0 or (every and (p.epoch + 1) % every):
            return None
        return self._run("epoch", bar, epoch=p.epoch + 1)

    def postfix(self) -> dict:
        """Progress-bar entries: the last validation loss."""
        return {} if self.last is None else {"val_loss": f"{self.last:.4f}"}

    # --- evaluation ------------------------------------------------------------------------------
    def _train_mean(self) -> float | None:
        if self._train_sum is None or not self._train_count:
            return None
        return (self._train_sum / self._train_count).item()

    def _run(self, kind: str, bar: Any, epoch: int | None = None) -> float:
        tr = self.trainer
        value = self.evaluate()
        self.last = value
        p = tr.run.progress
        self.history.append({"kind": kind, "step": p.global_step, "epoch": epoch, "loss": value})
        logs = {f"loss/validation/{kind}_average": value}
        train = self._train_mean()
        if train is not None:
            logs[f"loss/validation/{kind}_divergence"] = value - train
        if tr.cfg.log_prefix:
            logs = {tr.cfg.log_prefix + k: v for k, v in logs.items()}
        tr.run.accelerator.log(logs, step=p.global_step)
        if bar is not None:  # keep the loop's loss/lr entries, replace the old val_loss
            kept = [e for e in (bar.postfix or "").split(", ") if e and not e.startswith("val_loss=")]
            bar.set_postfix_str(", ".join(kept + [f"val_loss={value:.4f}"]))
        logger.info("validation loss (%s %d): %.6f", kind, epoch if kind == "epoch" else p.global_step, value)
        return value

    def _batches(self) -> torch.utils.data.DataLoader:
        """This process's share of the first ``num_batches`` validation batches."""
        if self._loader is None:
            from library.data.dataset import make_dataloader

            acc, cfg = self.trainer.run.accelerator, self.trainer.cfg
            mine = list(range(acc.process_index, self.num_batches, acc.num_processes))
            subset = torch.utils.data.Subset(self.data, mine)
            self._indices = mine
            self._loader = make_dataloader(subset, cfg.max_data_loader_n_workers,  # type: ignore[arg-type]
                                           cfg.persistent_data_loader_workers, pin_memory=acc.device.type == "cuda")
        return self._loader

    def evaluate(self) -> float:
        """The mean loss over the validation batches and fixed timesteps, for the current weights.

        Deterministic: the same weights give the same value; the training RNGs are not advanced.
        """
        if not self.active:
            raise ValueError("no validation images: set validation_split")
        tr = self.trainer
        acc = tr.run.accelerator
        loader = self._batches()
        modes = [(m, m.training) for m in tr.trained]
        for m in tr.trained:
            m.eval()
        optimizer = _schedule_free(tr.optimizer)
        if optimizer is not None:
            optimizer.eval()
        total = torch.zeros((), device=acc.device, dtype=torch.float64)
        count = 0
        devices = [acc.device] if acc.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                for index, batch in zip(self._indices, loader):
                    batch = send_to_device(batch, acc.device)
                    gen = torch.Generator(device=acc.device)
                    gen.manual_seed(batch_seed(self.settings.seed, index))
                    for t in self.settings.timesteps:
                        total += tr.loss_of(batch, generator=gen, timesteps=t).double()
                        count += 1
        finally:
            for m, was_training in modes:
                m.train(was_training)
            if optimizer is not None:
                optimizer.train()
        sums = torch.stack([total, torch.tensor(float(count), device=acc.device, dtype=torch.float64)])
        if acc.num_processes > 1:
            sums = acc.reduce(sums, reduction="sum")
        return float(sums[0] / sums[1].clamp(min=1))


def _schedule_free(optimizer: Any) -> Any:
    """The unwrapped optimizer when it is schedule-free (evaluated in its eval() mode), else None."""
    from library.training.optim import inner_optimizer, is_schedule_free

    inner = inner_optimizer(optimizer)
    return inner if is_schedule_free(inner) and hasattr(inner, "eval") else None


def validation_metadata(cfg: Any, data: Any) -> dict[str, str]:
    """sd-scripts' ``ss_*`` validation keys for a saved file (``cfg``: TrainConfig, ``data``: the
    training DatasetGroup). ``ss_validation_split`` is the datasets' split (a list when they differ)."""
    configs = getattr(data, "configs", [])
    splits = sorted({float(getattr(c, "validation_split", 0.0) or 0.0) for c in configs}) or [0.0]
    seed = cfg.validation_seed if cfg.validation_seed is not None else cfg.seed
    return {
        "ss_num_validation_images": str(getattr(data, "num_validation_images", 0)),
        "ss_validation_split": str(splits[0] if len(splits) == 1 else splits),
        "ss_validation_seed": str(seed),
        "ss_max_validation_steps": str(cfg.max_validation_steps),
        "ss_validate_every_n_epochs": str(cfg.validate_every_n_epochs),
        "ss_validate_every_n_steps": str(cfg.validate_every_n_steps),
    }
