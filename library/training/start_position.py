"""Where a run starts: ``--initial_step`` / ``--initial_epoch`` / ``--skip_until_initial_step``.

``--initial_step N`` (or ``--initial_epoch E``, meaning ``N = (E - 1) * optimizer steps per epoch``;
``--initial_step`` wins when both are given) starts the run as if ``N`` optimizer steps had been
taken: the step counter starts at ``N`` (so ``--max_train_steps`` counts the whole run and only
``max_train_steps - N`` steps are trained), the epoch counter at ``N // steps_per_epoch``, and the
learning-rate schedule at its step ``N`` (sd-scripts restarts the schedule at 0 unless it resumes a
state; we start it where the counter is, which is what the option is for).

With ``--skip_until_initial_step`` the data loader also skips the batches those ``N`` steps would
have consumed in the starting epoch (``N % steps_per_epoch`` steps times
``--gradient_accumulation_steps`` batches), so the data continue where a run that really took
``N`` steps would be; without it the starting epoch's data start from its first batch.

With ``--resume`` the state is loaded first and these options then override its counters.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from library.errors import UserError

logger = logging.getLogger(__name__)


def initial_global_step(initial_step: int | None, initial_epoch: int | None,
                        steps_per_epoch: int) -> int | None:
    """The step a run starts at, or None when neither option is given."""
    if initial_step is not None:
        if initial_step < 0:
            raise UserError(f"--initial_step must be 0 or more, got {initial_step}")
        return initial_step
    if initial_epoch is not None:
        if initial_epoch < 1:
            raise UserError(f"--initial_epoch counts from 1 (the first epoch), got {initial_epoch}")
        return (initial_epoch - 1) * steps_per_epoch
    return None


def advance_lr_scheduler(lr_scheduler: Any, steps: int) -> None:
    """Step the scheduler under accelerate's wrapper ``steps`` times (no optimizer step is taken)."""
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            inner.step()


def apply_initial_step(progress: Any, lr_scheduler: Any, *, initial_step: int | None,
                       initial_epoch: int | None, skip_batches: bool, steps_per_epoch: int,
                       max_steps: int, gradient_accumulation_steps: int = 1, num_processes: int = 1) -> None:
    """Set ``progress`` (a :class:`~library.training.checkpointing.TrainProgress`) and the LR schedule
    to the start position the options ask for (nothing when neither option is given)."""
    start = initial_global_step(initial_step, initial_epoch, steps_per_epoch)
    if start is None:
        return
    if start >= max_steps:
        raise UserError(f"--initial_step/--initial_epoch start at step {start}, which is not below "
                        f"--max_train_steps ({max_steps}); nothing would be trained")
    if progress.global_step:
        logger.warning("--initial_step/--initial_epoch: the resumed state's step %d is replaced by step %d",
                       progress.global_step, start)
    done = getattr(getattr(lr_scheduler, "scheduler", lr_scheduler), "last_epoch", 0) or 0
    target = start * num_processes  # accelerate steps the schedule once per process per step
    if target < done:
        raise UserError(f"--initial_step {start} lies before the resumed state's learning-rate schedule "
                        f"(at step {done // max(num_processes, 1)}); drop --initial_step or resume an earlier state")
    advance_lr_scheduler(lr_scheduler, target - done)
    per_epoch = max(steps_per_epoch, 1)
    progress.global_step = start
    progress.epoch = start // per_epoch
    progress.step_in_epoch = (start % per_epoch) * gradient_accumulation_steps if skip_batches else 0
    logger.info("starting at step %d (epoch %d)%s", start, progress.epoch + 1,
                f", skipping {progress.step_in_epoch} batch(es) of that epoch" if skip_batches else "")
