"""Sampler names (as sd-scripts users type them) mapped onto diffusers schedulers.

Every scheduler is built from the SDXL training noise schedule: scaled-linear betas 0.00085 ->
0.012 over 1000 steps, ``steps_offset=1`` and ``timestep_spacing="leading"`` (as in the SDXL base
model's scheduler config), epsilon or v-prediction. diffusers is imported only when a scheduler
is built, so :data:`SAMPLER_NAMES` is cheap to use for argparse choices.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

from library.errors import UserError

BETA_START = 0.00085
BETA_END = 0.012
BETA_SCHEDULE = "scaled_linear"
NUM_TRAIN_TIMESTEPS = 1000
STEPS_OFFSET = 1
TIMESTEP_SPACING = "leading"


@dataclass(frozen=True)
class _Sampler:
    """How to build one sampler: diffusers class name, extra config, A1111 display name."""

    scheduler: str
    options: dict[str, Any] = field(default_factory=dict)
    a1111_name: str = ""


_KARRAS = {"use_karras_sigmas": True}
_DDIM = {"clip_sample": False, "set_alpha_to_one": False}
_SINGLESTEP = {"lower_order_final": True}  # what diffusers switches to anyway (final sigma zero)

# the sd-scripts names first (their order is the one sd-scripts documents), then extras
_SAMPLERS: dict[str, _Sampler] = {
    "ddim": _Sampler("DDIMScheduler", _DDIM, "DDIM"),
    "pndm": _Sampler("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False}, "PLMS"),
    "lms": _Sampler("LMSDiscreteScheduler", {}, "LMS"),
    "euler": _Sampler("EulerDiscreteScheduler", {"interpolation_type": "linear"}, "Euler"),
    "euler_a": _Sampler("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": _Sampler("HeunDiscreteScheduler", {}, "Heun"),
    "dpm_2": _Sampler("KDPM2DiscreteScheduler", {}, "DPM2"),
    "dpm_2_a": _Sampler("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a"),
    "dpmsolver": _Sampler(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        "DPM-Solver",
    ),
    "dpmsolver++": _Sampler(
        "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"
    ),
    "dpmsingle": _Sampler("DPMSolverSinglestepScheduler", _SINGLESTEP, "DPM++ 2S"),
    "k_lms": _Sampler("LMSDiscreteScheduler", {}, "LMS"),
    "k_euler": _Sampler("EulerDiscreteScheduler", {"interpolation_type": "linear"}, "Euler"),
    "k_euler_a": _Sampler("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "k_dpm_2": _Sampler("KDPM2DiscreteScheduler", {}, "DPM2"),
    "k_dpm_2_a": _Sampler("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a"),
    # extras (A1111 / ComfyUI favourites)
    "ddpm": _Sampler("DDPMScheduler", {"clip_sample": False}, "DDPM"),
    "euler_karras": _Sampler(
        "EulerDiscreteScheduler", {"interpolation_type": "linear", **_KARRAS}, "Euler Karras"
    ),
    "lms_karras": _Sampler("LMSDiscreteScheduler", _KARRAS, "LMS Karras"),
    "heun_karras": _Sampler("HeunDiscreteScheduler", _KARRAS, "Heun Karras"),
    "dpm_2_karras": _Sampler("KDPM2DiscreteScheduler", _KARRAS, "DPM2 Karras"),
    "dpm_2_a_karras": _Sampler("KDPM2AncestralDiscreteScheduler", _KARRAS, "DPM2 a Karras"),
    "dpm++_2m": _Sampler(
        "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"
    ),
    "dpm++_2m_karras": _Sampler(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", **_KARRAS},
        "DPM++ 2M Karras",
    ),
    "dpm++_2m_sde": _Sampler(
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "DPM++ 2M SDE"
    ),
    "dpm++_2m_sde_karras": _Sampler(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", **_KARRAS},
        "DPM++ 2M SDE Karras",
    ),
    "dpm++_2s_karras": _Sampler(
        "DPMSolverSinglestepScheduler", {**_SINGLESTEP, **_KARRAS}, "DPM++ 2S Karras"
    ),
    "unipc": _Sampler("UniPCMultistepScheduler", {}, "UniPC"),
    "unipc_karras": _Sampler("UniPCMultistepScheduler", _KARRAS, "UniPC Karras"),
    "deis": _Sampler("DEISMultistepScheduler", {}, "DEIS"),
    "lcm": _Sampler("LCMScheduler", {}, "LCM"),
}

# other spellings users type for the same samplers
_ALIASES: dict[str, str] = {
    "dpmsolver++_karras": "dpm++_2m_karras",
    "dpm++2m_karras": "dpm++_2m_karras",
    "dpmpp_2m_karras": "dpm++_2m_karras",
    "dpm++2m": "dpm++_2m",
    "dpmpp_2m": "dpm++_2m",
    "dpmsolver++_sde": "dpm++_2m_sde",
    "dpm++2m_sde": "dpm++_2m_sde",
    "dpmpp_2m_sde": "dpm++_2m_sde",
    "dpmsolver++_sde_karras": "dpm++_2m_sde_karras",
    "dpm++2m_sde_karras": "dpm++_2m_sde_karras",
    "dpmpp_2m_sde_karras": "dpm++_2m_sde_karras",
    "k_euler_karras": "euler_karras",
    "k_lms_karras": "lms_karras",
    "k_heun": "heun",
    "uni_pc": "unipc",
}

SAMPLER_NAMES: tuple[str, ...] = tuple(_SAMPLERS) + tuple(_ALIASES)
"""Every accepted sampler name (canonical names first, then aliases), for argparse choices."""

SD_SCRIPTS_SAMPLER_NAMES: tuple[str, ...] = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
    "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)
"""The sixteen names sd-scripts itself accepts."""


def canonical_sampler_name(name: str) -> str:
    """The canonical spelling of a sampler name (case-insensitive; aliases resolved).

    Raises :class:`UserError` listing the choices for an unknown name.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _SAMPLERS:
        raise UserError(
            f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)} "
            "(--sample_sampler / --sampler / --ss)"
        )
    return key


