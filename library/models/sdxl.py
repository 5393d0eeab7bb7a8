"""Build the SDXL components from configs inferred from tensor shapes.

One code path serves the real SDXL base model and the tiny test model: every width, depth and
count below is read off a (diffusers/transformers-keyed) state dict's shapes. Fixed SDXL facts
that no shape carries: attention heads are width / 64, GroupNorm has 32 groups, TE1 uses
quick-GELU and TE2 GELU, the time embedding uses cos-first sinusoids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.errors import UserError

HEAD_DIM = 64
VAE_SCALE_FACTOR = 0.13025
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
SIZE_EMBED_DIM = 256  # per scalar of the six size/crop numbers

Shapes = Mapping[str, tuple[int, ...]]


def _heads(width: int) -> int:
    return max(1, width // HEAD_DIM)


def _count(shapes: Shapes, pattern: str) -> int:
    """Number of distinct integers captured by ``pattern``'s first group over the keys."""
    rx = re.compile(pattern)
    return len({m[1] for k in shapes if (m := rx.match(k))})


def _need(shapes: Shapes, key: str, component: str) -> tuple[int, ...]:
    if key not in shapes:
        raise UserError(f"{component}: the checkpoint has no tensor {key!r}; is this an SDXL model?")
    return tuple(shapes[key])


def infer_unet_config(shapes: Shapes, pooled_dim: int | None = None) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config from the shapes of its (diffusers-named) state dict."""
    levels = _count(shapes, r"down_blocks\.(\d+)\.")
    if levels == 0 or "add_embedding.linear_1.weight" not in shapes:
        raise UserError("U-Net: no SDXL down blocks / add_embedding found; is this an SDXL model?")
    channels = [_need(shapes, f"down_blocks.{i}.resnets.0.conv2.weight", "U-Net")[0] for i in range(levels)]
    layers_per_block = _count(shapes, r"down_blocks\.0\.resnets\.(\d+)\.")
    depths = [_count(shapes, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") for i in range(levels)]
    up_depths = [_count(shapes, rf"up_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") for i in range(levels)]
    mid_depth = _count(shapes, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")
    ctx_key = next((k for k in shapes if k.endswith("attn2.to_k.weight")), None)
    if ctx_key is None:
        raise UserError("U-Net: no cross-attention layers found; is this an SDXL model?")
    adm_in = _need(shapes, "add_embedding.linear_1.weight", "U-Net")[1]
    size_dim = (adm_in - pooled_dim) // 6 if pooled_dim else SIZE_EMBED_DIM
    proj_in = next(k for k in shapes if k.endswith("proj_in.weight"))
    return dict(
        sample_size=128,
        in_channels=_need(shapes, "conv_in.weight", "U-Net")[1],
        out_channels=_need(shapes, "conv_out.weight", "U-Net")[0],
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depths),
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        transformer_layers_per_block=[max(d, 1) for d in depths[:-1]] + [max(depths[-1], mid_depth, 1)],
        reverse_transformer_layers_per_block=[max(d, 1) for d in up_depths] if up_depths != depths[::-1] else None,
        attention_head_dim=[_heads(c) for c in channels],
        cross_attention_dim=shapes[ctx_key][1],
        use_linear_projection=len(shapes[proj_in]) == 2,
        addition_embed_type="text_time",
        addition_time_embed_dim=size_dim,
        projection_class_embeddings_input_dim=adm_in,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def infer_vae_config(shapes: Shapes) -> dict[str, Any]:
    """An ``AutoencoderKL`` config from the shapes of its (diffusers-named) state dict."""
    levels = _count(shapes, r"encoder\.down_blocks\.(\d+)\.")
    if levels == 0:
        raise UserError("VAE: no encoder blocks found; is this an SDXL checkpoint with a VAE?")
    channels = [_need(shapes, f"encoder.down_blocks.{i}.resnets.0.conv2.weight", "VAE")[0] for i in range(levels)]
    return dict(
        in_channels=_need(shapes, "encoder.conv_in.weight", "VAE")[1],
        out_channels=_need(shapes, "decoder.conv_out.weight", "VAE")[0],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(channels),
        layers_per_block=_count(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        latent_channels=_need(shapes, "quant_conv.weight", "VAE")[0] // 2,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=VAE_SCALE_FACTOR,
        force_upcast=True,
    )


def infer_clip_config(shapes: Shapes, with_projection: bool) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` from a TE state dict's shapes (TE1: quick-GELU, TE2: GELU + projection)."""
    p = "text_model." if with_projection else ""
    vocab, hidden = _need(shapes, f"{p}embeddings.token_embedding.weight", "text encoder")
    max_pos = _need(shapes, f"{p}embeddings.position_embedding.weight", "text encoder")[0]
    layers = _count(shapes, rf"{re.escape(p)}encoder\.layers\.(\d+)\.")
    inter = _need(shapes, f"{p}encoder.layers.0.mlp.fc1.weight", "text encoder")[0]
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=_heads(hidden),
        max_position_embeddings=max_pos,
        hidden_act="gelu" if with_projection else "quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=0 if with_projection else 1,
    )
    if with_projection:
        kwargs["projection_dim"] = _need(shapes, "text_projection.weight", "text encoder 2")[0]
    return CLIPTextConfig(**kwargs)


def te1_uses_text_model_prefix() -> bool:
    """Whether this transformers' ``CLIPTextModel`` keeps a ``text_model.`` level (transformers < 5.6)."""
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=1, vocab_size=8, max_position_embeddings=4))
    return next(iter(model.state_dict())).startswith("text_model.")


def build_on_meta(kind: str, config: Any) -> torch.nn.Module:
    """Instantiate a component whose parameters have no storage (buffers are real).

    Weights are then assigned with ``load_state_dict(assign=True)``, so nothing is allocated twice.
    """
    with init_empty_weights(include_buffers=False):
        if kind == "unet":
            return UNet2DConditionModel(**config)
        if kind == "vae":
            return AutoencoderKL(**config)
        if kind == "te1":
            return CLIPTextModel(config)
        if kind == "te2":
            return CLIPTextModelWithProjection(config)
    raise ValueError(kind)


@dataclass
class SDXLModels:
    """The four SDXL components plus what the file carried that no module holds."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder1: CLIPTextModel
    text_encoder2: CLIPTextModelWithProjection
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # file keys kept verbatim (logit_scale, ...)
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def text_encoders(self) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
        return self.text_encoder1, self.text_encoder2
