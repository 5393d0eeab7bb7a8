"""Forward diffusion for training: the DDPM noise schedule, timesteps, noise and targets.

Everything here runs on the latents' device without host synchronisation (no ``.item()``, no
CPU round trips of per-step data), and every random draw takes an optional ``torch.Generator`` so
a seeded run is reproducible. When the generator lives on another device than the latents, the
numbers are drawn there and copied over, so the same seed gives the same noise on CPU and GPU.

Options follow sd-scripts (``--min_timestep``, ``--max_timestep``, ``--noise_offset``,
``--noise_offset_random_strength``, ``--adaptive_noise_scale``, ``--multires_noise_iterations``,
``--multires_noise_discount``, ``--ip_noise_gamma``, ``--ip_noise_gamma_random_strength``,
``--zero_terminal_snr``, ``--v_parameterization``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.errors import UserError

#: Lower bound used wherever an SNR is divided by (zero-terminal-SNR makes the last SNR exactly 0).
SNR_FLOOR = 2.0**-24


def make_noise_scheduler(v_parameterization: bool = False, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The SDXL training schedule: DDPM, scaled-linear betas 0.00085..0.012 over 1000 steps.

    ``zero_terminal_snr`` rescales the betas so the last step is pure noise (Lin et al. 2023);
    ``v_parameterization`` sets ``prediction_type="v_prediction"``.
    """
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
    )


@dataclass(frozen=True)
class ScheduleTables:
    """Per-timestep float32 tables of a noise schedule, on one device."""

    alphas_cumprod: torch.Tensor  # [T]
    sqrt_alpha: torch.Tensor  # [T] sqrt(alpha_bar)
    sqrt_one_minus_alpha: torch.Tensor  # [T] sqrt(1 - alpha_bar)
    snr: torch.Tensor  # [T] alpha_bar / (1 - alpha_bar), at least SNR_FLOOR


def schedule_tables(scheduler: DDPMScheduler, device: torch.device | str) -> ScheduleTables:
    """The scheduler's tables on ``device``, computed once per (scheduler, device) and cached."""
    device = torch.device(device)
    cache: dict[str, tuple[torch.Tensor, ScheduleTables]] = scheduler.__dict__.setdefault("_sdxl_tables", {})
    source = scheduler.alphas_cumprod
    hit = cache.get(str(device))
    if hit is not None and hit[0] is source:
        return hit[1]
    alphas = source.detach().to(device=device, dtype=torch.float64)
    snr = (alphas / (1.0 - alphas)).clamp_min(SNR_FLOOR)
    tables = ScheduleTables(
        alphas_cumprod=alphas.float(),
        sqrt_alpha=alphas.sqrt().float(),
        sqrt_one_minus_alpha=(1.0 - alphas).sqrt().float(),
        snr=snr.float(),
    )
    cache[str(device)] = (source, tables)
    return tables


