"""On a CUDA GPU: generation with CUDA-graphed U-Net calls equals eager generation.

Run on the lent device: ``python -m pytest -m gpu tests/gpu -q`` (never in CI: no GPU there).
The tiny model generates the same seeds eagerly and graphed; graph replays must give the same
latents (the same kernels run), also when the hook state changes inside a loop (ControlNet-LLLite
with ``--control_net_ratios 0.5``), with an attached LoRA whose multiplier changes between calls,
and through the real script with the highres fix (two sizes, two loops).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import networks.control_net_lllite as L
from library.inference import unet_graphs
from library.inference.control import LLLiteControl
from library.inference.pipeline import SDXLGenerator, load_networks, set_network_multipliers
from library.models.presets import build_random
from library.models.tokenizers import load_tokenizers
from tests.unit.test_control_net_lllite import _randomise

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def generator():
    models = build_random("tiny", seed=0)
    return SDXLGenerator.from_models(models, load_tokenizers(), dtype=torch.bfloat16, device="cuda")


def latents(gen: SDXLGenerator, graphs: bool, seed: int = 3, size: int = 128) -> torch.Tensor:
    gen.cuda_graphs = graphs
    return gen.generate(["a red square"], ["blurry"], width=size, height=size, steps=6, guidance_scale=5.0,
                        sampler="euler_a", seeds=[seed], output_type="latent")


def count_replays(monkeypatch) -> list[int]:
    """Replays of every LoopGraphs made from now on (one entry per sampling loop)."""
    made: list[unet_graphs.LoopGraphs] = []
    original = unet_graphs.LoopGraphs.__init__

    def init(self, call):
        original(self, call)
        made.append(self)
    monkeypatch.setattr(unet_graphs.LoopGraphs, "__init__", init)
    return made


def test_graphed_generation_equals_eager(generator, monkeypatch):
    eager = latents(generator, False)
    loops = count_replays(monkeypatch)
    graphed = latents(generator, True)
    assert len(loops) == 1 and loops[0].replays == 5  # 6 calls: eager, then capture + replay, 4 more replays
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)
    assert not torch.equal(latents(generator, True, seed=4), graphed)  # a replay follows its inputs


def test_lllite_ratio_switch_and_lora_multiplier_inside_graphs(generator, tmp_path, monkeypatch):
    net = L.create_network(1.0, 8, None, None, None, generator.unet, cond_emb_dim=6)
    _randomise(net, seed=5)
    net.save_weights(tmp_path / "lllite.safetensors", None, {})
    lllite = L.load_for_inference(tmp_path / "lllite.safetensors", generator.unet, device="cuda", dtype=torch.bfloat16)
    control = LLLiteControl([lllite], [1.0], [0.5])  # on for the first 3 of 6 calls: the key changes mid-loop
    generator.unet_hooks.append(control)
    try:
        guide = torch.rand(3, 128, 128) * 2 - 1
        control.set_images([guide], "cuda", torch.bfloat16)
        eager = latents(generator, False)
        loops = count_replays(monkeypatch)
        graphed = latents(generator, True)
        torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)
        assert loops[0].replays >= 2 and len(loops[0].graphs) == 2  # one graph with LLLite on, one off
        control.set_images([-guide], "cuda", torch.bfloat16)  # a new guide between loops is seen
        assert not torch.equal(latents(generator, True), graphed)
    finally:
        generator.unet_hooks.remove(control)
        control.clear()


def test_lora_multiplier_changed_between_calls_is_seen(tmp_path):
    from networks.lora import create_network

    models = build_random("tiny", seed=0)
    net = create_network(1.0, 4, 4, models.vae, [models.text_encoder1, models.text_encoder2], models.unet)
    _randomise(net, seed=7)
    net.save_weights(str(tmp_path / "lora.safetensors"), torch.float32, {})
    gen = SDXLGenerator.from_models(models, load_tokenizers(), dtype=torch.bfloat16, device="cuda")
    networks = load_networks(["networks.lora"], [str(tmp_path / "lora.safetensors")], [1.0], gen.unet, gen.vae,
                             gen.text_encoders, torch.bfloat16, "cuda")
    outs = {}
    for mult in (1.0, 0.25):
        set_network_multipliers(networks, [mult])
        outs[mult] = (latents(gen, True), latents(gen, False))
    for graphed, eager in outs.values():
        torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)
    assert not torch.equal(outs[1.0][0], outs[0.25][0])


def test_script_highres_fix_graphed_equals_eager(tiny_ckpt, tmp_path):
    import sdxl_gen_img

    common = ["--ckpt", str(tiny_ckpt), "--prompt", "a square --d 3", "--W", "128", "--H", "128", "--steps", "5",
              "--sampler", "euler_a", "--bf16", "--highres_fix_scale", "0.5", "--highres_fix_steps", "4"]
    images = []
    for mode in ("off", "auto"):
        paths = sdxl_gen_img.main([*common, "--cuda_graphs", mode, "--outdir", str(tmp_path / mode)])
        images.append(np.asarray(Image.open(paths[0]), dtype=np.int16))
    assert np.abs(images[0] - images[1]).max() <= 1
