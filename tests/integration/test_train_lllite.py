"""sdxl_train_control_net_lllite.py end to end on the tiny model (CPU), and generation with its output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import sdxl_gen_img
import sdxl_train_control_net_lllite as script
from library.errors import UserError
from tests.conftest import run_main, run_script

pytestmark = pytest.mark.slow

QUADRANTS = 4


def _square(q: int, size: int = 64) -> tuple[int, int]:
    return (q % 2) * size // 2, (q // 2) * size // 2


def write_square_task(root: Path, flat: bool = False) -> tuple[Path, Path]:
    """Target: a red square on blue in one quadrant; condition: a white square on black in the same place.

    Returns (--train_data_dir, --conditioning_data_dir); ``flat``: the images lie in the first itself
    (sd-scripts' layout), else in its sub-folder ``10_square`` (our extension).
    """
    images, cond = (root / "data") if flat else (root / "data" / "10_square"), root / "cond"
    images.mkdir(parents=True)
    cond.mkdir()
    for q in range(QUADRANTS):
        x, y = _square(q)
        target = np.zeros((64, 64, 3), np.uint8)
        target[...] = (30, 60, 200)
        target[y:y + 32, x:x + 32] = (230, 40, 30)
        Image.fromarray(target).save(images / f"q{q}.png")
        (images / f"q{q}.caption").write_text("a square", encoding="utf-8")
        control = np.zeros((64, 64, 3), np.uint8)
        control[y:y + 32, x:x + 32] = 255
        Image.fromarray(control).save(cond / f"q{q}.png")
    return root / "data", cond


def base_args(ckpt: Path, data: Path, cond: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(data),
            "--conditioning_data_dir", str(cond), "--output_dir", str(out), "--output_name", "lllite",
            "--resolution", "64", "--cond_emb_dim", "16", "--network_dim", "32", "--max_train_steps", str(steps),
            "--optimizer_type", "AdamW", "--max_data_loader_n_workers", "0", "--cache_latents",
            "--cache_text_encoder_outputs", "--seed", "0", "--log_every_n_steps", "10", *extra]


@pytest.fixture(scope="module")
def unit_latent_ckpt(tmp_path_factory) -> Path:
    """The tiny model with its (random) VAE's latents scaled to unit size, so image content shows in the loss.

    The random tiny VAE gives scaled latents of std ~0.03: the target would be invisible next to unit noise.
    """
    from library.models.checkpoint_io import save_single_file
    from library.models.presets import build_random

    models = build_random("tiny", seed=0)
    conv = models.vae.quant_conv
    with torch.no_grad():
        conv.weight[:4] *= 30.0
        conv.bias[:4] *= 30.0
        conv.weight[4:] = 0.0  # log-variance -20: cached latents (sampled) equal the mean
        conv.bias[4:] = -20.0
    path = tmp_path_factory.mktemp("unit_vae") / "tiny_unit.safetensors"
    save_single_file(models, path)
    return path


def _eval_losses(models, net, latents, conds) -> tuple[float, float, float]:
    """Fixed-noise v-prediction loss at t in [300, 1000): trained network with the right control images,
    with those of the next quadrant, and without the network."""
    from library.diffusion.noise import make_noise_scheduler, target_for

    sched = make_noise_scheduler(True, False)
    g = torch.Generator().manual_seed(123)
    reps = 8
    lat = latents.repeat(reps, 1, 1, 1)
    eps = torch.randn(lat.shape, generator=g)
    t = torch.randint(300, 1000, (lat.shape[0],), generator=g)
    noisy, target = sched.add_noise(lat, eps, t), target_for(sched, lat, eps, t, True)
    ctx = torch.zeros(lat.shape[0], 77, 192)
    added = {"text_embeds": torch.zeros(lat.shape[0], 128),
             "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * lat.shape[0], dtype=torch.float32)}

    def loss(cond):
        net.set_cond_image(None if cond is None else cond.repeat(reps, 1, 1, 1))
        with torch.no_grad():
            pred = models.unet(noisy, t, ctx, added_cond_kwargs=added).sample
        return float(torch.nn.functional.mse_loss(pred, target))
    return loss(conds), loss(conds.roll(1, 0)), loss(None)


def test_lllite_learns_to_follow_the_condition(unit_latent_ckpt, tmp_path):
    """Learning is real: on the square task the trained LLLite lowers the loss, and the image generated
    through the real generation hook (fixed seeds) follows the control image.

    The U-Net is random and frozen, so it cannot denoise: with the usual epsilon target LLLite would have
    to make it reproduce the noise of its input, which shifting attention inputs cannot do (the condition
    is then ignored; see docs/train_lllite.md). With --v_parameterization at t >= 300 the target is
    mostly the image, which LLLite can steer. Metrics, in latent space (the random VAE's decoder draws
    nothing recognisable): the error of each generation to its condition's target against the base
    model's generation; which of the four targets each generation is nearest to; and the share of the
    condition-dependent part of the target (target minus the mean target) the generation reproduces.
    """
    from library.inference.control import LLLiteControl, load_guide_image
    from library.inference.pipeline import SDXLGenerator
    from library.models.checkpoint_io import load_sdxl
    from library.models.tokenizers import load_tokenizers
    from networks.control_net_lllite import load_for_inference

    data, cond = write_square_task(tmp_path)  # 10 repeats: 40 samples an epoch, batches of 16
    out = tmp_path / "out"
    r = run_main("sdxl_train_control_net_lllite.py",
                 base_args(unit_latent_ckpt, data, cond, out, 60, "--learning_rate", "1e-2", "--train_batch_size",
                           "16", "--v_parameterization", "--min_timestep", "300",
                           "--network_args", "skip_output_blocks=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    models = load_sdxl(unit_latent_ckpt, dtype=torch.float32)
    net = load_for_inference(out / "lllite.safetensors", models.unet)
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(data / "10_square" / f"q{q}.png"), np.float32))
                          .permute(2, 0, 1) / 127.5 - 1 for q in range(QUADRANTS)])
    with torch.no_grad():
        targets = models.vae.encode(images).latent_dist.mean * 0.13025
    conds = torch.stack([load_guide_image(cond / f"q{q}.png", 64, 64) for q in range(QUADRANTS)])
    right, shifted, base = _eval_losses(models, net, targets, conds)
    assert right < 0.85 * base and right < 0.95 * shifted, (right, shifted, base)

    gen = SDXLGenerator.from_models(models, load_tokenizers(None), v_parameterization=True)
    control = LLLiteControl([net], [1.0], [1.0])
    gen.unet_hooks.append(control)

    def generate(seed: int, q: int | None) -> torch.Tensor:
        if q is not None:
            control.set_images([conds[q]], "cpu", torch.float32)
        try:
            return gen.generate(["a square"], width=64, height=64, steps=3, guidance_scale=1.0, seeds=[seed],
                                sampler="euler_a", output_type="latent")[0]
        finally:
            control.clear()

    def mse(a, b) -> float:
        return float((a - b).pow(2).mean())

    specific = targets - targets.mean(0)
    own, plain_err, shares = [], [], []
    for seed in (0, 1):
        plain = generate(seed, None)
        steered = torch.stack([generate(seed, q) for q in range(QUADRANTS)])
        for q in range(QUADRANTS):
            errors = [mse(steered[q], targets[k]) for k in range(QUADRANTS)]
            assert min(range(QUADRANTS), key=errors.__getitem__) == q, (seed, q, errors)
            own.append(errors[q])
            plain_err.append(mse(plain, targets[q]))
            part = steered[q] - steered.mean(0)
            shares.append(float((part * specific[q]).sum() / specific[q].pow(2).sum()))
    assert np.mean(own) < 0.6 * np.mean(plain_err), (own, plain_err)
    assert min(shares) > 0.15, shares  # the base model's share is 0: it ignores the control image
    assert torch.equal(generate(1, None), plain)  # clear() switches the network off again


def test_accelerate_launch_then_generate_with_lora(tiny_ckpt, tmp_path):
    """One real launch (flip_aug, cached latents and TE outputs, a --cn sample), then sdxl_gen_img with
    the result alone and together with a LoRA, with a step ratio."""
    data, cond = write_square_task(tmp_path)
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a square --w 64 --h 64 --s 2 --cn {cond / 'q1.png'}\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "sdxl_train_control_net_lllite.py",
           *base_args(tiny_ckpt, data, cond, out, 4, "--learning_rate", "1e-3", "--flip_aug", "--gradient_checkpointing", "--sample_prompts",
                      str(prompts), "--sample_every_n_steps", "4", "--save_every_n_steps", "2")]
    r = run_script(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    lllite = out / "lllite.safetensors"
    assert (out / "lllite-step00000002.safetensors").is_file() and len(list((out / "sample").glob("*.png"))) == 1
    state = load_file(lllite)
    assert len({k.split(".")[0] for k in state}) == 32 and all(k.startswith("lllite_unet_") for k in state)
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("up.0.weight"))  # it trained
    with safe_open(str(lllite), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/control-net-lllite"
    assert meta["ss_network_dim"] == "32" and meta["ss_cond_emb_dim"] == "16"

    from library.models.checkpoint_io import load_sdxl
    from networks.lora import create_network

    models = load_sdxl(tiny_ckpt, dtype=torch.float32)
    lora = create_network(1.0, 4, 4, None, [models.text_encoder1, models.text_encoder2], models.unet)
    lora.save_weights(tmp_path / "lora.safetensors", None, {})
    common = ["--ckpt", str(tiny_ckpt), "--prompt", "a square --d 3", "--W", "64", "--H", "64", "--steps", "4",
              "--control_net_lllite_models", str(lllite), "--guide_image_path", str(cond / "q0.png")]
    alone = sdxl_gen_img.main([*common, "--outdir", str(tmp_path / "a"), "--control_net_ratios", "0.5"])
    both = sdxl_gen_img.main([*common, "--outdir", str(tmp_path / "b"), "--network_module", "networks.lora",
                              "--network_weights", str(tmp_path / "lora.safetensors")])
    assert len(alone) == 1 and len(both) == 1
    with pytest.raises(UserError, match="width 72 is not a multiple of 32"):
        sdxl_gen_img.main([*common[:5], "72", *common[6:], "--outdir", str(tmp_path / "c")])


def test_sd_scripts_flat_layout_runs_as_launched(tiny_ckpt, tmp_path):
    """sd-scripts' command line: --train_data_dir holds the images itself (one subset, num_repeats 1,
    --caption_extension .txt); a control image without a training image is left out with a warning
    that counts it, where sd-scripts stops."""
    data, cond = write_square_task(tmp_path, flat=True)
    for q in range(QUADRANTS):
        (data / f"q{q}.caption").rename(data / f"q{q}.txt")
    Image.new("RGB", (64, 64)).save(cond / "unpaired.png")
    out = tmp_path / "out"
    r = run_main("sdxl_train_control_net_lllite.py",
                 base_args(tiny_ckpt, data, cond, out, 2, "--caption_extension", ".txt"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"1 conditioning image(s) in {cond} have no training image of the same name and are not used: " \
           "unpaired.png" in r.stderr
    with safe_open(str(out / "lllite.safetensors"), "pt") as f:
        meta = f.metadata()
    (dataset,) = json.loads(meta["ss_datasets"])
    (subset,) = dataset["subsets"]
    assert dataset["is_controlnet"] and (subset["image_dir"], subset["num_repeats"], subset["img_count"]) == \
        ("data", 1, QUADRANTS)
    assert meta["ss_num_train_images"] == str(QUADRANTS)
    assert json.loads(meta["ss_tag_frequency"]) == {"data": {"a square": QUADRANTS}}  # the .txt captions


def test_bad_conditioning_data_is_one_line_before_loading(tmp_path):
    """A missing and an unreadable control image are named, with the count, before any model is read."""
    data, cond = write_square_task(tmp_path)
    (cond / "q1.png").unlink()
    (cond / "q2.png").write_bytes(b"not a png")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"garbage: reading it would fail, so the data must be checked first")
    args = base_args(model, data, cond, tmp_path / "out", 1)
    with pytest.raises(UserError) as info:
        script.main(args)
    text = str(info.value)
    assert text.startswith("2 of ") and "q1.png" in text and "no conditioning image" in text and "q2.png" in text