def _gather(table: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    """``table[timesteps]`` shaped [B, 1, 1, ...] to broadcast against an ``ndim``-d batch."""
    values = table[timesteps.to(table.device, torch.long)]
    return values.view(-1, *([1] * (ndim - 1)))


def _draw(kind: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
          generator: torch.Generator | None) -> torch.Tensor:
    """``torch.randn``/``torch.rand`` drawn from ``generator`` (on its device) and moved to ``device``."""
    fn = torch.randn if kind == "normal" else torch.rand
    where = generator.device if generator is not None else device
    out = fn(shape, generator=generator, device=where, dtype=dtype)
    return out.to(device) if out.device != device else out


def check_timestep_range(
    min_timestep: int | None, max_timestep: int | None, num_train_timesteps: int = 1000
) -> tuple[int, int]:
    """Validate ``--min_timestep`` / ``--max_timestep`` (None: 0 / ``num_train_timesteps``)."""
    low = 0 if min_timestep is None else int(min_timestep)
    high = num_train_timesteps if max_timestep is None else int(max_timestep)
    if not 0 <= low <= high <= num_train_timesteps:
        raise UserError(
            f"--min_timestep {low} / --max_timestep {high}: need 0 <= min <= max <= {num_train_timesteps}"
        )
    if low == high and high >= num_train_timesteps:
        raise UserError(
            f"--min_timestep = --max_timestep = {high} trains on timestep {high}, which does not exist; "
            f"use a value below {num_train_timesteps}"
        )
    return low, high


def sample_timesteps(
    batch: int,
    min_timestep: int = 0,
    max_timestep: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform integer timesteps in ``[min_timestep, max_timestep)``, int64, shape [batch].

    ``min_timestep == max_timestep`` gives the constant ``max_timestep`` (as sd-scripts does).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if min_timestep >= max_timestep:
        return torch.full((batch,), int(max_timestep), dtype=torch.long, device=device)
    where = generator.device if generator is not None else device
    timesteps = torch.randint(int(min_timestep), int(max_timestep), (batch,), generator=generator, device=where)
    return timesteps.to(device)


def _offset_noise(latents: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None,
                  noise_offset: float, random_strength: bool, adaptive_noise_scale: float | None) -> torch.Tensor:
    """noise + offset * N(0, 1) per (sample, channel); see :func:`noise_like`."""
    b, c = latents.shape[:2]
    ones = (1,) * (latents.ndim - 2)
    offset: torch.Tensor | float = noise_offset
    if random_strength:  # one strength for the whole batch, as sd-scripts draws it
        offset = _draw("uniform", (1,), latents.device, torch.float32, generator) * noise_offset
    if adaptive_noise_scale is not None:
        channel_mean = latents.float().mean(dim=tuple(range(2, latents.ndim)), keepdim=True).abs()  # [B, C, 1, 1]
        offset = (offset + adaptive_noise_scale * channel_mean).clamp_min(0.0)
    shift = _draw("normal", (b, c, *ones), latents.device, torch.float32, generator)
    return (noise.float() + offset * shift).to(noise.dtype)


def _pyramid_noise(
    noise: torch.Tensor, generator: torch.Generator | None, iterations: int, discount: float
) -> torch.Tensor:
    """Add upsampled coarser noise levels (multi-resolution noise) and renormalise to unit std.

    Each level shrinks by a random factor in [2, 4); those factors are host-side numbers drawn from
    ``generator`` when it is a CPU generator, otherwise from Python's ``random`` module (seeded by
    the trainer), so no device value is read back.
    """
    b, c, h, w = noise.shape
    out = noise.float()
    for level in range(int(iterations)):
        if generator is not None and generator.device.type == "cpu":
            r = 2.0 + 2.0 * float(torch.rand((), generator=generator))
        else:
            r = 2.0 + 2.0 * random.random()
        hn, wn = max(1, int(h / r**level)), max(1, int(w / r**level))
        coarse = _draw("normal", (b, c, hn, wn), noise.device, torch.float32, generator)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**level
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).to(noise.dtype)


def noise_like(
    latents: torch.Tensor,
    generator: torch.Generator | None = None,
    noise_offset: float | None = None,
    noise_offset_random_strength: bool = False,
    adaptive_noise_scale: float | None = None,
    multires_noise_iterations: int | None = None,
    multires_noise_discount: float = 0.3,
) -> torch.Tensor:
    """Gaussian noise shaped like ``latents`` [B, C, H, W], with sd-scripts' optional extras.

    * ``noise_offset``: add ``offset * N(0, 1)`` per (sample, channel);
      ``noise_offset_random_strength`` draws the offset from U(0, noise_offset) instead;
      ``adaptive_noise_scale`` adds ``scale * |channel mean of latents|`` to the offset (>= 0).
    * ``multires_noise_iterations``: pyramid noise with ``multires_noise_discount`` per level,
      renormalised to unit std (applied after the offset, as sd-scripts does).
    """
    noise = _draw("normal", tuple(latents.shape), latents.device, latents.dtype, generator)
    if noise_offset:
        noise = _offset_noise(
            latents, noise, generator, noise_offset, noise_offset_random_strength, adaptive_noise_scale
        )
    if multires_noise_iterations:
        noise = _pyramid_noise(noise, generator, multires_noise_iterations, multires_noise_discount)
    return noise


def perturb_noise(
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
    ip_noise_gamma: float | None = None,
    ip_noise_gamma_random_strength: bool = False,
) -> torch.Tensor:
    """Input-perturbation noise (``--ip_noise_gamma``): ``noise + gamma * N(0, 1)``.

    Use the result only to make the noisy input; the training target keeps the original ``noise``.
    With ``ip_noise_gamma_random_strength`` gamma is drawn from U(0, ip_noise_gamma) per batch.
    """
    if not ip_noise_gamma:
        return noise
    gamma: torch.Tensor | float = ip_noise_gamma
    if ip_noise_gamma_random_strength:
        gamma = _draw("uniform", (1,), noise.device, torch.float32, generator) * ip_noise_gamma
    extra = _draw("normal", tuple(noise.shape), noise.device, torch.float32, generator)
    return (noise.float() + gamma * extra).to(noise.dtype)


def add_noise(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """``sqrt(alpha_bar_t) * latents + sqrt(1 - alpha_bar_t) * noise`` (computed in float32)."""
    tables = schedule_tables(scheduler, latents.device)
    a = _gather(tables.sqrt_alpha, timesteps, latents.ndim)
    s = _gather(tables.sqrt_one_minus_alpha, timesteps, latents.ndim)
    return (a * latents.float() + s * noise.float()).to(latents.dtype)


def target_for(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    v_parameterization: bool = False,
) -> torch.Tensor:
    """The training target: ``noise`` (epsilon) or the velocity ``sqrt(a) * noise - sqrt(1-a) * latents``."""
    if not v_parameterization:
        return noise
    tables = schedule_tables(scheduler, latents.device)
    a = _gather(tables.sqrt_alpha, timesteps, latents.ndim)
    s = _gather(tables.sqrt_one_minus_alpha, timesteps, latents.ndim)
    return (a * noise.float() - s * latents.float()).to(latents.dtype)
