"""networks.lora: module discovery and key names, math, files, optimizer groups, and diffusers interop."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open

from library.errors import UserError
from networks import lora, lora_args
from networks.protocol import NetworkProtocol

TE1_Q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
TE2_FC2 = "lora_te2_text_model_encoder_layers_31_mlp_fc2"
UNET_Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
MID_PROJ_IN = "lora_unet_middle_block_1_proj_in"


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_meta():
    """Full-size SDXL with no storage: names and shapes only."""
    from library.models.presets import build_random

    return build_random("base", meta=True)


@pytest.fixture(scope="module")
def tiny_template():
    """The tiny random SDXL in fp32, built once per module (random init is the expensive part)."""
    from library.models.presets import build_random

    models = build_random("tiny", seed=0)
    return models, torch.get_rng_state()


@pytest.fixture
def tiny(tiny_template):
    """A fresh tiny random SDXL in fp32 (tests hook and merge into it): a deep copy of the template,
    with torch's global RNG where a fresh ``build_random("tiny", seed=0)`` leaves it."""
    import copy

    models, rng = tiny_template
    torch.set_rng_state(rng)
    return copy.deepcopy(models)


def _net(models, dim=4, alpha=2.0, **kwargs) -> lora.LoRANetwork:
    return lora.create_network(1.0, dim, alpha, models.vae, [models.text_encoder1, models.text_encoder2],
                               models.unet, **kwargs)


