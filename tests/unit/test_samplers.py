"""Sampler names -> diffusers schedulers on the SDXL noise schedule."""

from __future__ import annotations

import diffusers
import pytest
import torch

from library.errors import UserError
from library.inference import samplers
from library.inference.samplers import (
    SAMPLER_NAMES,
    SD_SCRIPTS_SAMPLER_NAMES,
    a1111_sampler_name,
    canonical_sampler_name,
    make_sampler,
)

EXPECTED_CLASS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
    "k_lms": "LMSDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler",
    "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "ddpm": "DDPMScheduler",
    "euler_karras": "EulerDiscreteScheduler",
    "lms_karras": "LMSDiscreteScheduler",
    "heun_karras": "HeunDiscreteScheduler",
    "dpm_2_karras": "KDPM2DiscreteScheduler",
    "dpm_2_a_karras": "KDPM2AncestralDiscreteScheduler",
    "dpm++_2m": "DPMSolverMultistepScheduler",
    "dpm++_2m_karras": "DPMSolverMultistepScheduler",
    "dpm++_2m_sde": "DPMSolverMultistepScheduler",
    "dpm++_2m_sde_karras": "DPMSolverMultistepScheduler",
    "dpm++_2s_karras": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "unipc_karras": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "lcm": "LCMScheduler",
}

# diffusers' K-diffusion schedulers convert tensors with np.array() in loops; under pytest each
# conversion records a numpy-2 DeprecationWarning, which makes these tests 10x slower.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

SDXL_BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2


def test_sd_scripts_names_all_accepted_in_documented_order():
    assert SD_SCRIPTS_SAMPLER_NAMES == (
        "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
        "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
    )
    assert SAMPLER_NAMES[:16] == SD_SCRIPTS_SAMPLER_NAMES
    assert len(set(SAMPLER_NAMES)) == len(SAMPLER_NAMES)


def test_every_name_has_an_expected_class():
    canonical = {canonical_sampler_name(name) for name in SAMPLER_NAMES}
    assert canonical == set(EXPECTED_CLASS)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_builds_on_the_sdxl_schedule(name):
    scheduler = make_sampler(name)
    expected = EXPECTED_CLASS[canonical_sampler_name(name)]
    assert type(scheduler) is getattr(diffusers, expected)
    config = scheduler.config
    assert config.num_train_timesteps == 1000
    assert config.beta_start == pytest.approx(0.00085)
    assert config.beta_end == pytest.approx(0.012)
    assert config.beta_schedule == "scaled_linear"
    assert config.prediction_type == "epsilon"
    if "timestep_spacing" in config:
        assert config.timestep_spacing == "leading"
    if "steps_offset" in config:
        assert config.steps_offset == 1
    torch.testing.assert_close(scheduler.betas.float(), SDXL_BETAS, rtol=1e-5, atol=1e-8)

    scheduler.set_timesteps(30)
    timesteps = scheduler.timesteps
    assert len(timesteps) >= 30  # second-order samplers (heun, dpm_2) repeat timesteps
    assert 0 <= float(timesteps.min()) and float(timesteps.max()) < 1000
    assert float(timesteps[0]) >= float(timesteps[-1])


def test_ddim_and_euler_have_sdxl_leading_timesteps():
    for name in ("ddim", "euler"):
        scheduler = make_sampler(name)
        scheduler.set_timesteps(30)
        # leading spacing: step 1000 // 30 = 33, offset 1 -> 958, 925, ..., 1
        assert [int(t) for t in scheduler.timesteps[:3]] == [958, 925, 892]
        assert int(scheduler.timesteps[-1]) == 1


def test_ddim_does_not_clip_and_pndm_skips_prk():
    ddim = make_sampler("ddim")
    assert ddim.config.clip_sample is False
    assert ddim.config.set_alpha_to_one is False
    assert make_sampler("pndm").config.skip_prk_steps is True


def test_algorithms_and_karras_flags():
    assert make_sampler("dpmsolver").config.algorithm_type == "dpmsolver"
    assert make_sampler("dpmsolver++").config.algorithm_type == "dpmsolver++"
    assert make_sampler("dpm++_2m_sde_karras").config.algorithm_type == "sde-dpmsolver++"
    for name in ("dpm++_2m_karras", "dpmsolver++_karras", "dpm++2m_karras", "euler_karras"):
        assert make_sampler(name).config.use_karras_sigmas is True
    assert make_sampler("dpmsolver++").config.use_karras_sigmas is False


def test_v_parameterization():
    for name in ("ddim", "euler_a", "dpm++_2m_karras", "unipc"):
        assert make_sampler(name, v_parameterization=True).config.prediction_type == "v_prediction"


def test_names_are_case_insensitive_and_aliases_resolve():
    assert type(make_sampler("Euler_A")) is diffusers.EulerAncestralDiscreteScheduler
    assert canonical_sampler_name(" DDIM ") == "ddim"
    assert canonical_sampler_name("dpmsolver++_karras") == "dpm++_2m_karras"
    assert canonical_sampler_name("uni_pc") == "unipc"


def test_unknown_sampler_lists_choices():
    with pytest.raises(UserError) as info:
        make_sampler("euler_b")
    message = str(info.value)
    assert "euler_b" in message
    for name in SD_SCRIPTS_SAMPLER_NAMES:
        assert name in message


def test_zero_terminal_snr():
    scheduler = make_sampler("ddim", zero_terminal_snr=True)
    assert scheduler.config.rescale_betas_zero_snr is True
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6
    with pytest.raises(UserError, match="zero_terminal_snr"):
        make_sampler("lms", zero_terminal_snr=True)


def test_a1111_names():
    assert a1111_sampler_name("euler_a") == "Euler a"
    assert a1111_sampler_name("k_euler_a") == "Euler a"
    assert a1111_sampler_name("dpmsolver++_karras") == "DPM++ 2M Karras"
    assert a1111_sampler_name("ddim") == "DDIM"
    assert a1111_sampler_name("something else") == "something else"


def test_scheduler_config_dict():
    config = samplers.scheduler_config(v_parameterization=True)
    assert config["prediction_type"] == "v_prediction"
    assert config["timestep_spacing"] == "leading"
    assert config["steps_offset"] == 1


def test_one_sampler_step_runs():
    scheduler = make_sampler("euler_a")
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        noise_pred = torch.zeros_like(model_input)
        sample = scheduler.step(noise_pred, t, sample, generator=generator).prev_sample
    assert torch.isfinite(sample).all()
