"""Training losses and their per-timestep weightings, as sd-scripts' loss options define them.

``--loss_type`` (l1, l2, huber, smooth_l1) with ``--huber_schedule`` / ``--huber_c`` /
``--huber_scale``, ``--masked_loss`` / ``--alpha_mask`` (per-pixel weights), ``--min_snr_gamma``,
``--scale_v_pred_loss_like_noise_pred``, ``--v_pred_like_loss`` and ``--debiased_estimation_loss``.
All functions are vectorised over the batch and stay on the device (no host synchronisation);
SNR values come from the cached tables of :func:`library.diffusion.noise.schedule_tables`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from library.diffusion.noise import schedule_tables
from library.errors import UserError

LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
#: sd-scripts caps the SNR at this value for the v-pred scaling and the debiased estimation.
SNR_CAP = 1000.0


def _unknown_schedule(name: str) -> str:
    return f"--huber_schedule {name!r} is not known; choose one of {', '.join(HUBER_SCHEDULES)}"


def check_loss_options(
    loss_type: str, huber_schedule: str = "snr", huber_c: float = 0.1, huber_scale: float = 1.0
) -> None:
    """Raise :class:`UserError` for an unknown ``--loss_type`` / ``--huber_schedule`` or bad Huber values."""
    if loss_type not in LOSS_TYPES:
        raise UserError(f"--loss_type {loss_type!r} is not known; choose one of {', '.join(LOSS_TYPES)}")
    if loss_type in ("huber", "smooth_l1"):
        if huber_schedule not in HUBER_SCHEDULES:
            raise UserError(_unknown_schedule(huber_schedule))
        if huber_c <= 0 or huber_scale <= 0:
            raise UserError("--huber_c and --huber_scale must be positive")


def huber_c_for(
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    loss_type: str = "huber",
    huber_schedule: str = "snr",
    huber_c: float = 0.1,
    huber_scale: float = 1.0,
) -> torch.Tensor | None:
    """Per-sample Huber threshold c [B] for ``timesteps`` [B]; None unless ``loss_type`` is huber/smooth_l1.

    * ``constant``: ``huber_c * huber_scale``.
    * ``exponential``: ``huber_scale * exp(-alpha * t)`` with ``alpha = -ln(huber_c) / T``, i.e.
      ``huber_scale`` at t=0 falling to ``huber_c * huber_scale`` at t=T.
    * ``snr``: ``(1 - huber_c) / (1 + sigma_t)^2 + huber_c`` with ``sigma_t = sqrt((1 - a_t) / a_t)``
      (``huber_scale`` is not applied, as in sd-scripts).
    """
    if loss_type not in ("huber", "smooth_l1"):
        return None
    t = timesteps.to(torch.float32)
    if huber_schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * t) * huber_scale
    if huber_schedule == "snr":
        alphas = schedule_tables(scheduler, timesteps.device).alphas_cumprod[timesteps.long()]
        sigmas = ((1.0 - alphas) / alphas).sqrt()  # inf at a zero-terminal-SNR step: c -> huber_c
        return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    raise UserError(_unknown_schedule(huber_schedule))


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float | torch.Tensor | None = 0.1
) -> torch.Tensor:
    """Unreduced float32 loss, same shape as ``pred``; ``huber_c`` is a float or a [B] tensor (None: 0.1).

    huber: ``2c (sqrt(d^2 + c^2) - c)``; smooth_l1: ``2 (sqrt(d^2 + c^2) - c)``.
    """
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff * diff
    if loss_type == "l1":
        return diff.abs()
    if loss_type in ("huber", "smooth_l1"):
        c = 0.1 if huber_c is None else huber_c
        if isinstance(c, torch.Tensor):
            c = c.to(diff.device, torch.float32).view(-1, *([1] * (diff.ndim - 1)))  # [B, 1, 1, 1]
        smooth = torch.sqrt(diff * diff + c * c) - c
        return 2.0 * c * smooth if loss_type == "huber" else 2.0 * smooth
    raise UserError(f"--loss_type {loss_type!r} is not known; choose one of {', '.join(LOSS_TYPES)}")


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A per-pixel weight map [B, H, W] or [B, 1, H, W] area-resized to ``size``, as [B, 1, h, w] float32."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    mask = mask.float()
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask, size=size, mode="area")
    return mask


def loss_mask(batch: dict, masked_loss: bool) -> torch.Tensor | None:
    """The per-pixel loss weights of a batch, as sd-scripts applies them, or None.

    With ``--masked_loss``: the red channel of the batch's conditioning (mask) images, which the
    dataset gives in [0, 1] ([B, H, W]). Otherwise, or without them: the ``alpha_masks`` that the
    dataset adds when any subset uses ``alpha_mask`` (``--alpha_mask`` alone masks, as there).
    """
    cond = batch.get("conditioning_images")
    if masked_loss and cond is not None:
        return cond[:, 0]
    return batch.get("alpha_masks")


def per_sample_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "l2",
    huber_c: float | torch.Tensor | None = 0.1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss per sample [B]: the element loss, times ``mask`` if given, averaged over C, H, W.

    ``mask`` (per-pixel weights in [0, 1], any resolution) is area-resized to the latent size.
    As in sd-scripts the masked loss is still divided by all C*H*W elements, not the mask's sum.
    """
    loss = elementwise_loss(pred, target, loss_type, huber_c)
    if mask is not None:
        loss = loss * resize_mask(mask.to(loss.device), tuple(loss.shape[-2:]))
    return loss.mean(dim=tuple(range(1, loss.ndim)))


