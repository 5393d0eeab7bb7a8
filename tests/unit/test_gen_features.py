"""img2img, inpainting, highres fix, Deep Shrink and Gradual Latent on the tiny model.

Oracles: diffusers' StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline (4-channel
U-Net: latent blending) with the same components, seeds and strength, compared as float images in
fp32 on CPU (tolerance as in test_pipeline.py). Deep Shrink and Gradual Latent have no diffusers
counterpart: "off" settings must give the plain image bit for bit, "on" must change it, and only
inside the timestep window.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.inference import gen_args as ga
from library.inference import gen_features as gf
from library.inference import pipeline as pl
from library.inference.deep_shrink import DeepShrink, DeepShrinkSettings
from library.inference.gradual_latent import GradualLatentSettings, gaussian_blur, parse_unsharp
from library.inference.highres import HighresFix, first_stage_size, generate_highres
from library.inference.img2img import InitImage, denoise_start, load_images, mask_to_latent, output_size
from tests.unit.test_pipeline import ORACLE_TOL, build_tiny

SIZE = 64


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def gen(tiny_dir) -> pl.SDXLGenerator:
    from library.models.checkpoint_io import load_sdxl
    from library.models.tokenizers import load_tokenizers

    return pl.SDXLGenerator.from_models(load_sdxl(tiny_dir / "tiny_sdxl.safetensors"), load_tokenizers())


@pytest.fixture(scope="module")
def i2i_pipe(tiny_dir):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_dir / "tiny_sdxl_diffusers"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def init_images():
    rng = np.random.default_rng(0)
    smooth = [np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8) for _ in range(2)]
    return [Image.fromarray(a) for a in smooth]


def _gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


# ---- img2img / inpainting against diffusers ----------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_img2img_matches_diffusers(gen, i2i_pipe, init_images, sampler):
    """Same init images, strength, seeds: our image equals StableDiffusionXLImg2ImgPipeline's."""
    from library.inference.samplers import make_sampler

    prompts, seeds = ["a photo of a cat", "a red dog"], [3, 4]
    ours = gen.generate(prompts, None, steps=4, guidance_scale=5.0, sampler=sampler, seeds=seeds, output_type="np",
                        init=InitImage(images=init_images, strength=0.75))
    i2i_pipe.scheduler = make_sampler(sampler)
    theirs = i2i_pipe(prompts, image=init_images, strength=0.75, num_inference_steps=4, guidance_scale=5.0,
                      generator=_gens(seeds), output_type="np").images
    assert ours.shape == theirs.shape == (2, SIZE, SIZE, 3)
    assert np.abs(ours - theirs).max() < ORACLE_TOL


