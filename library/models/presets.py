"""Random-weight SDXL models: full size (SDXL base 1.0 shapes) for benchmarks, and a tiny one for tests.

Both are built from the same config shapes that :mod:`library.models.sdxl` infers from files, so a
tiny model written to disk and read back goes through exactly the code path of the real model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPTextConfig

from library.models import sdxl


def _clip(hidden: int, inter: int, layers: int, projection: int | None) -> CLIPTextConfig:
    kwargs: dict[str, Any] = dict(
        vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // sdxl.HEAD_DIM), max_position_embeddings=77,
        hidden_act="gelu" if projection else "quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=sdxl.BOS_TOKEN_ID, eos_token_id=sdxl.EOS_TOKEN_ID, pad_token_id=0 if projection else 1)
    if projection:
        kwargs["projection_dim"] = projection
    return CLIPTextConfig(**kwargs)


def _unet(channels: tuple[int, ...], depths: tuple[int, ...], context: int, pooled: int) -> dict[str, Any]:
    return dict(
        sample_size=128, in_channels=4, out_channels=4,
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)),
        block_out_channels=channels, layers_per_block=2,
        transformer_layers_per_block=[max(d, 1) for d in depths],
        attention_head_dim=[max(1, c // sdxl.HEAD_DIM) for c in channels],
        cross_attention_dim=context, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=sdxl.SIZE_EMBED_DIM,
        projection_class_embeddings_input_dim=pooled + 6 * sdxl.SIZE_EMBED_DIM,
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)


def _vae(channels: tuple[int, ...], layers: int) -> dict[str, Any]:
    n = len(channels)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=channels, layers_per_block=layers,
                latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=sdxl.VAE_SCALE_FACTOR,
                force_upcast=True)


PRESETS: dict[str, dict[str, Any]] = {
    # SDXL base 1.0: U-Net 320/640/1280 with transformer depths 0/2/10, CLIP-L and OpenCLIP bigG.
    "base": dict(unet=_unet((320, 640, 1280), (0, 2, 10), 2048, 1280), vae=_vae((128, 256, 512, 512), 2),
                 te1=_clip(768, 3072, 12, None), te2=_clip(1280, 5120, 32, 1280)),
    # Tiny: U-Net 64/128/256 with depths 0/1/2, two small CLIP encoders with the real vocabulary.
    "tiny": dict(unet=_unet((64, 128, 256), (0, 1, 2), 64 + 128, 128), vae=_vae((32, 32, 64, 64), 1),
                 te1=_clip(64, 128, 2, None), te2=_clip(128, 256, 2, 128)),
}


def build_random(preset: str = "tiny", seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, meta: bool = False) -> sdxl.SDXLModels:
    """Random-weight SDXL of a preset's shapes (``meta=True``: no storage, for key/shape checks)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = PRESETS[preset]
    if meta:
        return sdxl.SDXLModels(*(sdxl.build_on_meta(k, cfg[k]) for k in ("unet", "vae", "te1", "te2")))
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg["unet"])
        vae = AutoencoderKL(**cfg["vae"])
        te1 = CLIPTextModel(cfg["te1"])
        te2 = CLIPTextModelWithProjection(cfg["te2"])
    models = sdxl.SDXLModels(unet, vae, te1, te2, extras={"conditioner.embedders.1.model.logit_scale":
                                                           torch.tensor(4.6052, dtype=torch.float32)})
    for m in (unet, vae, te1, te2):
        m.to(dtype=dtype).eval().requires_grad_(False)
    return models
