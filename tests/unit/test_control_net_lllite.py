"""ControlNet-LLLite: the module's math, identity at init, keys of the full-size U-Net, files both ways."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import networks.control_net_lllite as L
from library.errors import UserError
from library.models.presets import build_random


@pytest.fixture(scope="module")
def tiny():
    return build_random("tiny", seed=0)


def _unet_inputs(unet, batch=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(batch, 4, size // 8, size // 8, generator=g)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(batch, 128, generator=g),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32)}
    return lat, torch.tensor([500] * batch), ctx, added


def _randomise(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_one_module_matches_a_direct_recomputation(tiny):
    net = L.create_network(1.0, 8, None, None, None, tiny.unet, cond_emb_dim=6)
    _randomise(net)
    net.apply_to(None, tiny.unet)
    try:
        module = next(m for m in net.unet_modules if m.depth == 3 and m.lllite_name.endswith("attn1_to_v"))
        cond = torch.rand(2, 3, 64, 64) * 2 - 1
        net.set_cond_image(cond)
        org = module.org_module
        x = torch.randn(4, 4, org.in_features)  # guidance batch: 2 images x 2 copies, 2x2 tokens at latent/4
        out = org(x)  # through the hook, as the U-Net calls it
        sd = {k: v for k, v in module.state_dict().items()}
        h = F.relu(F.conv2d(cond, sd["conditioning1.0.weight"], sd["conditioning1.0.bias"], stride=4))
        h = F.relu(F.conv2d(h, sd["conditioning1.2.weight"], sd["conditioning1.2.bias"], stride=4))
        h = F.conv2d(h, sd["conditioning1.4.weight"], sd["conditioning1.4.bias"], stride=2)  # (2, 6, 2, 2)
        emb = h.flatten(2).transpose(1, 2).repeat(2, 1, 1)
        d = F.relu(x @ sd["down.0.weight"].T + sd["down.0.bias"])
        m = F.relu(torch.cat([emb, d], dim=2) @ sd["mid.0.weight"].T + sd["mid.0.bias"])
        expected = F.linear(x + (m @ sd["up.0.weight"].T + sd["up.0.bias"]), org.weight, org.bias)
        assert torch.allclose(out, expected, atol=1e-5)
        module.multiplier = 0.5
        half = F.linear(x + 0.5 * (m @ sd["up.0.weight"].T + sd["up.0.bias"]), org.weight, org.bias)
        assert torch.allclose(org(x), half, atol=1e-5)
    finally:
        net.restore()


def test_new_network_and_multiplier_zero_leave_the_unet_bit_identical(tiny):
    unet = tiny.unet
    args = _unet_inputs(unet)
    with torch.no_grad():
        base = unet(args[0], args[1], args[2], added_cond_kwargs=args[3]).sample
        net = L.create_network(1.0, 8, None, None, None, unet, cond_emb_dim=8)
        net.apply_to(None, unet)
        try:
            net.set_cond_image(torch.rand(2, 3, 64, 64) * 2 - 1)
            fresh = unet(args[0], args[1], args[2], added_cond_kwargs=args[3]).sample
            assert torch.equal(fresh, base)  # up is zero (weight and bias)
            _randomise(net)
            changed = unet(args[0], args[1], args[2], added_cond_kwargs=args[3]).sample
            assert (changed - base).abs().max() > 1e-3  # the modules really act
            net.set_multiplier(0.0)
            assert torch.equal(unet(args[0], args[1], args[2], added_cond_kwargs=args[3]).sample, base)
            net.set_multiplier(1.0)
            net.set_enabled(False)
            assert torch.equal(unet(args[0], args[1], args[2], added_cond_kwargs=args[3]).sample, base)
        finally:
            net.restore()
        assert torch.equal(unet(args[0], args[1], args[2], added_cond_kwargs=args[3]).sample, base)


def _sd_scripts_full_size_keys(cond_emb_dim=32, mlp_dim=64) -> dict[str, tuple]:
    """The key -> shape table sd-scripts writes for SDXL base (written out from its layout, not our code)."""
    half = cond_emb_dim // 2
    blocks = [("input_blocks_4_1", 2, 640, 2), ("input_blocks_5_1", 2, 640, 2),
              ("input_blocks_7_1", 10, 1280, 3), ("input_blocks_8_1", 10, 1280, 3),
              ("middle_block_1", 10, 1280, 3)]
    keys = {}
    for block, count, dim, depth in blocks:
        for t in range(count):
            for proj in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn2_to_q"):
                n = f"lllite_unet_{block}_transformer_blocks_{t}_{proj}"
                keys[f"{n}.conditioning1.0.weight"], keys[f"{n}.conditioning1.0.bias"] = (half, 3, 4, 4), (half,)
                if depth == 2:
                    keys[f"{n}.conditioning1.2.weight"] = (cond_emb_dim, half, 4, 4)
                    keys[f"{n}.conditioning1.2.bias"] = (cond_emb_dim,)
                else:
                    keys[f"{n}.conditioning1.2.weight"], keys[f"{n}.conditioning1.2.bias"] = (half, half, 4, 4), (half,)
                    keys[f"{n}.conditioning1.4.weight"] = (cond_emb_dim, half, 2, 2)
                    keys[f"{n}.conditioning1.4.bias"] = (cond_emb_dim,)
                keys[f"{n}.down.0.weight"], keys[f"{n}.down.0.bias"] = (mlp_dim, dim), (mlp_dim,)
                keys[f"{n}.mid.0.weight"] = (mlp_dim, mlp_dim + cond_emb_dim)
                keys[f"{n}.mid.0.bias"] = (mlp_dim,)
                keys[f"{n}.up.0.weight"], keys[f"{n}.up.0.bias"] = (dim, mlp_dim), (dim,)
    return keys


def test_full_size_unet_has_sd_scripts_keys_and_shapes():
    unet = build_random("base", meta=True).unet
    net = L.create_network(1.0, 64, None, None, None, unet, cond_emb_dim=32)
    assert len(net.unet_modules) == 136
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == _sd_scripts_full_size_keys()
    assert L.pixel_factor(unet) == 32
    assert len(L.create_network(1.0, 64, None, None, None, unet, skip_output_blocks="false").unet_modules) == 136 + 144


def test_round_trip_is_exact_and_metadata_is_modelspec(tiny, tmp_path):
    net = L.create_network(1.0, 8, None, None, None, tiny.unet, cond_emb_dim=6)
    _randomise(net, seed=3)
    path = tmp_path / "lllite.safetensors"
    net.save_weights(path, None, {"ss_network_dim": "8"})
    assert not list(tmp_path.glob(".*tmp"))
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base/control-net-lllite"
    back, weights = L.create_network_from_weights(1.0, path, None, None, tiny.unet)
    back.load_lllite_state_dict(weights)
    a, b = net.state_dict(), back.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [(m.depth, m.cond_emb_dim, m.mlp_dim) for m in back.unet_modules] == \
        [(m.depth, m.cond_emb_dim, m.mlp_dim) for m in net.unet_modules]
    other = L.create_network(1.0, 4, None, None, None, tiny.unet, cond_emb_dim=6)
    with pytest.raises(UserError, match="has shape .* but the network has"):
        other.load_weights(path)


def test_sd_scripts_layout_file_loads_and_acts(tiny, tmp_path):
    """A file laid out as sd-scripts writes it for the tiny U-Net (non-zero up bias, as sd-scripts
    initialises it) loads, derives its modules from names and shapes, and changes the output."""
    g = torch.Generator().manual_seed(5)
    tensors = {}
    layout = [("input_blocks_4_1", 1, 128, 2), ("input_blocks_5_1", 1, 128, 2), ("input_blocks_7_1", 2, 256, 3),
              ("input_blocks_8_1", 2, 256, 3), ("middle_block_1", 2, 256, 3)]
    for block, count, dim, depth in layout:
        for t in range(count):
            for proj in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn2_to_q"):
                n = f"lllite_unet_{block}_transformer_blocks_{t}_{proj}"
                shapes = {"conditioning1.0.weight": (4, 3, 4, 4), "conditioning1.0.bias": (4,),
                          "down.0.weight": (16, dim), "down.0.bias": (16,), "mid.0.weight": (16, 24),
                          "mid.0.bias": (16,), "up.0.weight": (dim, 16), "up.0.bias": (dim,)}
                if depth == 2:
                    shapes.update({"conditioning1.2.weight": (8, 4, 4, 4), "conditioning1.2.bias": (8,)})
                else:
                    shapes.update({"conditioning1.2.weight": (4, 4, 4, 4), "conditioning1.2.bias": (4,),
                                   "conditioning1.4.weight": (8, 4, 2, 2), "conditioning1.4.bias": (8,)})
                for key, shape in shapes.items():
                    tensors[f"{n}.{key}"] = torch.randn(shape, generator=g) * 0.1
    path = tmp_path / "sd_scripts_lllite.safetensors"
    save_file(tensors, str(path), metadata={"modelspec.architecture": L.ARCHITECTURE})
    unet = tiny.unet
    args = _unet_inputs(unet, batch=1)
    with torch.no_grad():
        base = unet(args[0], args[1], args[2], added_cond_kwargs=args[3]).sample
        net = L.load_for_inference(path, unet)
        try:
            assert len(net.unet_modules) == 32 and {m.cond_emb_dim for m in net.unet_modules} == {8}
            assert all(torch.equal(net.state_dict()[k], v) for k, v in tensors.items())
            net.set_cond_image(torch.zeros(1, 3, 64, 64))
            assert (unet(args[0], args[1], args[2], added_cond_kwargs=args[3]).sample - base).abs().max() > 1e-4
        finally:
            net.restore()
    bad = dict(tensors)
    bad["lllite_unet_output_blocks_99_1_transformer_blocks_0_attn1_to_q.down.0.weight"] = torch.zeros(16, 256)
    bad["lllite_unet_output_blocks_99_1_transformer_blocks_0_attn1_to_q.conditioning1.0.weight"] = torch.zeros(4, 3, 4, 4)
    bad["lllite_unet_output_blocks_99_1_transformer_blocks_0_attn1_to_q.conditioning1.2.weight"] = torch.zeros(8, 4, 4, 4)
    with pytest.raises(UserError, match="do not exist in this U-Net"):
        L.create_network_from_weights(1.0, None, None, None, unet, weights_sd=bad)


def test_image_size_must_fit_the_unet_downsampling(tiny):
    L.check_image_size(tiny.unet, 64, 96)
    with pytest.raises(UserError, match="width 72 is not a multiple of 32.*use 64 or 96"):
        L.check_image_size(tiny.unet, 72, 64)
    net = L.create_network(1.0, 4, None, None, None, tiny.unet, cond_emb_dim=4)
    net.apply_to(None, tiny.unet)
    try:
        net.set_cond_image(torch.zeros(1, 3, 64, 64))
        _randomise(net)
        lat, t, ctx, added = _unet_inputs(tiny.unet, batch=1, size=96)
        with pytest.raises(UserError, match="guide image must have the output image's size"), torch.no_grad():
            tiny.unet(lat, t, ctx, added_cond_kwargs=added)
    finally:
        net.restore()
    with pytest.raises(UserError, match="not a ControlNet-LLLite option"):
        L.create_network(1.0, 4, None, None, None, tiny.unet, conv_dim="4")


def test_network_args_select_blocks(tiny):
    def count(**kw):
        return len(L.create_network(1.0, 4, None, None, None, tiny.unet, cond_emb_dim=4, **kw).unet_modules)
    assert count() == 32  # input 4, 5 (1 block each), 7, 8 and middle (2 each): 8 blocks x 4 projections
    assert count(transformer_max_block_index="0") == 20
    assert count(skip_input_blocks="true") == 8
    assert count(skip_output_blocks="false") == 32 + 4 * (3 * 2 + 3 * 1)  # + output blocks 0-2 (2), 3-5 (1)