def test_inpainting_matches_diffusers(gen, i2i_pipe, init_images):
    """A binary mask on the latent grid: our latent blending equals the 4-channel inpainting pipeline."""
    from diffusers import StableDiffusionXLInpaintPipeline

    from library.inference.samplers import make_sampler

    pipe = StableDiffusionXLInpaintPipeline(**i2i_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_sampler("ddim")
    mask_image = np.zeros((SIZE, SIZE), np.uint8)
    mask_image[:, :32] = 255  # repaint the left half
    latent_mask = torch.zeros(1, 1, SIZE // 8, SIZE // 8)
    latent_mask[..., :4] = 1.0
    ours = gen.generate(["a cat"], None, steps=4, guidance_scale=5.0, sampler="ddim", seeds=[9], output_type="np",
                        init=InitImage(images=init_images[:1], strength=0.75, mask=latent_mask))
    theirs = pipe(["a cat"], image=init_images[0], mask_image=Image.fromarray(mask_image), strength=0.75,
                  num_inference_steps=4, guidance_scale=5.0, generator=_gens([9]), output_type="np",
                  height=SIZE, width=SIZE).images
    assert np.abs(ours - theirs).max() < ORACLE_TOL


def _x0(gen, image):
    from library.inference.img2img import image_to_tensor
    from library.models.sdxl import VAE_SCALE_FACTOR

    with torch.no_grad():
        return gen.vae.encode(image_to_tensor(image)).latent_dist.mean * VAE_SCALE_FACTOR


def test_strength_low_stays_close_high_moves_away(gen, init_images):
    x0 = _x0(gen, init_images[0])
    dist = {}
    for strength in (0.25, 1.0):
        out = gen.generate(["a red dog"], steps=8, guidance_scale=5.0, sampler="euler_a", seeds=[5],
                           output_type="latent", init=InitImage(latents=x0, strength=strength))
        dist[strength] = (out - x0).abs().mean().item()
    plain = gen.generate(["a red dog"], width=SIZE, height=SIZE, steps=8, guidance_scale=5.0, sampler="euler_a",
                         seeds=[5], output_type="latent")
    assert dist[0.25] < 0.5 * dist[1.0]
    # sd-scripts (and diffusers' img2img) do not define strength 1.0 as text-to-image: the init image still
    # enters at the first timestep's noise level
    assert (out - plain).abs().max() > 1e-3


def test_inpainting_keeps_the_unmasked_part(gen, init_images):
    x0 = _x0(gen, init_images[0])
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    out = gen.generate(["a red dog"], steps=6, guidance_scale=5.0, sampler="euler_a", seeds=[5], output_type="latent",
                       init=InitImage(latents=x0, strength=0.9, mask=mask))
    keep = (mask == 0).expand_as(out)
    assert torch.equal(out[keep], x0[keep])  # after the last step the kept part is the clean original
    assert (out[~keep] - x0[~keep]).abs().mean() > 0.05
    image, reference = gen.decode(out, "np")[0], gen.decode(x0, "np")[0]
    # pixels: the corners (far from the repainted centre) change less than the centre (the tiny random VAE's
    # attention mixes the whole image, so "unchanged" holds in latent space only)
    assert np.abs(image[:8, :8] - reference[:8, :8]).mean() < np.abs(image[24:40, 24:40]
                                                                      - reference[24:40, 24:40]).mean()


def test_mask_image_and_schedule_conversions(tmp_path):
    mask = np.zeros((70, 100), np.uint8)  # rounded down to 96x64 -> latent 12x8
    mask[:, 48:] = 255
    latent = mask_to_latent(Image.fromarray(mask))
    assert latent.shape == (1, 1, 8, 12)
    assert latent[..., 0].max() == 0 and latent[..., -1].min() == 1  # white = repaint
    assert 0 < latent[0, 0, 0, 5] < 1 or 0 < latent[0, 0, 0, 6] < 1  # bilinear: a soft edge, as sd-scripts
    assert output_size(Image.new("RGB", (100, 70))) == (96, 64)
    assert [denoise_start(30, s) for s in (0.8, 1.0, 0.0, 0.5)] == [6, 0, 29, 15]
    assert first_stage_size(1024, 1024, 0.5) == (512, 512) and first_stage_size(1000, 760, 0.5) == (480, 352)
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), color).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("x")
    assert [s.path.name for s in load_images(str(tmp_path))] == ["0.png", "1.png"]
    with pytest.raises(UserError, match="not found"):
        load_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .png"):
        load_images(str(tmp_path / "empty"))


# ---- Deep Shrink -----------------------------------------------------------------------------------------
def test_deep_shrink_off_window_and_ratio_one_are_exact(gen):
    kwargs = dict(width=SIZE, height=SIZE, steps=2, guidance_scale=5.0, sampler="euler", seeds=[1], output_type="np")
    plain = gen.generate(["a cat"], **kwargs)
    ds = DeepShrink(gen.unet)
    try:
        assert ds.depths == 9
        for settings in (None, DeepShrinkSettings(3, 2000), DeepShrinkSettings(3, 0, ratio=1.0)):
            ds.settings = settings
            assert np.array_equal(gen.generate(["a cat"], **kwargs), plain)
        for depth in (0, 3):
            ds.settings = DeepShrinkSettings(depth, 0)  # every step inside the window
            assert np.abs(gen.generate(["a cat"], **kwargs) - plain).max() > 1e-3
    finally:
        ds.remove()
    assert np.array_equal(gen.generate(["a cat"], **kwargs), plain)  # hooks removed


def test_deep_shrink_acts_only_inside_its_window(gen):
    """One U-Net call per timestep: output equals the plain U-Net's outside the window, differs inside."""
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        context, pooled = gen.conditioning(["a cat"], [""], 1, 3)
    added = gen._added_cond(pooled, 1, 1, SIZE, SIZE, None, (0, 0), None, None)

    def unet(t):
        with torch.no_grad():
            return gen.unet(x, torch.tensor(t), encoder_hidden_states=context, added_cond_kwargs=added).sample

    plain = {t: unet(t) for t in (900.0, 700.0, 500.0)}
    ds = DeepShrink(gen.unet)
    try:
        ds.settings = DeepShrinkSettings(depth_1=3, timesteps_1=800, depth_2=6, timesteps_2=600, ratio=0.5)
        assert ds.settings.depth_at(900) == 3 and ds.settings.depth_at(700) == 6 and ds.settings.depth_at(500) is None
        assert (unet(900.0) - plain[900.0]).abs().max() > 1e-4  # depth 1 window
        assert (unet(700.0) - plain[700.0]).abs().max() > 1e-4  # depth 2 window
        assert torch.equal(unet(500.0), plain[500.0])  # below both windows: untouched
    finally:
        ds.remove()


