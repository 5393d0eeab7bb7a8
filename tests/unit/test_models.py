"""Model loading and saving: round trips, diffusers as an independent oracle, the SDXL key set, errors."""

from __future__ import annotations

import collections

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models import convert_keys as ck
from library.models.checkpoint_io import (
    load_sdxl, load_vae, sai_state_dict, save_diffusers_folder, save_single_file)
from library.models.presets import build_random

COMPONENTS = [("unet", "unet"), ("vae", "vae"), ("text_encoder1", "text_encoder"), ("text_encoder2", "text_encoder_2")]


def assert_same_weights(ours, theirs, attr_pairs=COMPONENTS):
    for a, b in attr_pairs:
        s1 = getattr(ours, a).state_dict()
        s2 = {k: v for k, v in getattr(theirs, b).state_dict().items() if not k.endswith("position_ids")}
        s1 = {k: v for k, v in s1.items() if not k.endswith("position_ids")}
        assert s1.keys() == s2.keys(), f"{a}: {sorted(set(s1) ^ set(s2))[:5]}"
        bad = [k for k in s1 if s1[k].dtype != s2[k].dtype or not torch.equal(s1[k], s2[k])]
        assert not bad, f"{a}: {bad[:5]}"


def test_single_file_round_trip_is_bit_identical(tiny_ckpt, tmp_path):
    models = load_sdxl(tiny_ckpt)
    out = tmp_path / "again.safetensors"
    save_single_file(models, out)
    a, b = load_file(tiny_ckpt), load_file(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_round_trip_in_fp16_and_bf16_keeps_layout(tiny_ckpt, tmp_path):
    models = load_sdxl(tiny_ckpt)
    for prec, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out = tmp_path / f"m_{prec}.safetensors"
        save_single_file(models, out, save_precision=prec)
        saved = load_file(out)
        assert saved.keys() == load_file(tiny_ckpt).keys()
        assert {t.dtype for t in saved.values()} == {dtype}
        again = load_sdxl(out)
        assert next(again.unet.parameters()).dtype == dtype


def test_load_casts_to_requested_dtype(tiny_ckpt):
    models = load_sdxl(tiny_ckpt, dtype=torch.bfloat16)
    for m in (models.unet, models.vae, models.text_encoder1, models.text_encoder2):
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
        assert not any(p.is_meta for p in m.parameters())


def test_diffusers_folder_round_trip(tiny_ckpt, tiny_diffusers, tmp_path):
    from_file = load_sdxl(tiny_ckpt)
    from_folder = load_sdxl(tiny_diffusers)
    assert_same_weights(from_file, from_folder, [(a, a) for a, _ in COMPONENTS])
    out = tmp_path / "folder"
    save_diffusers_folder(from_folder, out)
    assert_same_weights(from_folder, load_sdxl(out), [(a, a) for a, _ in COMPONENTS])


def test_diffusers_reads_what_we_write(tiny_ckpt, tiny_diffusers, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    models = load_sdxl(tiny_ckpt)
    out = tmp_path / "ours.safetensors"
    save_single_file(models, out)
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_diffusers), torch_dtype=torch.float32)
    assert_same_weights(models, pipe)


def test_we_read_what_diffusers_writes(tiny_diffusers, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_diffusers))
    pipe.save_pretrained(tmp_path / "by_diffusers")
    assert_same_weights(load_sdxl(tmp_path / "by_diffusers"), pipe)


def test_full_size_sdxl_base_key_set_on_meta():
    """Key names and shapes of SDXL base 1.0: 2,514 tensors (a file may add TE1 position_ids)."""
    state = sai_state_dict(build_random("base", meta=True))
    counts = collections.Counter(next(c for c, p in ck.COMPONENT_PREFIXES.items() if k.startswith(p)) for k in state)
    assert counts == {"unet": 1680, "te2": 390, "vae": 248, "te1": 196}  # te2 includes logit_scale
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    expected = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key


