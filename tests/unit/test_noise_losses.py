"""Noise schedule, timesteps, noise extras (library.diffusion.noise) and losses (library.diffusion.losses)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from library.diffusion import losses as L
from library.diffusion import noise as N
from library.errors import UserError


@pytest.fixture(scope="module")
def sched():
    return N.make_noise_scheduler()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ schedule


def test_noise_scheduler_config():
    s = N.make_noise_scheduler()
    c = s.config
    assert (c.beta_start, c.beta_end, c.beta_schedule, c.num_train_timesteps, c.clip_sample) == (
        0.00085, 0.012, "scaled_linear", 1000, False)
    assert c.prediction_type == "epsilon"
    assert N.make_noise_scheduler(v_parameterization=True).config.prediction_type == "v_prediction"
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    torch.testing.assert_close(s.betas, expected)


def test_zero_terminal_snr_schedule_and_finite_weights():
    s = N.make_noise_scheduler(v_parameterization=True, zero_terminal_snr=True)
    assert float(s.alphas_cumprod[-1]) == 0.0
    assert float(N.make_noise_scheduler().alphas_cumprod[-1]) > 0.004
    t = torch.tensor([0, 500, 999])
    for w in (L.min_snr_weight(t, s, 5.0, True), L.min_snr_weight(t, s, 5.0, False),
              L.debiased_estimation_weight(t, s, True), L.huber_c_for(t, s, "huber", "snr", 0.1)):
        assert torch.isfinite(w).all()
    assert float(L.min_snr_weight(t, s, 5.0, False)[-1]) == 1.0  # min(snr, g) / snr -> 1 as snr -> 0
    latents = torch.randn(3, 4, 8, 8)
    noise = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(N.add_noise(s, latents, noise, t)[-1], noise[-1])  # last step: pure noise


def test_tables_cached_per_device(sched):
    a = N.schedule_tables(sched, "cpu")
    assert N.schedule_tables(sched, torch.device("cpu")) is a
    assert a.snr.dtype == torch.float32 and a.snr.shape == (1000,)


# ------------------------------------------------------------------------------ timesteps


def test_timesteps_cover_range():
    t = N.sample_timesteps(20000, 200, 300, generator=_gen())
    assert t.dtype == torch.long and t.shape == (20000,)
    assert int(t.min()) == 200 and int(t.max()) == 299
    assert abs(float(t.float().mean()) - 249.5) < 1.5


def test_timesteps_min_equals_max_is_constant():
    t = N.sample_timesteps(7, 500, 500, generator=_gen())
    assert t.tolist() == [500] * 7


def test_timesteps_reproducible():
    assert torch.equal(N.sample_timesteps(16, generator=_gen(3)), N.sample_timesteps(16, generator=_gen(3)))
    assert not torch.equal(N.sample_timesteps(16, generator=_gen(3)), N.sample_timesteps(16, generator=_gen(4)))


def test_check_timestep_range():
    assert N.check_timestep_range(None, None) == (0, 1000)
    assert N.check_timestep_range(100, 100) == (100, 100)
    for low, high in [(10, 5), (-1, 10), (0, 1001), (1000, 1000)]:
        with pytest.raises(UserError, match="--max_timestep"):
            N.check_timestep_range(low, high)


# ------------------------------------------------------------------------------ noise


def _channel_means(noise: torch.Tensor) -> torch.Tensor:
    return noise.mean(dim=(2, 3))  # [B, C]


def test_plain_noise_is_standard_and_reproducible():
    latents = torch.zeros(8, 4, 32, 32)
    n1 = N.noise_like(latents, _gen(1))
    assert torch.equal(n1, N.noise_like(latents, _gen(1)))
    assert not torch.equal(n1, N.noise_like(latents, _gen(2)))
    assert abs(float(n1.std()) - 1.0) < 0.02 and abs(float(n1.mean())) < 0.02
    assert float(_channel_means(n1).std()) < 0.06  # ~1/32


def test_noise_offset_shifts_channel_means():
    latents = torch.zeros(128, 4, 32, 32)
    shifted = N.noise_like(latents, _gen(1), noise_offset=0.5)
    std = float(_channel_means(shifted).std())
    assert 0.42 < std < 0.58  # sqrt(0.5^2 + 1/1024)


def test_noise_offset_random_strength_is_bounded_by_offset():
    latents = torch.zeros(128, 4, 32, 32)
    stds = [float(_channel_means(N.noise_like(latents, _gen(s), 0.5, True)).std()) for s in range(8)]
    assert max(stds) < 0.58 and min(stds) < 0.45 and len(set(stds)) == 8


def test_adaptive_noise_scale_adds_channel_mean():
    latents = torch.full((128, 4, 16, 16), -2.0)  # |channel mean| = 2
    noise = N.noise_like(latents, _gen(1), noise_offset=0.1, adaptive_noise_scale=0.5)
    std = float(_channel_means(noise).std())
    assert 0.95 < std < 1.25  # offset 0.1 + 0.5 * 2 = 1.1
    clamped = N.noise_like(latents, _gen(1), noise_offset=0.1, adaptive_noise_scale=-1.0)
    assert float(_channel_means(clamped).std()) < 0.1  # offset clamped at 0


def test_multires_noise_unit_std_and_low_frequency():
    latents = torch.zeros(16, 4, 64, 64)
    plain = N.noise_like(latents, _gen(1))
    pyramid = N.noise_like(latents, _gen(1), multires_noise_iterations=6, multires_noise_discount=0.8)
    assert pyramid.shape == latents.shape
    assert abs(float(pyramid.std()) - 1.0) < 1e-4
    assert torch.equal(pyramid, N.noise_like(latents, _gen(1), multires_noise_iterations=6, multires_noise_discount=0.8))
    # coarse levels make neighbouring pixels correlated
    def neighbour_corr(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert neighbour_corr(pyramid) > neighbour_corr(plain) + 0.2


def test_noise_keeps_dtype():
    latents = torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16)
    assert N.noise_like(latents, _gen(), noise_offset=0.1, multires_noise_iterations=3).dtype == torch.bfloat16


def test_input_perturbation():
    noise = torch.randn(64, 4, 32, 32, generator=_gen(5))
    assert N.perturb_noise(noise, _gen(), None) is noise
    perturbed = N.perturb_noise(noise, _gen(), 0.1)
    assert abs(float((perturbed - noise).std()) - 0.1) < 0.005
    random = N.perturb_noise(noise, _gen(), 0.1, ip_noise_gamma_random_strength=True)
    assert float((random - noise).std()) < 0.1


# ------------------------------------------------------------------------------ add_noise / targets


def test_add_noise_matches_diffusers(sched):
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(N.add_noise(sched, latents, noise, t), sched.add_noise(latents, noise, t))


def test_targets(sched):
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([3, 250, 700, 999])
    assert N.target_for(sched, latents, noise, t, False) is noise
    torch.testing.assert_close(N.target_for(sched, latents, noise, t, True), sched.get_velocity(latents, noise, t))


# ------------------------------------------------------------------------------ losses


def test_basic_losses_per_sample():
    pred, target = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(L.per_sample_loss(pred, target, "l2"),
                               F.mse_loss(pred, target, reduction="none").mean((1, 2, 3)))
    torch.testing.assert_close(L.per_sample_loss(pred, target, "l1"),
                               F.l1_loss(pred, target, reduction="none").mean((1, 2, 3)))


def test_huber_formula():
    pred = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([0.0, 3.0, 0.5, 1.0]).view(2, 1, 1, 2)
    c = 0.1

    def huber(d, c):
        return 2 * c * (math.sqrt(d * d + c * c) - c)

    expected = torch.tensor([(huber(0, c) + huber(3, c)) / 2, (huber(0.5, c) + huber(1, c)) / 2])
    torch.testing.assert_close(L.per_sample_loss(pred, target, "huber", c), expected)
    torch.testing.assert_close(L.per_sample_loss(pred, target, "smooth_l1", c), expected / c)
    per_sample_c = torch.tensor([0.1, 0.5])
    expected2 = torch.tensor([(huber(0, 0.1) + huber(3, 0.1)) / 2, (huber(0.5, 0.5) + huber(1, 0.5)) / 2])
    torch.testing.assert_close(L.per_sample_loss(pred, target, "huber", per_sample_c), expected2)


def test_huber_schedules(sched):
    t = torch.tensor([0, 500, 1000 - 1])
    torch.testing.assert_close(L.huber_c_for(t, sched, "huber", "constant", 0.1, 2.0), torch.full((3,), 0.2))
    exp = L.huber_c_for(torch.tensor([0, 500, 1000]), sched, "smooth_l1", "exponential", 0.1, 2.0)
    torch.testing.assert_close(exp, torch.tensor([2.0, 2.0 * math.sqrt(0.1), 0.2]))
    a = float(sched.alphas_cumprod[500])
    sigma = math.sqrt((1 - a) / a)
    snr_c = L.huber_c_for(t, sched, "huber", "snr", 0.1)
    assert float(snr_c[1]) == pytest.approx(0.9 / (1 + sigma) ** 2 + 0.1, rel=1e-5)
    assert float(snr_c[0]) > float(snr_c[1]) > float(snr_c[2]) > 0.1
    assert L.huber_c_for(t, sched, "l2", "snr", 0.1) is None


def test_loss_options_checked():
    L.check_loss_options("huber", "snr", 0.1, 1.0)
    with pytest.raises(UserError, match="--loss_type"):
        L.check_loss_options("l3")
    with pytest.raises(UserError, match="--huber_schedule"):
        L.check_loss_options("huber", "cubic")


def test_masked_loss():
    pred, target = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    assert L.per_sample_loss(pred, target, mask=torch.ones(2, 8, 8)).tolist() == [1.0, 1.0]
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :, :8] = 1.0  # left half, at twice the latent resolution
    torch.testing.assert_close(L.per_sample_loss(pred, target, mask=mask), torch.tensor([0.5, 0.5]))



def test_loss_mask_is_the_mask_images_red_channel_or_the_alpha_mask():
    """As in sd-scripts: --masked_loss weights by the conditioning image's R channel (the dataset gives
    it in [0, 1]); alpha masks apply whenever the dataset made them, with or without --masked_loss."""
    pred, target = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    cond = torch.zeros(2, 3, 64, 64)
    cond[0, 0, :, :32] = 1.0  # image 0: left half white in R (G and B do not count); image 1: black
    cond[1, 1:] = 1.0
    batch = {"conditioning_images": cond}
    mask = L.loss_mask(batch, masked_loss=True)
    assert L.per_sample_loss(pred, target, mask=mask).tolist() == [0.5, 0.0]
    assert L.loss_mask(batch, masked_loss=False) is None  # LLLite's control images are no masks
    alpha = torch.ones(2, 64, 64)
    assert L.loss_mask({"alpha_masks": alpha}, masked_loss=False) is alpha
    assert L.loss_mask({}, masked_loss=True) is None


def _snr(sched, t):
    a = float(sched.alphas_cumprod[t])
    return a / (1 - a)


def test_min_snr_weight_by_hand(sched):
    t = torch.tensor([0, 100, 400, 999])
    for v in (False, True):
        got = L.min_snr_weight(t, sched, 5.0, v)
        for i, step in enumerate(t.tolist()):
            snr = _snr(sched, step)
            want = min(snr, 5.0) / (snr + 1 if v else snr)
            assert float(got[i]) == pytest.approx(want, rel=1e-5)


def test_snr_weightings_by_hand(sched):
    t = torch.tensor([0, 50, 600])
    loss = torch.tensor([1.0, 2.0, 3.0])
    snrs = [min(_snr(sched, s), 1000.0) for s in t.tolist()]
    scale = torch.tensor([s / (s + 1) for s in snrs])
    torch.testing.assert_close(L.scale_v_pred_loss_like_noise_pred(loss, t, sched), loss * scale)
    torch.testing.assert_close(L.v_pred_like_loss(loss, t, sched, 0.2), loss + loss / scale * 0.2)
    torch.testing.assert_close(L.debiased_estimation_weight(t, sched), torch.tensor([1 / math.sqrt(s) for s in snrs]))
    torch.testing.assert_close(L.debiased_estimation_weight(t, sched, True), torch.tensor([1 / (s + 1) for s in snrs]))


def test_apply_loss_weighting_composes(sched):
    t = torch.tensor([10, 300])
    loss = torch.tensor([1.0, 1.0])
    weights = torch.tensor([1.0, 0.5])
    got = L.apply_loss_weighting(loss, t, sched, v_prediction=False, loss_weights=weights, min_snr_gamma=5.0,
                                 debiased_estimation=True)
    want = loss * weights * L.min_snr_weight(t, sched, 5.0) * L.debiased_estimation_weight(t, sched)
    torch.testing.assert_close(got, want)
    assert torch.equal(L.apply_loss_weighting(loss, t, sched), loss)


# ------------------------------------------------------------------------------ GPU: no host syncs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_step_math_has_no_host_sync():
    dev = torch.device("cuda")
    sched = N.make_noise_scheduler(v_parameterization=True, zero_terminal_snr=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    latents = torch.randn(4, 4, 32, 32, device=dev, dtype=torch.bfloat16)
    mask = torch.ones(4, 64, 64, device=dev)

    def step() -> torch.Tensor:
        t = N.sample_timesteps(4, 0, 1000, gen, dev)
        noise = N.noise_like(latents, gen, 0.05, True, 0.01, 6, 0.3)
        noisy = N.add_noise(sched, latents, N.perturb_noise(noise, gen, 0.1, True), t)
        target = N.target_for(sched, latents, noise, t, True)
        for loss_type in L.LOSS_TYPES:
            c = L.huber_c_for(t, sched, loss_type, "snr", 0.1)
            loss = L.per_sample_loss(noisy, target, loss_type, c, mask=mask)
        loss = L.apply_loss_weighting(loss, t, sched, True, None, 5.0, True, 0.1, True)
        return loss.mean()

    step()  # warm-up: builds the device tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(bool(torch.isfinite(o)) for o in out)