# ---- Gradual Latent ---------------------------------------------------------------------------------------
def test_gradual_latent_grows_only_below_its_timestep(gen):
    kwargs = dict(width=128, height=128, steps=6, guidance_scale=5.0, sampler="euler_a", seeds=[2], output_type="np")
    plain = gen.generate(["a cat"], **kwargs)
    off = GradualLatentSettings(timesteps=1000, ratio=1.0)
    assert np.array_equal(gen.generate(["a cat"], gradual_latent=off, **kwargs), plain)
    sizes = []
    gen.unet_hooks.append(lambda step: sizes.append((float(step.timestep), step.latent_input.shape[-1])))
    try:
        settings = GradualLatentSettings(timesteps=600, ratio=0.5, ratio_step=0.25, every_n_steps=2)
        grown = gen.generate(["a cat"], gradual_latent=settings, **kwargs)
    finally:
        gen.unet_hooks.pop()
    assert grown.shape == plain.shape and np.abs(grown - plain).max() > 1e-3
    # the latent is 16 wide: 8 until the first step below t=600, then grows every 2 steps (0.75: 12 -> 8, then 16)
    assert all(width == 8 for t, width in sizes if t >= 600)
    assert sizes[-1][1] == 16 and [w for _, w in sizes] == sorted(w for _, w in sizes)


def test_unsharp_and_blur():
    x = torch.zeros(1, 1, 9, 9)
    x[..., 4, 4] = 1.0
    blurred = gaussian_blur(x, 3, 1.0)
    assert abs(blurred.sum().item() - 1.0) < 1e-5 and blurred[..., 4, 4] < 1.0
    assert parse_unsharp("3,0.5,0.5,0").target_x is False and parse_unsharp(None) is None
    with pytest.raises(UserError):
        parse_unsharp("4,0.5,0.5")


# ---- highres fix ------------------------------------------------------------------------------------------
def test_highres_fix_two_stages(gen):
    seen = []
    gen.unet_hooks.append(lambda step: seen.append((step.latent_input.shape[-1], step.control_enabled)))
    firsts = []
    try:
        kwargs = dict(prompts=["a cat"], negative_prompts=[""], width=128, height=128, steps=4, guidance_scale=5.0,
                      sampler="euler", seeds=[7], strength=0.5)
        hr = HighresFix(scale=0.5, steps=3, disable_control_net=True)
        images = generate_highres(gen, dict(kwargs), hr, lambda imgs, kw: firsts.append((imgs, kw)))
    finally:
        gen.unet_hooks.pop()
    assert images[0].size == (128, 128) and firsts[0][0][0].size == (64, 64)
    assert seen == [(8, True)] * 3 + [(16, False)] * 2  # 3 first-stage steps, then 4 * 0.5 at full size
    # the first stage is the plain 64 px image of the same seed; the second stage uses seed + 1
    plain = gen.generate(["a cat"], [""], width=64, height=64, steps=3, guidance_scale=5.0, sampler="euler", seeds=[7])
    assert np.array_equal(np.asarray(plain[0]), np.asarray(firsts[0][0][0]))
    latent = generate_highres(gen, dict(kwargs), HighresFix(scale=0.5, steps=3, latents_upscaling=True))
    assert latent[0].size == (128, 128) and not np.array_equal(np.asarray(latent[0]), np.asarray(images[0]))


# ---- options ------------------------------------------------------------------------------------------------
def _args(tmp_path, *extra) -> argparse.Namespace:
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    return ga.parse_args(["--ckpt", str(ckpt), "--prompt", "a cat", *extra])


@pytest.mark.parametrize("extra, message", [
    (["--mask_path", "."], "needs --image_path"),
    (["--image_path", "missing.png"], "not found"),
    (["--strength", "1.5"], "between 0 and 1"),
    (["--ds_depth_1", "9"], "0..8"),
    (["--gradual_latent_timesteps", "650", "--sampler", "ddim"], "euler_a"),
    (["--highres_fix_save_1st"], "need --highres_fix_scale"),
    (["--clip_vision_strength", "0.5"], "not supported"),
    (["--network_regional_mask_max_color_codes", "3"], "not supported"),
    (["--interactive"], "leave out --prompt"),
])
def test_feature_options_rejected(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        ga.validate_args(_args(tmp_path, *extra))


def test_mask_with_attached_lora_is_regional_and_refused(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "i.png")
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"x")
    common = ["--image_path", str(tmp_path / "i.png"), "--mask_path", str(tmp_path / "i.png"),
              "--network_weights", str(lora)]
    with pytest.raises(UserError, match="regional LoRA"):
        ga.validate_args(_args(tmp_path, *common))
    ga.validate_args(_args(tmp_path, *common, "--network_merge"))