def _snr(timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    return schedule_tables(scheduler, timesteps.device).snr[timesteps.long()]


def min_snr_weight(
    timesteps: torch.Tensor, scheduler: DDPMScheduler, gamma: float, v_prediction: bool = False
) -> torch.Tensor:
    """Min-SNR-gamma weights [B]: ``min(SNR, gamma) / SNR`` (epsilon) or ``min(SNR, gamma) / (SNR + 1)`` (v)."""
    snr = _snr(timesteps, scheduler)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if v_prediction else clipped / snr


def _capped_snr(timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    return torch.clamp(_snr(timesteps, scheduler), max=SNR_CAP)


def scale_v_pred_loss_like_noise_pred(
    loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler
) -> torch.Tensor:
    """``--scale_v_pred_loss_like_noise_pred``: ``loss * SNR / (SNR + 1)`` with SNR capped at 1000."""
    snr = _capped_snr(timesteps, scheduler)
    return loss * (snr / (snr + 1.0))


def v_pred_like_loss(
    loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler, value: float
) -> torch.Tensor:
    """``--v_pred_like_loss``: ``loss + loss / scale * value`` with ``scale = SNR / (SNR + 1)`` (SNR capped)."""
    snr = _capped_snr(timesteps, scheduler)
    return loss + loss / (snr / (snr + 1.0)) * value


def debiased_estimation_weight(
    timesteps: torch.Tensor, scheduler: DDPMScheduler, v_prediction: bool = False
) -> torch.Tensor:
    """``--debiased_estimation_loss`` weights [B]: ``1 / sqrt(SNR)`` (epsilon) or ``1 / (SNR + 1)`` (v), SNR capped."""
    snr = _capped_snr(timesteps, scheduler)
    return 1.0 / (snr + 1.0) if v_prediction else torch.rsqrt(snr)


def apply_loss_weighting(
    loss: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    v_prediction: bool = False,
    loss_weights: torch.Tensor | None = None,
    min_snr_gamma: float | None = None,
    scale_v_pred_loss: bool = False,
    v_pred_like_value: float | None = None,
    debiased_estimation: bool = False,
) -> torch.Tensor:
    """Apply the weightings to a per-sample loss [B] in sd-scripts' order; returns [B].

    Order: per-sample ``loss_weights`` (e.g. prior-loss weight of regularisation images),
    min-SNR-gamma, v-pred scaling, v-pred-like loss, debiased estimation.
    """
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.device, loss.dtype)
    if min_snr_gamma:
        loss = loss * min_snr_weight(timesteps, scheduler, min_snr_gamma, v_prediction)
    if scale_v_pred_loss:
        loss = scale_v_pred_loss_like_noise_pred(loss, timesteps, scheduler)
    if v_pred_like_value:
        loss = v_pred_like_loss(loss, timesteps, scheduler, v_pred_like_value)
    if debiased_estimation:
        loss = loss * debiased_estimation_weight(timesteps, scheduler, v_prediction)
    return loss
