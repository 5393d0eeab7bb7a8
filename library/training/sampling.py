"""Sample images during training (``--sample_prompts`` with ``--sample_every_n_steps/epochs``).

Differences from sd-scripts, on purpose: the default sample size is 1024x1024 (SDXL's
resolution, not 512), and the VAE and text encoders visit the GPU only while sampling when
caching moved them off it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch

from library.inference.pipeline import SDXLGenerator, save_image
from library.inference.prompts import load_prompt_file
from library.models.fp8 import FP8_DTYPES
from library.training.trainer import TrainingRun

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_SIZE = 1024


@dataclass(frozen=True)
class SampleOptions:
    prompts_file: str
    sampler: str = "ddim"
    output_name: str | None = None
    default_size: int = DEFAULT_SAMPLE_SIZE


@contextlib.contextmanager
def models_on(device: torch.device, *modules: torch.nn.Module) -> Iterator[None]:
    """Put modules on ``device`` for the block, then back where they were (dtype unchanged)."""
    homes = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            m.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def sample_file_name(output_name: str | None, epoch: int, step: int, index: int, seed: int | None,
                     by_epoch: bool) -> str:
    """sd-scripts' names: ``{name}_{e%06d|%06d}_{idx:02d}_{YYYYmmddHHMMSS}[_{seed}].png``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d%H%M%S")
    counter = f"e{epoch:06d}" if by_epoch else f"{step:06d}"
    suffix = f"_{seed}" if seed is not None else ""
    return f"{output_name or 'sample'}_{counter}_{index:02d}_{stamp}{suffix}.png"


def sample_images(run: TrainingRun, opts: SampleOptions, epoch: int, step: int,
                  prompt_context: Callable[..., ContextManager] | None = None) -> list[Path]:
    """Generate every prompt of the prompt file with the model as it is now; returns the files.

    ``prompt_context(spec, width, height)``, when given, is entered around each image (e.g.
    ControlNet-LLLite embedding the prompt's ``--cn`` image).
    """
    models, device = run.models, run.device
    specs = load_prompt_file(opts.prompts_file)
    out_dir = Path(run.cfg.output_dir) / "sample"
    out_dir.mkdir(parents=True, exist_ok=True)
    unet_dtype = next(p.dtype for p in models.unet.parameters() if p.dtype not in FP8_DTYPES)
    generator = SDXLGenerator(models.unet, models.vae, [models.text_encoder1, models.text_encoder2],
                              [run.conditioner.tokenizer1, run.conditioner.tokenizer2], dtype=unet_dtype,
                              vae_dtype=next(models.vae.parameters()).dtype, device=device,
                              v_parameterization=run.cfg.v_parameterization, place_models=False)
    generator.token_replacements.update(run.prompt_replacements)  # e.g. a TI token -> its N tokens
    by_epoch = bool(run.cfg.sample_every_n_epochs)
    written = []
    rng_state = torch.get_rng_state()
    with models_on(device, models.vae, models.text_encoder1, models.text_encoder2), torch.no_grad():
        for index, raw in enumerate(specs):
            spec = raw.with_defaults(width=opts.default_size, height=opts.default_size, sampler=opts.sampler)
            seed = spec.seed if spec.seed is not None else index
            around = prompt_context(spec, spec.width, spec.height) if prompt_context else contextlib.nullcontext()
            with run.accelerator.autocast(), around:
                image = generator.generate(
                    [spec.prompt], [spec.negative_prompt or ""], width=spec.width, height=spec.height,
                    steps=spec.steps, guidance_scale=spec.scale, sampler=spec.sampler, seeds=[seed],
                    original_size=(spec.original_height, spec.original_width),
                    crop_top_left=(spec.crop_top or 0, spec.crop_left or 0))[0]
            name = sample_file_name(opts.output_name, epoch, step, index, seed, by_epoch)
            params = {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": seed,
                      "sampler": spec.sampler, "steps": spec.steps, "scale": spec.scale, "width": spec.width,
                      "height": spec.height, "epoch": epoch, "step": step}
            written.append(save_image(image, out_dir / name, params))
            _log_image(run, index, image, step)
    torch.set_rng_state(rng_state)  # sampling must not change the training's random stream
    logger.info("wrote %d sample image(s) to %s", len(written), out_dir)
    return written


def _log_image(run: TrainingRun, index: int, image, step: int) -> None:
    for tracker in getattr(run.accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image(f"sample_{index}", np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({f"sample_{index}": wandb.Image(image)}, step=step)
