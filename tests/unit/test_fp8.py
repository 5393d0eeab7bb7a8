"""library.models.fp8: a U-Net stored in float8 (``--fp8_base``) computes as a bf16-stored one, without autocast."""

from __future__ import annotations

import copy

import pytest
import torch

from library.models import fp8

@pytest.fixture(scope="module")
def unet():
    from library.models.presets import build_random

    return build_random("tiny", seed=0).unet.to(torch.bfloat16).eval()


def _inputs(unet) -> dict:
    gen = torch.Generator().manual_seed(0)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    bf16 = dict(dtype=torch.bfloat16)
    return dict(sample=torch.randn(2, 4, 16, 16, generator=gen).to(**bf16), timestep=torch.tensor([500, 20]),
                encoder_hidden_states=torch.randn(2, 8, cfg.cross_attention_dim, generator=gen).to(**bf16),
                added_cond_kwargs={"text_embeds": torch.randn(2, pooled, generator=gen).to(**bf16),
                                   "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2).to(**bf16)})


@torch.no_grad()
def test_fp8_unet_without_autocast_equals_the_bf16_unet_with_fp8_rounded_weights(unet):
    stored = copy.deepcopy(unet)
    layers = fp8.store_in_fp8(stored)
    rounded = copy.deepcopy(unet)
    for module in rounded.modules():
        if type(module) in (torch.nn.Linear, torch.nn.Conv2d):
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn).to(torch.bfloat16)
    assert layers == sum(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for m in unet.modules()) > 50
    assert stored.state_dict().keys() == unet.state_dict().keys()  # same parameters, same file keys
    assert not fp8.needs_autocast(stored, torch.bfloat16)  # runs as the bf16 U-Net does
    inputs = _inputs(unet)
    assert torch.equal(stored(**inputs).sample, rounded(**inputs).sample)


def test_what_still_needs_autocast():
    bf16 = torch.bfloat16
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).to(bf16)
    assert not fp8.needs_autocast(plain, bf16)
    plain[1].float()  # an fp32 parameter left
    assert fp8.needs_autocast(plain, bf16)

    class OwnForward(torch.nn.Linear):  # a subclass keeps its forward: its fp8 weight needs autocast
        pass

    own = torch.nn.Sequential(OwnForward(4, 4)).to(bf16)
    assert fp8.store_in_fp8(own) == 0
    own[0].weight.data = own[0].weight.data.to(torch.float8_e4m3fn)
    assert fp8.needs_autocast(own, bf16)


def test_under_autocast_the_layers_compute_in_autocast_dtype():
    """fp32 activations (a normalisation's output under autocast): the weight goes straight to bf16."""
    layers = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Conv2d(1, 2, 3))
    fp8.store_in_fp8(layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layers[0](torch.randn(2, 8)).dtype == torch.bfloat16
        assert layers[1](torch.randn(1, 1, 5, 5)).dtype == torch.bfloat16
    assert layers[0](torch.randn(2, 8)).dtype == torch.float32  # no autocast: the activation's dtype
