"""Checks a trainer runs after parsing and before loading any model or data.

Everything that would otherwise fail after hours of training is looked at here, in two stages.
:func:`run_preflight` writes nothing and runs before the dataset scan: the ``--resume`` folder
(complete and ours), the ``--sample_prompts`` file (parsed and validated now, not at the first
sample) and whether the output and logging folders can be created and written; in an existing output
folder it also removes the leftovers of an interrupted save (under the folder's lock, so never those of
a run still writing there).
:func:`prepare_outputs` runs once every input has been checked: it creates the folders, locks the
output folder against a second run and clears our leftover temporaries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from library.errors import UserError
from library.training.output_dir import (OutputLock, check_writable_dir, is_main_launch_process, prepare_output_dirs,
                                         remove_orphaned_temp_files)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreflightOptions:
    """The plain values the checks need (taken from the parsed options at the script boundary)."""

    output_dir: str
    logging_dir: Optional[str] = None
    sample_prompts: Optional[str] = None
    sample_sampler: str = "ddim"
    sampling_due: bool = False  # --sample_every_n_steps/epochs or --sample_at_first given
    resume: Optional[str] = None


def check_sample_prompts(path: str, default_sampler: str) -> int:
    """Parse ``--sample_prompts`` now; raise a UserError naming the file and line. Returns the count."""
    from library.inference.prompts import load_prompt_file
    from library.inference.samplers import canonical_sampler_name

    if not Path(path).is_file():
        raise UserError(f"--sample_prompts: {path} is not a file; give a .txt/.toml/.json prompt file")
    canonical_sampler_name(default_sampler)
    specs = load_prompt_file(path)  # every line parsed: bad values name the file and line
    return len(specs)


def run_preflight(opts: PreflightOptions) -> None:
    """Every check that writes nothing: ``--resume``, ``--sample_prompts`` and whether the output and
    logging folders can be created and written. Runs before the dataset scan."""
    if opts.resume:
        from library.training.state_io import check_pickles, read_marker

        read_marker(Path(opts.resume))  # complete and ours
        check_pickles(Path(opts.resume))  # nothing in it needs code to load
    if opts.sample_prompts:
        n = check_sample_prompts(opts.sample_prompts, opts.sample_sampler)
        if not opts.sampling_due:
            logger.warning("--sample_prompts is given but no --sample_every_n_steps/epochs or --sample_at_first: "
                           "no samples will be made")
        logger.info("sample prompts: %d prompt(s) in %s", n, opts.sample_prompts)
    if not opts.output_dir:
        raise UserError("--output_dir is required: the folder the trained model is saved to")
    out = check_writable_dir(opts.output_dir, "--output_dir", create=False)
    if opts.logging_dir:
        check_writable_dir(opts.logging_dir, "--logging_dir", create=False)
    if out.is_dir() and is_main_launch_process():
        with OutputLock(out):  # a run writing there now stops this one here, before the scan
            remove_orphaned_temp_files(out)  # leftovers of an interrupted save, even if this start fails later


def prepare_outputs(opts: PreflightOptions) -> Optional[OutputLock]:
    """Create the folders, lock the output folder and clear our leftovers (after every input check);
    returns the lock the caller holds for the whole run."""
    lock = prepare_output_dirs(opts.output_dir, opts.logging_dir)
    if opts.sample_prompts:
        check_writable_dir(Path(opts.output_dir) / "sample", "the sample folder")
    return lock