def a1111_sampler_name(name: str) -> str:
    """The name A1111 shows for a sampler (``"euler_a"`` -> ``"Euler a"``), for PNG infotext.

    Unknown names come back unchanged.
    """
    try:
        return _SAMPLERS[canonical_sampler_name(name)].a1111_name
    except UserError:
        return name


def scheduler_config(v_parameterization: bool = False) -> dict[str, Any]:
    """The SDXL training noise schedule as a diffusers scheduler config dict."""
    return {
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "beta_start": BETA_START,
        "beta_end": BETA_END,
        "beta_schedule": BETA_SCHEDULE,
        "steps_offset": STEPS_OFFSET,
        "timestep_spacing": TIMESTEP_SPACING,
        "prediction_type": "v_prediction" if v_parameterization else "epsilon",
    }


def make_sampler(
    name: str, v_parameterization: bool = False, zero_terminal_snr: bool = False
) -> Any:
    """Build the diffusers scheduler for a sampler name on the SDXL noise schedule.

    ``name`` is any of :data:`SAMPLER_NAMES`, case-insensitive. ``v_parameterization`` selects
    ``prediction_type="v_prediction"``. ``zero_terminal_snr`` rescales the betas to zero terminal
    SNR (only schedulers that support ``rescale_betas_zero_snr``; others raise
    :class:`UserError`). Options a scheduler class does not take are left out, so every class gets
    only what it understands. Unknown names raise :class:`UserError` listing the choices.
    """
    import diffusers

    key = canonical_sampler_name(name)
    sampler = _SAMPLERS[key]
    cls = getattr(diffusers, sampler.scheduler)
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = {**scheduler_config(v_parameterization), **sampler.options}
    if zero_terminal_snr:
        if "rescale_betas_zero_snr" not in accepted:
            supported = [n for n in _SAMPLERS if _supports_zero_snr(_SAMPLERS[n].scheduler)]
            raise UserError(
                f"sampler {key!r} does not support --zero_terminal_snr; use one of: "
                f"{', '.join(supported)}"
            )
        config["rescale_betas_zero_snr"] = True
    with warnings.catch_warnings():
        # diffusers marks algorithm_type="dpmsolver" (sd-scripts' "dpmsolver") as deprecated, and
        # its K-diffusion schedulers trip a numpy-2 DeprecationWarning while building sigmas
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", "__array", DeprecationWarning)
        return cls(**{k: v for k, v in config.items() if k in accepted})


def _supports_zero_snr(class_name: str) -> bool:
    import diffusers

    cls = getattr(diffusers, class_name)
    return "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters
