"""sdxl_train_network.py end to end on the tiny model, on the CPU, launched the way users launch it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import run_main, run_script

pytestmark = pytest.mark.slow


def train_args(ckpt: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["sdxl_train_network.py", "--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(data),
            "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
            "--bucket_reso_steps", "32", "--output_dir", str(out), "--output_name", "lora",
            "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4",
            "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs",
            "--learning_rate", "1e-3", "--max_train_steps", str(steps), "--train_batch_size", "2", "--seed", "1",
            "--max_data_loader_n_workers", "0", "--log_every_n_steps", "1", *extra]


def in_process(*train_args_values) -> tuple[str, list[str]]:
    """``run_main``'s (script, argv) for :func:`train_args` (the accelerate launch test is the real launch)."""
    script, *argv = train_args(*train_args_values)
    return script, argv


def test_end_to_end_under_accelerate_launch(tiny_ckpt, dataset, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
           *train_args(tiny_ckpt, dataset, out, 10, "--save_every_n_steps", "5", "--training_comment", "ci run")]
    r = run_script(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    lora = out / "lora.safetensors"
    assert lora.is_file() and (out / "lora-step00000005.safetensors").is_file()
    state = load_file(lora)
    assert state and all(k.startswith("lora_unet_") for k in state)  # --network_train_unet_only: no TE keys
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_up.weight"))  # it trained
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_steps"] == "10" and meta["ss_training_comment"] == "ci run"
    assert meta["ss_num_train_images"] == "80"  # 8 images x 10 repeats, as sd-scripts counts
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert "sshs_model_hash" in meta


def test_resume_is_exact(tiny_ckpt, dataset, tmp_path):
    """6 steps straight == 3 steps + save_state + resume to 6 (same weights, bit for bit, on the CPU)."""
    straight, first, resumed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    r = run_main(*in_process(tiny_ckpt, dataset, straight, 6))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_main(*in_process(tiny_ckpt, dataset, first, 6, "--save_every_n_steps", "3",
                                                "--save_state"))
    assert r.returncode == 0, r.stderr[-3000:]
    state_dir = first / "lora-step00000003-state"
    assert (state_dir / "train_state.json").is_file()
    r = run_main(*in_process(tiny_ckpt, dataset, resumed, 6, "--resume", str(state_dir)))
    assert r.returncode == 0, r.stderr[-3000:]
    a, c = load_file(straight / "lora.safetensors"), load_file(resumed / "lora.safetensors")
    assert a.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], c[k]), k
    with safe_open(str(resumed / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "6"


def test_learning_is_real(tiny_ckpt, dataset, tmp_path):
    """On fixed noise and timesteps, the trained LoRA lowers the denoising loss on its training images."""
    from library.data.dataset import build_dataset_group
    from library.diffusion.conditioning import TextConditioner, time_ids
    from library.models.checkpoint_io import load_sdxl
    from library.models.sdxl import VAE_SCALE_FACTOR
    from library.models.tokenizers import load_tokenizers
    from networks import lora as lora_module

    out = tmp_path / "learn"
    r = run_main(*in_process(tiny_ckpt, dataset, out, 60, "--learning_rate", "3e-3"))
    assert r.returncode == 0, r.stderr[-3000:]

    models = load_sdxl(tiny_ckpt)
    conditioner = TextConditioner(*load_tokenizers(), models.text_encoder1, models.text_encoder2)
    group = build_dataset_group({"train_data_dir": str(dataset), "resolution": "64", "enable_bucket": True,
                                 "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32,
                                 "train_batch_size": 1, "caption_extension": ".caption", "seed": 1})
    group.set_epoch(1)
    gen = torch.Generator().manual_seed(0)
    scheduler_alphas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    alphas_cumprod = torch.cumprod(1 - scheduler_alphas, 0)

    def loss_with(network_mul: float, network) -> float:
        network.set_multiplier(network_mul)
        total = 0.0
        gen.manual_seed(0)
        seen: set = set()
        with torch.no_grad():
            for i in range(len(group)):
                batch = group[i]
                if batch["image_paths"][0] in seen:  # the folder repeats each image 10 times; score each once
                    continue
                seen.add(batch["image_paths"][0])
                latents = models.vae.encode(batch["images"]).latent_dist.mean * VAE_SCALE_FACTOR
                context, pooled = conditioner.encode(batch["captions"])
                ids = time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"])
                for t in (200, 500, 800):
                    eps = torch.randn(latents.shape, generator=gen)
                    a = alphas_cumprod[t]
                    noisy = a.sqrt() * latents + (1 - a).sqrt() * eps
                    pred = models.unet(noisy, torch.tensor([t]), context,
                                       added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
                    total += torch.nn.functional.mse_loss(pred, eps).item()
        return total

    network, _ = lora_module.create_network_from_weights(1.0, out / "lora.safetensors", models.vae,
                                                         [models.text_encoder1, models.text_encoder2], models.unet)
    network.apply_to([models.text_encoder1, models.text_encoder2], models.unet, False, True)
    network.load_weights(out / "lora.safetensors")
    base, trained = loss_with(0.0, network), loss_with(1.0, network)
    assert trained < 0.9 * base, (base, trained)


def test_bad_options_fail_before_loading(tiny_ckpt, dataset, tmp_path):
    r = run_main(*in_process(tiny_ckpt, dataset, tmp_path / "x", 2, "--shuffle_caption"))
    assert r.returncode == 2
    assert "shuffle" in r.stderr and "Traceback" not in r.stderr
    r = run_main(*in_process(tiny_ckpt, dataset, tmp_path / "x", 2, "--full_bf16"))
    assert r.returncode == 2 and "full_bf16" in r.stderr and "Traceback" not in r.stderr


def test_sample_images_and_weighted_captions_during_training(tiny_ckpt, dataset, tmp_path):
    """--sample_prompts writes PNGs with parameters under output_dir/sample; --weighted_captions works
    together with cached text-encoder outputs (the weights are fixed, so they are baked into the cache)."""
    from library.inference.png_metadata import read_generation_params

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\n(sks:1.2) circle, plain background --w 64 --h 64 --s 2 --d 7\n", encoding="utf-8")
    out = tmp_path / "sampled"
    r = run_main(*in_process(tiny_ckpt, dataset, out, 2, "--weighted_captions",
                                                "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
                                                "--sample_sampler", "euler_a"))
    assert r.returncode == 0, r.stderr[-3000:]
    samples = sorted((out / "sample").glob("lora_000002_00_*_7.png"))
    assert len(samples) == 1
    params = read_generation_params(samples[0])
    assert params["seed"] == 7 and params["steps"] == 2 and params["width"] == 64


def test_masked_loss_weights_the_loss_by_the_mask_images(tiny_ckpt, dataset, tmp_path):
    """--masked_loss --conditioning_data_dir with the DreamBooth folders: each image's mask (same stem,
    its red channel) weights the loss. All-black masks train nothing (every lora_up stays zero); all-white
    ones train exactly as without a mask."""
    from PIL import Image

    images = sorted((dataset / "10_sks shape").glob("*.png"))
    runs = {}
    for name, value in (("black", 0), ("white", 255)):
        masks = tmp_path / f"{name}_masks"
        masks.mkdir()
        for path in images:
            Image.new("RGB", Image.open(path).size, (value, 0, 0)).save(masks / path.name)
        out = tmp_path / name
        r = run_main(*in_process(tiny_ckpt, dataset, out, 2, "--masked_loss", "--conditioning_data_dir", str(masks)))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = load_file(out / "lora.safetensors")
        with safe_open(str(out / "lora.safetensors"), "pt") as f:
            (subset,) = json.loads(f.metadata()["ss_datasets"])[0]["subsets"]
        assert (subset["num_repeats"], subset["class_tokens"]) == (10, "sks shape")  # the DreamBooth folder
    r = run_main(*in_process(tiny_ckpt, dataset, tmp_path / "plain", 2))
    assert r.returncode == 0, r.stderr[-3000:]
    plain = load_file(tmp_path / "plain" / "lora.safetensors")
    ups = [k for k in plain if k.endswith("lora_up.weight")]
    assert all(torch.count_nonzero(runs["black"][k]) == 0 for k in ups)
    assert any(torch.count_nonzero(plain[k]) for k in ups)
    assert all(torch.equal(runs["white"][k], plain[k]) for k in plain)