def test_text_projection_is_transposed_into_linear(tiny_ckpt):
    """OpenCLIP applies x @ P; the Linear must hold P.T so pooled outputs match SGM/diffusers."""
    models = load_sdxl(tiny_ckpt)
    with safe_open(str(tiny_ckpt), "pt") as f:
        p = f.get_tensor("conditioner.embedders.1.model.text_projection")
    assert torch.equal(models.text_encoder2.text_projection.weight, p.t())
    assert not torch.equal(p, p.t())


def test_ckpt_tensor_only_loading(tiny_ckpt, tmp_path):
    state = load_file(tiny_ckpt)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "epoch": 1, "global_step": 2}, ckpt)
    assert_same_weights(load_sdxl(tiny_ckpt), load_sdxl(ckpt), [(a, a) for a, _ in COMPONENTS])


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_ckpt_with_pickled_code_is_refused(tmp_path):
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _Evil()}}, bad)
    with pytest.raises(UserError, match="pickled code is never executed"):
        load_sdxl(bad)


def test_te1_keys_without_text_model_and_extras_are_accepted(tiny_ckpt, tmp_path):
    state = load_file(tiny_ckpt)
    variant = {}
    for k, v in state.items():
        variant[k.replace(ck.TE1_PREFIX + "text_model.", ck.TE1_PREFIX)] = v
    variant[ck.TE1_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    variant["denoiser.sigmas"] = torch.ones(1000)
    path = tmp_path / "variant.safetensors"
    save_file(variant, path)
    models = load_sdxl(path)
    assert_same_weights(load_sdxl(tiny_ckpt), models, [(a, a) for a, _ in COMPONENTS])


@pytest.mark.parametrize("case, message", [
    ("missing", "file not found"),
    ("truncated", "not a readable safetensors file"),
    ("text", "not a readable safetensors file"),
    ("sd15", "Stable Diffusion 1.x"),
    ("sd2", "Stable Diffusion 2.x"),
    ("flux", "Flux"),
    ("missing_tensor", "missing 1 tensor"),
    ("extra_tensor", "unexpected tensor"),
])
def test_bad_checkpoints_give_one_clear_error(case, message, tiny_ckpt, tmp_path):
    path = tmp_path / "bad.safetensors"
    if case == "truncated":
        path.write_bytes(tiny_ckpt.read_bytes()[:5000])
    elif case == "text":
        path.write_text("not a model")
    elif case == "sd15":
        save_file({"cond_stage_model.transformer.text_model.x": torch.zeros(1),
                   "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, path)
    elif case == "sd2":
        save_file({"cond_stage_model.model.x": torch.zeros(1)}, path)
    elif case == "flux":
        save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, path)
    elif case in ("missing_tensor", "extra_tensor"):
        state = load_file(tiny_ckpt)
        if case == "missing_tensor":
            del state["model.diffusion_model.out.2.bias"]
        else:
            state["model.diffusion_model.input_blocks.4.1.extra.weight"] = torch.zeros(1)
        save_file(state, path)
    with pytest.raises(UserError, match=message):
        load_sdxl(path)


def test_vae_file_in_ldm_and_diffusers_keys(tiny_ckpt, tiny_diffusers, tmp_path):
    state = load_file(tiny_ckpt)
    ldm = {k[len(ck.VAE_PREFIX):]: v for k, v in state.items() if k.startswith(ck.VAE_PREFIX)}
    save_file(ldm, tmp_path / "vae.safetensors")
    reference = load_sdxl(tiny_ckpt).vae.state_dict()
    for source in (tmp_path / "vae.safetensors", tiny_diffusers / "vae"):
        loaded = load_vae(source).state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_te2_qkv_do_not_share_storage(tiny_ckpt):
    """Split from one fused in_proj, q/k/v must be separate tensors: an in-place update of one
    (a fused-backward optimizer step) must not touch the others' autograd versions."""
    te2 = load_sdxl(tiny_ckpt).text_encoder2
    attn = te2.text_model.encoder.layers[0].self_attn
    pointers = {attn.q_proj.weight.untyped_storage().data_ptr(), attn.k_proj.weight.untyped_storage().data_ptr(),
                attn.v_proj.weight.untyped_storage().data_ptr()}
    assert len(pointers) == 3
