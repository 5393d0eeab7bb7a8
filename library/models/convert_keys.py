"""Key maps between the Stability-AI single-file SDXL layout and the diffusers/transformers models.

Pure functions on key names (and, where the layouts differ, on tensors). One map serves both
directions, so a load followed by a save gives back the file we read.

Naming used here:
- "SAI" keys are the single-file names *without* their component prefix, e.g. ``input_blocks.4.1.proj_in.weight``
  for the U-Net (file key ``model.diffusion_model.input_blocks.4.1.proj_in.weight``).
- "diffusers" keys are the state-dict keys of diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL`` and of
  transformers' ``CLIPTextModel`` (flattened, no ``text_model.`` level) / ``CLIPTextModelWithProjection``.

Component prefixes in a single file (SDXL base 1.0 layout).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."

COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "te1": TE1_PREFIX, "te2": TE2_PREFIX}

# ---------------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------------
_RESNET_D2S = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
]
_UNET_TOP_D2S = [
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("add_embedding.linear_1.", "label_emb.0.0."),
    ("add_embedding.linear_2.", "label_emb.0.2."),
    ("conv_in.", "input_blocks.0.0."),
    ("conv_norm_out.", "out.0."),
    ("conv_out.", "out.2."),
]


def _swap_prefix(rest: str, table: list[tuple[str, str]], reverse: bool) -> str:
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        if rest.startswith(src):
            return dst + rest[len(src):]
    return rest


def unet_diffusers_to_sai(key: str, layers_per_block: int = 2, up_attention: Iterable[int] | None = None) -> str:
    """Map a diffusers ``UNet2DConditionModel`` key to its SAI (SGM) name.

    Module paths work as well as parameter keys (``down_blocks.1.attentions.0.proj_in`` maps to
    ``input_blocks.4.1.proj_in``). ``up_attention`` lists the up-block levels that have attention
    (default: all), which decides whether an upsampler sits at slot 2 or 1.
    """
    n = layers_per_block + 1  # input levels: resnets + a downsampler; output levels: resnets
    probe = key + "."
    for a, b in _UNET_TOP_D2S:
        if probe.startswith(a):
            return (b + probe[len(a):])[:-1]
    m = re.match(r"(down|up|mid)_blocks?\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", probe)
    if not m:
        raise KeyError(f"no SAI name for U-Net key {key!r}")
    where, level, kind, j, rest = m[1], int(m[2] or 0), m[3], int(m[4]), m[5]
    if kind == "resnets":
        rest = _swap_prefix(rest, _RESNET_D2S, False)
    if where == "mid":
        slot = f"{2 * j}" if kind == "resnets" else "1"
        return f"middle_block.{slot}.{rest}"[:-1]
    if where == "down":
        if kind == "downsamplers":  # rest = "conv.<param>."
            return f"input_blocks.{n * (level + 1)}.0.op.{rest[len('conv.'):]}"[:-1]
        return f"input_blocks.{n * level + j + 1}.{0 if kind == 'resnets' else 1}.{rest}"[:-1]
    if kind == "upsamplers":
        has_attn = up_attention is None or level in set(up_attention)
        return f"output_blocks.{n * level + n - 1}.{2 if has_attn else 1}.{rest}"[:-1]
    return f"output_blocks.{n * level + j}.{0 if kind == 'resnets' else 1}.{rest}"[:-1]


def unet_sai_to_diffusers(key: str, layers_per_block: int = 2, up_attention: Iterable[int] = ()) -> str:
    """Map an SAI U-Net key (no ``model.diffusion_model.`` prefix) to the diffusers key.

    ``up_attention`` lists the output-block levels that have attention; only needed to tell an
    upsampler at slot 1 (a level without attention) from an attention at slot 1.
    """
    n_in = layers_per_block + 1
    n_out = layers_per_block + 1
    for a, b in _UNET_TOP_D2S:
        if key.startswith(b):
            return a + key[len(b):]
    m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key)
    if m:
        n, slot, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n - 1, n_in)
        if j == layers_per_block:
            if not rest.startswith("op."):
                raise KeyError(f"unexpected U-Net key {key!r}")
            return f"down_blocks.{i}.downsamplers.0.conv.{rest[3:]}"
        if slot == 0:
            return f"down_blocks.{i}.resnets.{j}.{_swap_prefix(rest, _RESNET_D2S, True)}"
        return f"down_blocks.{i}.attentions.{j}.{rest}"
    m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key)
    if m:
        n, slot, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n, n_out)
        if slot == 0:
            return f"up_blocks.{i}.resnets.{j}.{_swap_prefix(rest, _RESNET_D2S, True)}"
        if slot == 2 or (slot == 1 and i not in set(up_attention) and rest.startswith("conv.")):
            return f"up_blocks.{i}.upsamplers.0.{rest}"
        return f"up_blocks.{i}.attentions.{j}.{rest}"
    m = re.match(r"middle_block\.(\d+)\.(.*)", key)
    if m:
        slot, rest = int(m[1]), m[2]
        if slot == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{slot // 2}.{_swap_prefix(rest, _RESNET_D2S, True)}"
    raise KeyError(f"unexpected U-Net key {key!r}")


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------
_VAE_ATTN_D2S = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]
_VAE_TOP_D2S = [("conv_norm_out.", "norm_out.")]
_VAE_RES_D2S = [("conv_shortcut.", "nin_shortcut.")]


def vae_diffusers_to_sai(key: str, num_levels: int) -> str:
    """Map an ``AutoencoderKL`` key to the LDM (single-file) VAE name."""
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return key
    rest = _swap_prefix(rest, _VAE_TOP_D2S, False)
    m = re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest)
    if m:
        level = int(m[2]) if m[1] == "down" else num_levels - 1 - int(m[2])
        return f"{part}.{m[1]}.{level}.block.{m[3]}.{_swap_prefix(m[4], _VAE_RES_D2S, False)}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest)
    if m:
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest)
    if m:
        return f"{part}.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest)
    if m:
        return f"{part}.mid.block_{int(m[1]) + 1}.{_swap_prefix(m[2], _VAE_RES_D2S, False)}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", rest)
    if m:
        return f"{part}.mid.attn_1.{_swap_prefix(m[1], _VAE_ATTN_D2S, False)}"
    return f"{part}.{rest}"


def vae_sai_to_diffusers(key: str, num_levels: int) -> str:
    """Map an LDM VAE key (no ``first_stage_model.`` prefix) to the ``AutoencoderKL`` key."""
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return key
    rest = _swap_prefix(rest, _VAE_TOP_D2S, True)
    m = re.match(r"(down|up)\.(\d+)\.block\.(\d+)\.(.*)", rest)
    if m:
        level = int(m[2]) if m[1] == "down" else num_levels - 1 - int(m[2])
        return f"{part}.{m[1]}_blocks.{level}.resnets.{m[3]}.{_swap_prefix(m[4], _VAE_RES_D2S, True)}"
    m = re.match(r"down\.(\d+)\.downsample\.conv\.(.*)", rest)
    if m:
        return f"{part}.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.match(r"up\.(\d+)\.upsample\.conv\.(.*)", rest)
    if m:
        return f"{part}.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    m = re.match(r"mid\.block_(\d+)\.(.*)", rest)
    if m:
        return f"{part}.mid_block.resnets.{int(m[1]) - 1}.{_swap_prefix(m[2], _VAE_RES_D2S, True)}"
    m = re.match(r"mid\.attn_1\.(.*)", rest)
    if m:
        return f"{part}.mid_block.attentions.0.{_swap_prefix(m[1], _VAE_ATTN_D2S, True)}"
    return f"{part}.{rest}"


def is_vae_attention_projection(diffusers_key: str) -> bool:
    """True for the VAE mid-attention q/k/v/out weights: 1x1 convs in LDM files, Linear in diffusers."""
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key))


# ---------------------------------------------------------------------------------------------
# Text encoder 1 (CLIP ViT-L, already HF-named in the file)
# ---------------------------------------------------------------------------------------------
def te1_sai_to_flat(key: str) -> str:
    """Normalise a TE1 key (no component prefix) to the flattened HF name (no ``text_model.``)."""
    return key[len("text_model."):] if key.startswith("text_model.") else key


def te1_flat_to_sai(key: str) -> str:
    """The SDXL base 1.0 file name of a flattened TE1 key (with the ``text_model.`` level)."""
    return "text_model." + key


# ---------------------------------------------------------------------------------------------
# Text encoder 2 (OpenCLIP ViT-bigG in the file, CLIPTextModelWithProjection in memory)
# ---------------------------------------------------------------------------------------------
_TE2_LAYER_O2H = [
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
]
TE2_TOP_O2H = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
}


def te2_openclip_to_hf(key: str) -> list[str]:
    """HF key(s) for an OpenCLIP TE2 key; a fused ``in_proj`` maps to three (q, k, v)."""
    if key in TE2_TOP_O2H:
        return [TE2_TOP_O2H[key]]
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", key)
    if not m:
        raise KeyError(f"unexpected text encoder 2 key {key!r}")
    base = f"text_model.encoder.layers.{m[1]}."
    rest = m[2]
    if rest.startswith("attn.in_proj_"):
        kind = rest[len("attn.in_proj_"):]  # weight | bias
        return [f"{base}self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]
    return [base + _swap_prefix(rest, _TE2_LAYER_O2H, False)]


def te2_hf_to_openclip(key: str) -> tuple[str, int | None]:
    """OpenCLIP key for an HF TE2 key, and the q/k/v slot (0/1/2) for parts of a fused in_proj."""
    for o, h in TE2_TOP_O2H.items():
        if key == h:
            return o, None
    m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key)
    if not m:
        raise KeyError(f"unexpected text encoder 2 key {key!r}")
    base = f"transformer.resblocks.{m[1]}."
    rest = m[2]
    q = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
    if q:
        return f"{base}attn.in_proj_{q[2]}", "qkv".index(q[1])
    return base + _swap_prefix(rest, _TE2_LAYER_O2H, True), None


# ---------------------------------------------------------------------------------------------
# Whole-component conversions (tensors)
# ---------------------------------------------------------------------------------------------
TensorGetter = Callable[[str], torch.Tensor]


def convert_te2_to_hf(keys: Iterable[str], get: TensorGetter) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield HF (key, tensor) pairs from OpenCLIP TE2 tensors.

    ``text_projection`` is stored ``[in, out]`` and applied as ``x @ P``; ``nn.Linear`` computes
    ``x @ W.T``, so the weight is ``P.T``. The fused ``in_proj`` is split into q, k, v.
    """
    for key in keys:
        targets = te2_openclip_to_hf(key)
        t = get(key)
        if key == "text_projection":
            yield targets[0], t.t().contiguous()
        elif len(targets) == 3:
            for target, part in zip(targets, t.chunk(3, dim=0)):
                # clone: row chunks are contiguous views of one storage, and q/k/v must not share it
                # (an in-place update of one would invalidate autograd's saved copies of the others)
                yield target, part.clone()
        else:
            yield targets[0], t


def convert_te2_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP-named tensors from an HF TE2 state dict (q/k/v fused, projection transposed)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for key, t in state.items():
        name, slot = te2_hf_to_openclip(key)
        if slot is None:
            out[name] = t.t().contiguous() if name == "text_projection" else t
        else:
            fused.setdefault(name, [None, None, None])[slot] = t
    for name, parts in fused.items():
        if any(p is None for p in parts):
            raise KeyError(f"text encoder 2: incomplete q/k/v for {name}")
        out[name] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out


def convert_vae_tensor(diffusers_key: str, t: torch.Tensor, to_sai: bool) -> torch.Tensor:
    """Reshape a VAE mid-attention projection between Linear ``[C, C]`` and 1x1 conv ``[C, C, 1, 1]``."""
    if not is_vae_attention_projection(diffusers_key):
        return t
    if to_sai:
        return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t