def _randomize_up(net: lora.LoRANetwork, seed: int = 1, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _unet_inputs(models, batch: int = 1, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cfg = models.unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(sample=torch.randn(batch, 4, 16, 16, generator=gen), timestep=torch.tensor([500] * batch),
                encoder_hidden_states=torch.randn(batch, 8, cfg.cross_attention_dim, generator=gen),
                added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=gen),
                                   "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)})


@torch.no_grad()
def _unet_out(unet, inputs) -> torch.Tensor:
    return unet(**inputs).sample


@torch.no_grad()
def _te_out(te, ids) -> torch.Tensor:
    return te(ids, output_hidden_states=True).hidden_states[-2]


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 49408, (1, 12), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Discovery and names (full-size SDXL on the meta device)
# ---------------------------------------------------------------------------------------------
def test_full_size_module_counts_and_names(base_meta):
    net = _net(base_meta)
    assert isinstance(net, NetworkProtocol)
    assert len(net.unet_loras) == 722
    assert len(net.te_prefixes["lora_te1"]) == 72 and len(net.te_prefixes["lora_te2"]) == 192
    sd = net.state_dict()
    assert len(sd) == 3 * (722 + 264)
    for name in (UNET_Q, MID_PROJ_IN, TE1_Q, TE2_FC2):
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= sd.keys()
        assert sd[f"{name}.alpha"].ndim == 0
    assert all(k.startswith(("lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_")) for k in sd)
    assert not any("down_blocks" in k or "text_projection" in k for k in sd)
    assert tuple(sd[f"{UNET_Q}.lora_down.weight"].shape) == (4, 640)
    assert tuple(sd[f"{TE2_FC2}.lora_up.weight"].shape) == (1280, 4)
    assert sd[f"{UNET_Q}.lora_down.weight"].is_meta  # nothing was allocated


def test_conv_dim_adds_resnet_and_sampler_convs(base_meta):
    net = _net(base_meta, conv_dim="8", conv_alpha="4")
    sd = net.state_dict()
    assert len(net.unet_loras) == 788  # + 17 resnets x (conv1, conv2, time_emb_proj) + 11 shortcuts + 4 samplers
    conv1 = "lora_unet_output_blocks_2_0_in_layers_2"
    assert tuple(sd[f"{conv1}.lora_down.weight"].shape) == (8, 1920, 3, 3)  # 1280 + 640-ch skip
    assert tuple(sd[f"{conv1}.lora_up.weight"].shape) == (1280, 8, 1, 1)
    assert getattr(net, conv1).scale == 0.5  # conv_alpha / conv_dim
    assert tuple(sd["lora_unet_output_blocks_2_0_skip_connection.lora_down.weight"].shape) == (4, 1920, 1, 1)
    assert tuple(sd["lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight"].shape) == (4, 1280)
    for name in ("lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv",
                 "lora_unet_middle_block_2_out_layers_3"):
        assert f"{name}.lora_down.weight" in sd


def test_block_dims_and_lr_weights_select_modules(base_meta):
    dims = ["0"] + ["4"] * 21 + ["0"]
    dims[13] = "0"  # output_blocks.0
    net = _net(base_meta, block_dims=",".join(dims), block_alphas=",".join(["2"] * 23))
    assert not any(m.lora_name.startswith("lora_unet_output_blocks_0_") for m in net.unet_loras)
    assert any(m.lora_name.startswith("lora_unet_output_blocks_1_") for m in net.unet_loras)
    net = _net(base_meta, down_lr_weight="zeros", mid_lr_weight="1,1,1", up_lr_weight="sine+0.1")
    assert net.block_lr_weight[1:10] == [0.0] * 9 and net.block_lr_weight[0] == net.block_lr_weight[22] == 1.0
    assert net.block_lr_weight[13] == pytest.approx(0.1) and net.block_lr_weight[21] == pytest.approx(1.1)
    assert not any(m.lora_name.startswith("lora_unet_input_blocks_") for m in net.unet_loras)
    assert lora_args.block_lr_weights("cosine", None, None)[1:10][0] == pytest.approx(1.0)
    assert lora_args.block_lr_weights("0.5,0.01", None, None, "0.1")[1:4] == [0.5, 0.0, 1.0]


def test_bad_network_args_are_user_errors(base_meta):
    with pytest.raises(UserError, match="conv_dimm"):
        _net(base_meta, conv_dimm="4")
    with pytest.raises(UserError, match="exactly 23"):
        _net(base_meta, block_dims="4,4,4")
    with pytest.raises(UserError, match="rank_dropout"):
        _net(base_meta, rank_dropout="1.5")


# ---------------------------------------------------------------------------------------------
# Math on the tiny model
# ---------------------------------------------------------------------------------------------
def test_zero_up_and_multiplier_zero_give_base_output(tiny):
    inputs, ids = _unet_inputs(tiny), _ids()
    base, base_te = _unet_out(tiny.unet, inputs), _te_out(tiny.text_encoder2, ids)
    net = _net(tiny)
    net.apply_to([tiny.text_encoder1, tiny.text_encoder2], tiny.unet)
    assert torch.equal(_unet_out(tiny.unet, inputs), base)  # up is zero-initialised
    _randomize_up(net)
    assert not torch.allclose(_unet_out(tiny.unet, inputs), base, atol=1e-4)
    assert not torch.allclose(_te_out(tiny.text_encoder2, ids), base_te, atol=1e-4)
    net.set_multiplier(0.0)
    assert torch.equal(_unet_out(tiny.unet, inputs), base)
    assert torch.equal(_te_out(tiny.text_encoder2, ids), base_te)


def test_forward_math_of_one_module():
    layer = torch.nn.Linear(6, 5)
    module = lora.LoRAModule("x", layer, multiplier=0.7, lora_dim=3, alpha=1.5)
    torch.nn.init.normal_(module.lora_up.weight)
    x = torch.randn(2, 4, 6)
    expected = layer(x) + (x @ module.lora_down.weight.T @ module.lora_up.weight.T) * 0.7 * 0.5
    module.apply_to()
    assert torch.allclose(layer(x), expected, atol=1e-6)
    module.restore()
    assert "forward" not in layer.__dict__
    assert lora.LoRAModule("y", layer, lora_dim=4, alpha=0).scale == 1.0  # alpha 0 -> rank


def test_conv_lora_merge_matches_hook():
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
    module = lora.LoRAModule("c", conv, multiplier=0.8, lora_dim=2, alpha=1.0)
    torch.nn.init.normal_(module.lora_up.weight)
    x = torch.randn(1, 4, 9, 9)
    module.apply_to()
    hooked = conv(x)
    module.restore()
    module.merge(None, 0.8)
    assert torch.allclose(conv(x), hooked, atol=1e-5)


def test_fp8_base_weight_with_bf16_activations():
    layer = torch.nn.Linear(8, 8)
    ref = torch.nn.Linear(8, 8)
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    ref.weight.data = layer.weight.data.to(torch.bfloat16)
    ref.bias.data = layer.bias.data.to(torch.bfloat16)
    module = lora.LoRAModule("f", layer, lora_dim=2, alpha=2)
    torch.nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    delta = module.lora_up(module.lora_down(x.float())).to(torch.bfloat16)
    assert torch.allclose(out.float(), (ref(x) + delta).float(), atol=2e-2)


def test_fp8_base_under_autocast_upcasts_once_to_the_compute_dtype():
    """fp32 activations under autocast (after a normalisation) reach an fp8 layer: its weight goes
    straight to bf16, the dtype the matmul runs in, with no fp32 copy between, and the result is what
    upcasting through fp32 gave (fp8 values are exact in both)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layer = torch.nn.Linear(16, 12)
    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    layer.bias.data = layer.bias.data.to(torch.bfloat16)
    module = lora.LoRAModule("f", layer, lora_dim=2, alpha=2)
    torch.nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    x = torch.randn(3, 16)  # fp32, as a LayerNorm's output under autocast

    class Casts(TorchDispatchMode):
        made: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default:
                self.made.append((tuple(out.shape), out.dtype))
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16), Casts() as casts:
        out = layer(x)
    assert ((12, 16), torch.float32) not in casts.made and ((12, 16), torch.bfloat16) in casts.made
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the old way: through an fp32 copy
        base = torch.nn.functional.linear(x, layer.weight.float(), layer.bias.float())
        delta = module.lora_up(module.lora_down(x))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.add(base, delta, alpha=module.scale))


def test_merge_to_equals_hooked_unet(tiny):
    inputs, ids = _unet_inputs(tiny), _ids()
    net = _net(tiny, conv_dim="4", conv_alpha="2")
    net.apply_to([tiny.text_encoder1, tiny.text_encoder2], tiny.unet)
    _randomize_up(net)
    hooked, hooked_te = _unet_out(tiny.unet, inputs), _te_out(tiny.text_encoder1, ids)
    net.merge_to([tiny.text_encoder1, tiny.text_encoder2], tiny.unet)
    assert not any("forward" in m.org_module.__dict__ for m in net.unet_loras)  # unhooked
    assert torch.allclose(_unet_out(tiny.unet, inputs), hooked, atol=1e-5)
    assert torch.allclose(_te_out(tiny.text_encoder1, ids), hooked_te, atol=1e-5)


def test_dropouts_only_in_training(tiny):
    inputs = _unet_inputs(tiny)
    net = _net(tiny, neuron_dropout=0.5, rank_dropout="0.5", module_dropout="0.5")
    net.apply_to([tiny.text_encoder1, tiny.text_encoder2], tiny.unet, apply_text_encoder=False)
    _randomize_up(net)
    net.eval()
    a = _unet_out(tiny.unet, inputs)
    assert torch.equal(a, _unet_out(tiny.unet, inputs))
    net.train()
    torch.manual_seed(0)
    b, c = _unet_out(tiny.unet, inputs), _unet_out(tiny.unet, inputs)
    assert not torch.equal(b, a) and not torch.equal(b, c)
    for m in net.unet_loras:
        m.dropout = m.rank_dropout = m.module_dropout = None
    net.eval()
    assert torch.equal(_unet_out(tiny.unet, inputs), a)  # eval mode ignored the dropouts entirely


def test_rank_dropout_compensates_scale():
    layer = torch.nn.Linear(16, 16, bias=False)
    torch.nn.init.zeros_(layer.weight)
    module = lora.LoRAModule("r", layer, lora_dim=64, alpha=64, rank_dropout=0.5)
    torch.nn.init.ones_(module.lora_up.weight)
    torch.nn.init.ones_(module.lora_down.weight)
    module.apply_to()
    module.train()
    torch.manual_seed(0)
    x = torch.ones(256, 16)
    expected = torch.full((256, 16), 16.0 * 64)  # eval value: sum over in (16) and rank (64)
    assert torch.allclose(layer(x).mean(), expected.mean(), rtol=0.05)


# ---------------------------------------------------------------------------------------------
# Optimizer groups, unet-only
# ---------------------------------------------------------------------------------------------
def test_param_groups_loraplus_and_per_te_lrs(tiny):
    net = _net(tiny, loraplus_lr_ratio="16", loraplus_text_encoder_lr_ratio="4")
    groups, desc = net.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-3)
    assert desc == ["textencoder1", "textencoder1 plus", "textencoder2", "textencoder2 plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 4e-5, 2e-5, 8e-5, 1e-4, 16e-4])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    up_ids = {id(p) for n, p in net.named_parameters() if "lora_up" in n}
    assert all(id(p) in up_ids for g, d in zip(groups, desc) if d.endswith("plus") for p in g["params"])
    groups, desc = _net(tiny).prepare_optimizer_params(None, None, 1e-3)
    assert desc == ["textencoder", "unet"] and [g["lr"] for g in groups] == [1e-3, 1e-3]
    groups, desc = _net(tiny).prepare_optimizer_params(0.0, 1e-4, 1e-3)
    assert desc == ["unet"]


def test_block_lr_weight_groups(tiny):
    # tiny U-Net: transformers in input_blocks 4,5,7,8 (blocks 5,6,8,9), middle_block.1 (11), output_blocks 0-5
    net = _net(tiny, down_lr_weight="1,1,1,1,0,1,1,1,1", up_lr_weight="0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5")
    assert not any(m.lora_name.startswith("lora_unet_input_blocks_4_") for m in net.unet_loras)
    groups, desc = net.prepare_optimizer_params(None, 1e-4, 1e-3)
    lrs = dict(zip(desc, (g["lr"] for g in groups)))
    assert list(lrs) == ["textencoder", "unet_block6", "unet_block8", "unet_block9", "unet_block11"] + [
        f"unet_block{i}" for i in range(13, 19)]
    assert lrs["unet_block6"] == pytest.approx(1e-4) and lrs["unet_block14"] == pytest.approx(5e-5)


def test_unet_only_creates_no_text_encoder_modules(tiny):
    net = _net(tiny)
    net.apply_to([tiny.text_encoder1, tiny.text_encoder2], tiny.unet, apply_text_encoder=False)
    assert not any(k.startswith("lora_te") for k in net.state_dict())
    assert net.text_encoder_loras == [] and not any(n.startswith("lora_te") for n, _ in net.named_modules())
    assert not any("forward" in m.__dict__ for m in tiny.text_encoder1.modules())
    groups, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc == ["unet"]


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, None])
def test_save_load_round_trip(tiny, tmp_path, dtype):
    net = _net(tiny, conv_dim="2")
    net.apply_to([tiny.text_encoder1, tiny.text_encoder2], tiny.unet)
    _randomize_up(net)
    path = tmp_path / "x.safetensors"
    net.save_weights(path, dtype, {"ss_network_dim": "4", "modelspec.title": "t"})
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor(f"{UNET_Q}.alpha")
        down = f.get_tensor(f"{UNET_Q}.lora_down.weight")
    assert keys == set(net.state_dict())
    assert alpha.ndim == 0 and alpha.item() == 2.0
    assert down.dtype == (dtype or torch.float32) and alpha.dtype == (dtype or torch.float32)
    assert meta["ss_network_dim"] == "4" and {"sshs_model_hash", "sshs_legacy_hash"} <= meta.keys()
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind
    other = _net(tiny, conv_dim="2", alpha=1.0)
    info = other.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    assert getattr(other, UNET_Q).scale == 0.5  # the file's alpha (2 / rank 4), not the network's
    loaded = other.state_dict()
    for key, value in net.state_dict().items():
        assert torch.equal(loaded[key], value.to(dtype or value.dtype).float())


def _bytes_after_header(path) -> bytes:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, header JSON, tensor data
    return raw[8 + n:]


def test_sshs_hashes_are_sd_scripts_hashes_of_the_written_file(tiny, tmp_path):
    import hashlib

    from safetensors.torch import save

    from library.models.metadata import safetensors_payload_sha256

    net = _net(tiny, dim=16, conv_dim="8")  # > 1.1 MB of tensors, so the legacy window holds data
    net.apply_to([tiny.text_encoder1, tiny.text_encoder2], tiny.unet)
    _randomize_up(net)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    net.save_weights(a, None, {"ss_network_dim": "16", "modelspec.title": "one", "ss_seed": "1"})
    net.save_weights(b, None, {"ss_network_dim": "16", "modelspec.title": "another title", "ss_seed": "1"})
    with safe_open(str(a), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert len(a.read_bytes()) > 0x110000
    # sshs_model_hash: sha256 of the file after its header, what A1111/Civitai would compute
    assert meta["sshs_model_hash"] == hashlib.sha256(_bytes_after_header(a)).hexdigest()
    assert meta["sshs_model_hash"] == safetensors_payload_sha256(str(a))
    assert meta["sshs_model_hash"] != hashlib.sha256(a.read_bytes()).hexdigest()
    # sshs_legacy_hash: sd-scripts' definition, over the file serialised with its ss_* metadata only
    ss_only = save(state, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    with safe_open(str(b), "pt") as f:
        meta_b = f.metadata()
    assert (meta_b["sshs_model_hash"], meta_b["sshs_legacy_hash"]) == (meta["sshs_model_hash"],
                                                                       meta["sshs_legacy_hash"])



def test_pt_format_and_strict_unknown_keys(tiny, tmp_path):
    net = _net(tiny)
    net.save_weights(tmp_path / "x.pt", None, None)
    assert set(torch.load(tmp_path / "x.pt", weights_only=True)) == set(net.state_dict())
    bad = dict(net.state_dict())
    bad["lora_unet_nowhere.lora_down.weight"] = torch.zeros(4, 4)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="lora_unet_nowhere"):
        _net(tiny).load_weights(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="shape"):
        _net(tiny, dim=8).load_weights(tmp_path / "x.pt")
    with pytest.raises(UserError, match="not found"):
        _net(tiny).load_weights(tmp_path / "missing.safetensors")


def test_create_network_from_weights_infers_shape(tiny, tmp_path):
    net = _net(tiny, dim=6, alpha=3.0, conv_dim="2", conv_alpha="1")
    net.apply_to(None, tiny.unet, apply_text_encoder=False)
    _randomize_up(net)
    path = tmp_path / "w.safetensors"
    net.save_weights(path, torch.float32, {})
    loaded, weights = lora.create_network_from_weights(1.0, str(path), None, [tiny.text_encoder1,
                                                       tiny.text_encoder2], tiny.unet)
    assert set(loaded.state_dict()) == set(net.state_dict())
    assert loaded.text_encoder_loras == []
    m = getattr(loaded, UNET_Q)
    assert m.lora_dim == 6 and m.scale == pytest.approx(0.5)
    conv = getattr(loaded, "lora_unet_input_blocks_1_0_in_layers_2")
    assert conv.lora_dim == 2 and conv.scale == pytest.approx(0.5) and conv.is_conv
    loaded.load_weights(path)


def test_diffusers_named_unet_keys_are_converted(tiny, tmp_path):
    net = _net(tiny)
    _randomize_up(net)
    aliases = {v: k for k, v in lora.diffusers_unet_aliases(tiny.unet).items()}
    renamed = {}
    for key, value in net.state_dict().items():
        name, _, suffix = key.partition(".")
        renamed[f"{aliases.get(name, name)}.{suffix}"] = value
    assert any("down_blocks" in k for k in renamed)
    loaded, weights = lora.create_network_from_weights(1.0, None, None, [tiny.text_encoder1, tiny.text_encoder2],
                                                       tiny.unet, weights_sd=renamed)
    assert set(weights) == set(net.state_dict())
    loaded.load_lora_state_dict(renamed)
    assert torch.equal(loaded.state_dict()[f"{UNET_Q}.lora_up.weight"], net.state_dict()[f"{UNET_Q}.lora_up.weight"])
    peft_style = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 128),
                  "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(128, 2)}
    converted = lora.normalize_lora_keys(peft_style, lora.diffusers_unet_aliases(tiny.unet))
    assert set(converted) == {f"{UNET_Q}.lora_down.weight", f"{UNET_Q}.lora_up.weight", f"{UNET_Q}.alpha"}


def test_max_norm_regularization(tiny):
    net = _net(tiny)
    _randomize_up(net, std=1.0)
    scaled, mean, top = net.apply_max_norm_regularization(0.5)
    assert scaled > 0 and top == pytest.approx(0.5)
    assert max(float(m.delta_weight().norm()) for m in net.unet_loras) <= 0.5 + 1e-4


# ---------------------------------------------------------------------------------------------
# Interop oracle: diffusers' own load_lora_weights
# ---------------------------------------------------------------------------------------------
class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def tiny_template_folder(tiny_template, tmp_path_factory):
    """The template written once as a diffusers folder (diffusers' pipeline loads it fresh per test)."""
    from library.models.checkpoint_io import save_diffusers_folder

    return save_diffusers_folder(tiny_template[0], tmp_path_factory.mktemp("lora_tiny") / "tiny")


@pytest.mark.parametrize("conv", [False, True])
def test_diffusers_load_lora_weights_matches_ours(tmp_path, conv, tiny, tiny_template_folder):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as dlogging

    models, folder = tiny, tiny_template_folder
    net = _net(models, dim=4, alpha=2.0, **({"conv_dim": "4", "conv_alpha": "3"} if conv else {}))
    net.apply_to([models.text_encoder1, models.text_encoder2], models.unet)
    _randomize_up(net, std=0.1)
    file = tmp_path / "lora.safetensors"
    net.save_weights(file, None, {"ss_network_module": "networks.lora"})
    inputs, ids = _unet_inputs(models), _ids()
    ours = (_unet_out(models.unet, inputs), _te_out(models.text_encoder1, ids), _te_out(models.text_encoder2, ids))

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    handler, root = _Collect(), logging.getLogger("diffusers")
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_warning()
    root.addHandler(handler)
    try:
        pipe.load_lora_weights(str(file))
    finally:
        root.removeHandler(handler)
        dlogging.set_verbosity(level)
    assert not [m for m in handler.messages if "unexpected" in m.lower() or "not" in m.lower()], handler.messages
    assert hasattr(pipe.unet, "peft_config")
    def n_lora(model):
        return sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))

    assert n_lora(pipe.unet) == len(net.unet_loras)
    assert n_lora(pipe.text_encoder) == len(net.te_prefixes["lora_te1"])
    assert n_lora(pipe.text_encoder_2) == len(net.te_prefixes["lora_te2"])
    theirs = (_unet_out(pipe.unet, inputs), _te_out(pipe.text_encoder, ids), _te_out(pipe.text_encoder_2, ids))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