def test_prompt_options_per_prompt(tmp_path):
    args = _args(tmp_path, "--ds_timesteps_1", "700", "--console_log_level", "debug")
    ga.validate_args(args)
    assert args.console_log_level == "DEBUG" and args.W is None
    spec = ga.parse_prompt_line("a cat --dsr 0.4 --glt 500 --t 0.3").with_defaults(sampler="euler_a")
    assert gf.deep_shrink_for(spec, args) == DeepShrinkSettings(3, 700, None, 650, 0.4)
    assert gf.gradual_latent_for(spec, args).timesteps == 500
    plain = ga.parse_prompt_line("a cat").with_defaults()
    assert gf.deep_shrink_for(plain, args) is None and gf.gradual_latent_for(plain, args) is None
    jobs = ga.plan_jobs([spec, ga.parse_prompt_line("a AND b").with_defaults()], seed=1)
    with pytest.raises(UserError, match="regional prompting"):
        gf.check_jobs(jobs, args)
    assert ga.ImageJob(spec, 1).batch_key() != ga.ImageJob(plain, 1).batch_key()


def test_highres_upscaler_module_protocol(gen, tmp_path, monkeypatch):
    """sd-scripts' --highres_fix_upscaler protocol: create_upscaler(**kwargs), support_latents(), upscale(...)."""
    from library.inference.highres import load_upscaler

    (tmp_path / "my_upscaler.py").write_text(
        "import torch.nn.functional as F\n"
        "calls = []\n"
        "class Up:\n"
        "    def __init__(self, mode): self.mode = mode\n"
        "    def support_latents(self): return True\n"
        "    def upscale(self, vae, images, latents, dtype, width, height, batch_size, vae_batch_size):\n"
        "        calls.append((images, tuple(latents.shape), width, height, batch_size))\n"
        "        return F.interpolate(latents, (height // 8, width // 8), mode=self.mode)\n"
        "def create_upscaler(mode='bilinear'): return Up(mode)\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    upscaler = load_upscaler("my_upscaler", "mode=nearest", "cpu", torch.float32)
    kwargs = dict(prompts=["a cat"], negative_prompts=[""], width=128, height=128, steps=2, guidance_scale=5.0,
                  sampler="euler", seeds=[7])
    out = generate_highres(gen, kwargs, HighresFix(scale=0.5, steps=2, upscaler=upscaler))
    import my_upscaler

    assert out[0].size == (128, 128) and my_upscaler.calls == [(None, (1, 4, 8, 8), 128, 128, 1)]
    with pytest.raises(UserError, match="cannot import"):
        load_upscaler("no_such_upscaler_module", None, "cpu", torch.float32)
    with pytest.raises(UserError, match="key=value"):
        load_upscaler("my_upscaler", "nearest", "cpu", torch.float32)


def test_attach_images_cycles_and_checks_sizes(tmp_path):
    from library.inference.img2img import SourceImage

    jobs = ga.plan_jobs([ga.parse_prompt_line("a cat").with_defaults(width=64, height=64)], images_per_prompt=3,
                        n_iter=2, seed=1)
    images = [SourceImage(Image.new("RGB", (100, 64)), Path("a.png")), SourceImage(Image.new("RGB", (64, 64)),
                                                                                  Path("b.png"))]
    gf.attach_images(jobs, 2, images, [], highres=False)
    assert [j.images.init.path.name for j in jobs] == ["a.png", "b.png", "a.png"] * 2  # restarts per iteration
    assert (jobs[0].spec.width, jobs[0].spec.height) == (96, 64) and jobs[1].spec.width == 64
    with pytest.raises(UserError, match="does not fit"):
        gf.attach_images(jobs, 2, images, [SourceImage(Image.new("L", (64, 64)), Path("m.png"))], highres=False)
    with pytest.raises(UserError, match="at least 32x32"):
        gf.attach_images(jobs, 2, [SourceImage(Image.new("RGB", (20, 64)), Path("s.png"))], [], highres=False)
