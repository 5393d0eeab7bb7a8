"""Kohya-format LoRA for SDXL (``--network_module networks.lora``).

Each targeted ``nn.Linear`` / ``nn.Conv2d`` of the U-Net and the two CLIP text encoders gets a
:class:`LoRAModule` whose forward replaces the original module's forward (the original weights are
never touched while training): ``out = org(x) + up(down(x)) * multiplier * alpha / rank``.

Saved keys are ``lora_unet_<SAI module path, '.' -> '_'>``, ``lora_te1_text_model_...`` and
``lora_te2_text_model_...``, each with ``.lora_down.weight``, ``.lora_up.weight`` and a 0-dim
``.alpha``; see docs/lora_format.md. ComfyUI, A1111/Forge and diffusers' ``load_lora_weights`` read them.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.models.fp8 import FP8_DTYPES, compute_dtype
from networks.lora_args import NUM_BLOCKS, dropout_probability, parse_network_args
from networks.lora_files import UNET_PREFIX, load_lora_file, normalize_lora_keys
from networks.protocol import AdapterNetwork, HookedModule

logger = logging.getLogger(__name__)

UNET_TARGET_MODULES = ("Transformer2DModel",)
UNET_CONV_TARGET_MODULES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGET_MODULES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


class LoRAModule(HookedModule):
    """A low-rank update of one Linear/Conv2d, applied by replacing that module's forward."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, lora_dim: int = 4,
                 alpha: float | None = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        self.is_conv = isinstance(org_module, nn.Conv2d)
        # Created beside the original weight: on the meta device for a meta model (no storage), fp32 otherwise.
        kw: dict[str, Any] = dict(bias=False, device=org_module.weight.device, dtype=torch.float32)
        if self.is_conv:
            self.lora_down = nn.Conv2d(org_module.in_channels, self.lora_dim, org_module.kernel_size,
                                       org_module.stride, org_module.padding, org_module.dilation, **kw)
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, 1, 1, **kw)
        else:
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, **kw)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(alpha) if alpha else float(self.lora_dim)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=org_module.weight.device))
        self.scale = alpha / self.lora_dim
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self._org = (org_module,)  # a tuple, so the original is not registered as a submodule
        self.org_forward = None
        self._had_own_forward = False

    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        """Keep ``scale`` in step with a loaded alpha (0 is stored as rank, as every reader expects)."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        alpha = state_dict.get(prefix + "alpha")
        if alpha is not None and alpha.numel() == 1 and not alpha.is_meta:
            value = float(alpha) or float(self.lora_dim)
            self.scale = value / self.lora_dim
            if not self.alpha.is_meta:
                self.alpha.fill_(value)

    def _org_call(self, x: torch.Tensor) -> torch.Tensor:
        org = self.org_module
        # an fp8-stored base: upcast to the dtype the layer computes in (also for a plain Linear/Conv2d holding
        # fp8 weights, which library.models.fp8.store_in_fp8 did not make upcasting)
        if org.weight.dtype in FP8_DTYPES:
            dtype = compute_dtype(x)
            w = org.weight.to(dtype)
            b = None if org.bias is None else org.bias.to(dtype)
            if self.is_conv:
                return F.conv2d(x, w, b, org.stride, org.padding, org.dilation, org.groups)
            return F.linear(x, w, b)
        return self.org_forward(x) if self.org_forward is not None else org.forward(x)

    def _lora_call(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = layer.weight.to(x.dtype)  # compute the branch in the activation dtype
        if self.is_conv:
            return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation)
        return F.linear(x, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``org(x) + up(down(x)) * multiplier * scale``, with the dropouts in training mode."""
        out = self._org_call(x)
        if self.multiplier == 0:
            return out
        if self.training and self.module_dropout and float(torch.rand(())) < self.module_dropout:
            return out
        lx = self._lora_call(self.lora_down, x)
        scale = self.scale
        if self.training:
            if self.dropout:
                lx = F.dropout(lx, p=self.dropout)
            if self.rank_dropout:
                if self.is_conv:  # lx: [B, r, H, W]
                    shape = (lx.shape[0], lx.shape[1], 1, 1)
                else:  # lx: [B, ..., r]
                    shape = (lx.shape[0],) + (1,) * (lx.ndim - 2) + (lx.shape[-1],)
                keep = torch.rand(shape, device=lx.device) > self.rank_dropout
                lx = lx * keep.to(lx.dtype)
                scale = scale / (1.0 - self.rank_dropout)
        # One fused add-with-scale instead of a multiply and an add (722 modules: launches count).
        return torch.add(out, self._lora_call(self.lora_up, lx), alpha=self.multiplier * scale)

    def delta_weight(self, up: torch.Tensor | None = None, down: torch.Tensor | None = None,
                     scale: float | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """``scale * up @ down`` in fp32, shaped like the original weight (``[out, in(, kh, kw)]``)."""
        up = (self.lora_up.weight if up is None else up).detach().to(device=device, dtype=torch.float32)
        down = (self.lora_down.weight if down is None else down).detach().to(device=device, dtype=torch.float32)
        scale = self.scale if scale is None else scale
        if down.ndim == 2:
            return (up @ down) * scale
        # up: [out, r, 1, 1], down: [r, in, kh, kw] -> [out, in, kh, kw]
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * scale

    @torch.no_grad()
    def merge(self, weights: Mapping[str, torch.Tensor] | None, multiplier: float,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Bake ``multiplier * delta`` into the original weight.

        ``weights`` holds this module's tensors by suffix (``lora_down.weight``, ``lora_up.weight``,
        ``alpha``) as read from a file; None merges the module's own weights.
        """
        org = self.org_module
        scale = None
        if weights:
            rank = (weights.get("lora_down.weight", self.lora_down.weight)).shape[0]
            alpha = float(weights["alpha"]) if "alpha" in weights else 0.0
            scale = (alpha or rank) / rank
        else:
            weights = {}
        delta = self.delta_weight(weights.get("lora_up.weight"), weights.get("lora_down.weight"), scale,
                                  device=device or org.weight.device)
        merged = org.weight.to(delta.device, torch.float32) + multiplier * delta
        org.weight.data = merged.to(device=org.weight.device, dtype=dtype or org.weight.dtype)


@dataclass
class LoRASettings:
    """Everything that decides which modules get a LoRA, their ranks/alphas and their dropouts."""

    multiplier: float = 1.0
    dim: int = 4
    alpha: float = 1.0
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    conv_dim: int | None = None
    conv_alpha: float | None = None
    block_dims: list[int] | None = None
    block_alphas: list[float] | None = None
    conv_block_dims: list[int] | None = None
    conv_block_alphas: list[float] | None = None
    block_lr_weight: list[float] | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    modules_dim: dict[str, int] | None = None  # from a file: exactly these modules, with these ranks
    modules_alpha: dict[str, float] = field(default_factory=dict)

    @property
    def wants_conv(self) -> bool:
        return bool(self.modules_dim is not None or self.conv_dim or self.conv_block_dims)


def _unwrap(model: nn.Module) -> nn.Module:
    while type(model).__name__ in ("OptimizedModule", "DistributedDataParallel"):  # torch.compile / DDP
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def _children(root: nn.Module, classes: Sequence[str], types: tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of every ``types`` module inside a module whose class name is in ``classes``."""
    seen: set[str] = set()
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            path = f"{name}.{child_name}" if name else child_name
            if child_name and isinstance(child, types) and path not in seen:
                seen.add(path)
                yield path, child


def unet_targets(unet: nn.Module, include_conv: bool) -> Iterator[tuple[str, str, nn.Module]]:
    """``(kohya name, diffusers module path, module)`` of the U-Net's LoRA targets (SAI-named)."""
    from library.models.convert_keys import unet_diffusers_to_sai

    unet = _unwrap(unet)
    config = getattr(unet, "config", None)
    layers = int(getattr(config, "layers_per_block", 2) or 2)
    up_attention = [i for i, b in enumerate(getattr(unet, "up_blocks", [])) if getattr(b, "attentions", None)]
    classes = UNET_TARGET_MODULES + (UNET_CONV_TARGET_MODULES if include_conv else ())
    for path, child in _children(unet, classes, (nn.Linear, nn.Conv2d)):
        sai = unet_diffusers_to_sai(path, layers, up_attention)
        yield f"{UNET_PREFIX}_{sai.replace('.', '_')}", path, child


def te_targets(text_encoder: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """``(kohya name, module)`` of a CLIP text encoder's targets; names always carry ``text_model_``."""
    for path, child in _children(_unwrap(text_encoder), TE_TARGET_MODULES, (nn.Linear,)):
        if not path.startswith("text_model."):  # transformers >= 5.6 flattened CLIPTextModel
            path = "text_model." + path
        yield f"{prefix}_{path.replace('.', '_')}", child


def _te_list(text_encoder: Any) -> list[tuple[str, nn.Module]]:
    """``(prefix, encoder)``: ``lora_te1``/``lora_te2`` for SDXL's pair, ``lora_te`` for a single encoder."""
    tes = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    if len(tes) == 1:
        return [("lora_te", tes[0])] if tes[0] is not None else []
    return [(f"lora_te{i + 1}", te) for i, te in enumerate(tes) if te is not None]


def unet_block_index(lora_name: str) -> int:
    """SDXL block index 0-22 of a U-Net LoRA name (-1 when the name is not in a numbered block)."""
    m = re.match(rf"{UNET_PREFIX}_(input_blocks|middle_block|output_blocks)_(\d+)_", lora_name)
    if not m:
        return -1
    return int(m[2]) + {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m[1]]


def diffusers_unet_aliases(unet: nn.Module) -> dict[str, str]:
    """Map diffusers-path LoRA names (``lora_unet_down_blocks_1_...``) to our SAI-path names."""
    return {f"{UNET_PREFIX}_{path.replace('.', '_')}": name for name, path, _ in unet_targets(unet, True)}


class LoRANetwork(AdapterNetwork):
    """All LoRA modules of one SDXL model; ``state_dict()`` is exactly the file's content."""

    def __init__(self, text_encoders: Any, unet: nn.Module | None, settings: LoRASettings):
        super().__init__()
        self.settings = settings
        self.multiplier = settings.multiplier
        self.block_lr_weight = settings.block_lr_weight
        self.loraplus_unet_lr_ratio = settings.loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = settings.loraplus_text_encoder_lr_ratio
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        self.te_prefixes: dict[str, list[LoRAModule]] = {}
        for prefix, te in _te_list(text_encoders):
            made = [self._add(name, child, self._spec(name, child, False)) for name, child in te_targets(te, prefix)]
            self.te_prefixes[prefix] = [m for m in made if m is not None]
            self.text_encoder_loras += self.te_prefixes[prefix]
            logger.info("LoRA for %s: %d modules", prefix, len(self.te_prefixes[prefix]))
        self._unet_aliases: dict[str, str] = {}
        if unet is not None:
            for name, path, child in unet_targets(unet, settings.wants_conv):
                made = self._add(name, child, self._spec(name, child, True))
                if made is not None:
                    self.unet_loras.append(made)
            self._unet_aliases = diffusers_unet_aliases(unet)
            logger.info("LoRA for U-Net: %d modules", len(self.unet_loras))

    # -- construction -----------------------------------------------------------------------
    def _add(self, name: str, child: nn.Module, spec: tuple[int, float] | None) -> LoRAModule | None:
        if spec is None or spec[0] <= 0:
            return None
        if name in self._modules:
            raise ValueError(f"duplicate LoRA module name {name}")
        s = self.settings
        module = LoRAModule(name, child, s.multiplier, spec[0], spec[1], s.dropout, s.rank_dropout, s.module_dropout)
        self.add_module(name, module)
        return module

    def _spec(self, name: str, child: nn.Module, in_unet: bool) -> tuple[int, float] | None:
        """(rank, alpha) of the module called ``name``, or None when it gets no LoRA."""
        s = self.settings
        if s.modules_dim is not None:  # shaped like a file: exactly its modules
            return (s.modules_dim[name], s.modules_alpha.get(name, float(s.modules_dim[name]))) \
                if name in s.modules_dim else None
        idx = unet_block_index(name) if in_unet else -1
        if idx >= 0 and s.block_lr_weight is not None and s.block_lr_weight[idx] == 0:
            return None  # a block with LR weight 0 gets no LoRA
        if isinstance(child, nn.Conv2d) and tuple(child.kernel_size) != (1, 1):
            if s.conv_block_dims is not None and idx >= 0:
                return s.conv_block_dims[idx], (s.conv_block_alphas or [1.0] * NUM_BLOCKS)[idx]
            return (s.conv_dim, s.conv_alpha if s.conv_alpha is not None else 1.0) if s.conv_dim else None
        if s.block_dims is not None and idx >= 0:
            return s.block_dims[idx], (s.block_alphas or [s.alpha] * NUM_BLOCKS)[idx]
        return s.dim, s.alpha

    def _all(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)

    # -- the trainer's interface ------------------------------------------------------------
    def apply_to(self, text_encoders: Any = None, unet: nn.Module | None = None, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Hook the LoRA modules in; the parts not applied are removed entirely (no keys, no params)."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras, self.te_prefixes = [], {}
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self._all():
            lora.apply_to()
        logger.info("applied LoRA: %d text encoder and %d U-Net modules",
                    len(self.text_encoder_loras), len(self.unet_loras))

    def set_multiplier(self, multiplier: float) -> None:
        """Set the LoRA strength of every module."""
        self.multiplier = multiplier
        for lora in self._all():
            lora.multiplier = multiplier

    def is_mergeable(self) -> bool:
        """LoRA can always be baked into the base weights."""
        return True

    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float) -> tuple[list[dict[str, Any]], list[str]]:
        """Parameter groups and their descriptions (``textencoder``/``textencoder1``/``textencoder2``,
        ``unet`` or ``unet_block{i}``, each with a `` plus`` twin holding ``lora_up`` under LoRA+).

        ``text_encoder_lr`` may be one value (both encoders) or ``[te1_lr, te2_lr]``; None means
        ``default_lr``; an LR of 0 leaves that part out of the optimizer.
        """
        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []
        te_ratio = self.loraplus_text_encoder_lr_ratio
        if text_encoder_lr is None or isinstance(text_encoder_lr, (int, float)):
            te_lrs = [default_lr if text_encoder_lr is None else float(text_encoder_lr)]
        else:
            te_lrs = [float(v) for v in text_encoder_lr] or [default_lr]
        if len(te_lrs) == 1 or len(self.te_prefixes) < 2:
            _add_groups(groups, descriptions, self.text_encoder_loras, te_lrs[0], "textencoder", te_ratio)
        else:
            for i, loras in enumerate(self.te_prefixes.values()):
                lr = te_lrs[i] if i < len(te_lrs) else te_lrs[-1]
                _add_groups(groups, descriptions, loras, lr, f"textencoder{i + 1}", te_ratio)
        unet_lr = default_lr if unet_lr is None else float(unet_lr)
        if self.block_lr_weight is None:
            _add_groups(groups, descriptions, self.unet_loras, unet_lr, "unet", self.loraplus_unet_lr_ratio)
        else:
            by_block: dict[int, list[LoRAModule]] = {}
            for lora in self.unet_loras:
                by_block.setdefault(unet_block_index(lora.lora_name), []).append(lora)
            for idx in sorted(by_block):
                weight = self.block_lr_weight[idx] if idx >= 0 else 1.0
                _add_groups(groups, descriptions, by_block[idx], unet_lr * weight, f"unet_block{idx}",
                            self.loraplus_unet_lr_ratio)
        return groups, descriptions

    prepare_optimizer_params_with_multiple_te_lrs = prepare_optimizer_params

    # -- files ------------------------------------------------------------------------------
    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
        """Write the state dict (cast to ``dtype``) as safetensors with metadata, or torch.save for .pt/.ckpt."""
        from library.models.atomic import atomic_path

        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        if Path(file).suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            from library.models.metadata import tensor_payload_hashes

            meta = {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}
            meta.update(tensor_payload_hashes(state, meta))
            with atomic_path(file, size_hint=sum(t.numel() * t.element_size() for t in state.values())) as tmp:
                save_file(state, str(tmp), metadata=meta)
        else:
            with atomic_path(file) as tmp:
                torch.save(state, tmp)

    def load_weights(self, file: str | os.PathLike) -> Any:
        """Load a LoRA file into this network; keys this network lacks are an error naming them."""
        return self.load_lora_state_dict(load_lora_file(file), source=str(file))

    def load_lora_state_dict(self, weights_sd: Mapping[str, torch.Tensor], source: str = "weights") -> Any:
        """``load_state_dict`` with kohya key normalisation and clear errors; returns the missing/unexpected info."""
        if not weights_sd:
            raise UserError(f"{source}: the file holds no tensors; give a LoRA file with weights (or leave out "
                            "--network_weights to start from scratch)")
        weights_sd = normalize_lora_keys(weights_sd, self._unet_aliases)
        own = self.state_dict()
        unknown = [k for k in weights_sd if k not in own]
        if unknown:
            raise UserError(f"{source}: {len(unknown)} keys do not match this LoRA network (e.g. "
                            f"{', '.join(unknown[:3])}); is it an SDXL networks.lora file for this model?")
        for key, tensor in weights_sd.items():
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise UserError(f"{source}: {key} has shape {tuple(tensor.shape)} but the network has "
                                f"{tuple(own[key].shape)}; set the same network_dim/conv_dim or use --dim_from_weights")
        info = self.load_state_dict(weights_sd, strict=False)
        if info.missing_keys:
            logger.warning("%s: %d LoRA tensors not in the file keep their initial values (e.g. %s)",
                           source, len(info.missing_keys), info.missing_keys[0])
        return info

    # -- merging ----------------------------------------------------------------------------
    def merge_to(self, text_encoders: Any = None, unet: nn.Module | None = None,
                 weights_sd: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """Bake ``W += multiplier * alpha/rank * up @ down`` into the base weights.

        Uses ``weights_sd`` (kohya keys) when given, else this network's own weights. Merged modules
        are unhooked, so the base model alone now gives the LoRA'd output.
        """
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        if weights_sd is not None:
            known = {lora.lora_name for lora in self._all()}
            for key, tensor in normalize_lora_keys(weights_sd, self._unet_aliases).items():
                name, _, suffix = key.partition(".")
                if name not in known:
                    raise UserError(f"merge: {key} does not belong to this LoRA network")
                by_module.setdefault(name, {})[suffix] = tensor
        for lora in self._all():
            if weights_sd is not None and lora.lora_name not in by_module:
                continue
            lora.restore()
            lora.merge(by_module.get(lora.lora_name), self.multiplier, device, dtype)
        logger.info("merged %d LoRA modules into the base weights", len(by_module) if weights_sd else len(self._all()))

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device: torch.device | str | None = None
                                      ) -> tuple[int, float, float]:
        """Scale down modules whose ``||scale * up @ down||`` exceeds ``max_norm_value`` (``--scale_weight_norms``).

        Returns (number of modules scaled, mean norm after scaling, max norm after scaling).
        """
        norms: list[float] = []
        scaled = 0
        for lora in self._all():
            norm = float(lora.delta_weight(device=device).norm())
            if norm > max_norm_value:
                ratio = max_norm_value / norm
                lora.lora_up.weight.mul_(ratio ** 0.5)
                lora.lora_down.weight.mul_(ratio ** 0.5)
                scaled += 1
                norm = max_norm_value
            norms.append(norm)
        return scaled, (sum(norms) / len(norms)) if norms else 0.0, max(norms, default=0.0)


def _add_groups(groups: list[dict[str, Any]], descriptions: list[str], loras: Sequence[LoRAModule], lr: float,
                desc: str, plus_ratio: float | None) -> None:
    """Append one group (or base + ``plus`` groups under LoRA+) for ``loras``; LR 0 or no params: nothing."""
    if not loras or lr == 0:
        return
    base, plus = [], []
    for lora in loras:
        for name, param in lora.named_parameters():
            (plus if plus_ratio and name.startswith("lora_up") else base).append(param)
    if base:
        groups.append({"params": base, "lr": lr})
        descriptions.append(desc)
    if plus:
        groups.append({"params": plus, "lr": lr * plus_ratio})
        descriptions.append(desc + " plus")


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> LoRANetwork:
    """A new LoRA network (``text_encoder``: ``[te1, te2]``; ``kwargs``: the ``--network_args`` strings)."""
    parsed = parse_network_args(kwargs)
    settings = LoRASettings(multiplier=float(multiplier), dim=int(network_dim) if network_dim else 4,
                            alpha=float(network_alpha) if network_alpha is not None else 1.0,
                            dropout=dropout_probability("network_dropout", neuron_dropout), **parsed)
    return LoRANetwork(text_encoder, unet, settings)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any,
                                unet: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any) -> tuple[LoRANetwork, dict]:
    """A network shaped like a LoRA file: its modules, ranks, alphas and conv parts (``--dim_from_weights``).

    Returns ``(network, weights_sd)`` with the weights normalised to kohya keys (diffusers-named
    U-Net keys are converted). Dims in ``kwargs`` are ignored; dropouts and LoRA+ ratios apply.
    """
    if weights_sd is None:
        if file is None:
            raise UserError("create_network_from_weights: neither a file nor weights were given")
        weights_sd = load_lora_file(file)
    weights_sd = normalize_lora_keys(weights_sd, diffusers_unet_aliases(unet) if unet is not None else {})
    dims: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, tensor in weights_sd.items():
        name, _, suffix = key.partition(".")
        if suffix == "lora_down.weight":
            dims[name] = int(tensor.shape[0])
        elif suffix == "alpha":
            alphas[name] = float(tensor)
    if not dims:
        raise UserError(f"{file or 'weights'}: no lora_down weights found; not a LoRA file")
    parsed = parse_network_args(kwargs)
    keep = ("block_lr_weight", "rank_dropout", "module_dropout", "loraplus_unet_lr_ratio",
            "loraplus_text_encoder_lr_ratio")
    settings = LoRASettings(multiplier=float(multiplier), modules_dim=dims,
                            modules_alpha={k: v for k, v in alphas.items() if v}, **{k: parsed[k] for k in keep})
    return LoRANetwork(text_encoder, unet, settings), weights_sd
