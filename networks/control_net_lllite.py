"""ControlNet-LLLite for SDXL: a tiny conditioning side network on each hooked attention projection.

Every hooked ``nn.Linear`` (``attn1.to_q/to_k/to_v`` and ``attn2.to_q`` of each transformer block
of the down blocks and the mid block of the diffusers ``UNet2DConditionModel``) gets an
:class:`LLLiteModule`, which changes the projection's *input*::

    emb = conditioning1(cond_image)                       # once per image, (B, h*w, cond_emb_dim)
    x'  = x + up(mid(cat([emb, down(x)]))) * multiplier   # dropout after mid while training
    out = original_linear(x')

``conditioning1`` is Conv(3 -> cond_emb_dim/2, k4 s4) then, by *depth* (1 + the number of U-Net
downsamplings before the block: latent/1 -> 1, latent/2 -> 2, latent/4 -> 3): ReLU + Conv(k2 s2)
for depth 1, ReLU + Conv(k4 s4) for depth 2, ReLU + Conv(k4 s4) + ReLU + Conv(k2 s2) for depth 3,
so the embedding has exactly one position per token of that block. ``down`` = Linear(in -> mlp) +
ReLU, ``mid`` = Linear(cond_emb_dim + mlp -> mlp) + ReLU, ``up`` = Linear(mlp -> in), zero
initialised (weight *and* bias, so a new network leaves the U-Net output bit for bit unchanged;
sd-scripts zeroes only the weight).

Saved keys are sd-scripts' / ComfyUI's: ``lllite_unet_<SGM module path, '.' -> '_'>`` +
``.conditioning1.{0,2[,4]}.{weight,bias}``, ``.down.0.*``, ``.mid.0.*``, ``.up.0.*``; the file's
metadata is modelspec with architecture ``stable-diffusion-xl-v1-base/control-net-lllite``.
:func:`create_network_from_weights` rebuilds a network from any such file, deriving each module's
depth, widths and place from its key names and shapes. The conditioning image is in [-1, 1]
(``pixels / 127.5 - 1``), the output image's size (a multiple of 32 for SDXL).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.inference.control import block_depths, check_image_size, pixel_factor  # noqa: F401 (re-exported)
from networks.protocol import AdapterNetwork, HookedModule

logger = logging.getLogger(__name__)

PREFIX = "lllite_unet"
ARCHITECTURE = "stable-diffusion-xl-v1-base/control-net-lllite"
DEFAULT_DIM = 16  # sd-scripts' ControlNetLLLite defaults for cond_emb_dim and mlp_dim
_TARGET = re.compile(r"^(?:down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.attentions\.\d+"
                     r"\.transformer_blocks\.(\d+)\.(?:attn1\.to_[qkv]|attn2\.to_q)$")
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in ``x``'s dtype (fp32 master weights under a bf16/fp16 U-Net)."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


def conditioning_layers(depth: int, cond_emb_dim: int, **kw: Any) -> list[nn.Module]:
    """The ``conditioning1`` stack of a module at ``depth`` (1-3): total stride 8 * 2**(depth-1)."""
    half = cond_emb_dim // 2
    layers: list[nn.Module] = [nn.Conv2d(3, half, 4, 4, **kw)]
    if depth == 1:
        layers += [nn.ReLU(inplace=True), nn.Conv2d(half, cond_emb_dim, 2, 2, **kw)]
    elif depth == 2:
        layers += [nn.ReLU(inplace=True), nn.Conv2d(half, cond_emb_dim, 4, 4, **kw)]
    elif depth == 3:
        layers += [nn.ReLU(inplace=True), nn.Conv2d(half, half, 4, 4, **kw),
                   nn.ReLU(inplace=True), nn.Conv2d(half, cond_emb_dim, 2, 2, **kw)]
    else:
        raise UserError(f"ControlNet-LLLite supports blocks at depth 1-3 (latent/1 to latent/4), not {depth}")
    return layers


class LLLiteModule(HookedModule):
    """The LLLite side network of one ``nn.Linear``; it replaces that module's forward when applied."""

    def __init__(self, name: str, org_module: nn.Linear, depth: int, cond_emb_dim: int, mlp_dim: int,
                 dropout: float | None = None, multiplier: float = 1.0):
        super().__init__()
        if cond_emb_dim < 2 or cond_emb_dim % 2:
            raise UserError(f"cond_emb_dim must be an even number of at least 2 (got {cond_emb_dim})")
        if mlp_dim < 1:
            raise UserError(f"network_dim (the LLLite mlp width) must be at least 1 (got {mlp_dim})")
        self.lllite_name = name
        self.depth, self.cond_emb_dim, self.mlp_dim = int(depth), int(cond_emb_dim), int(mlp_dim)
        self.dropout = dropout
        self.multiplier = multiplier
        self.enabled = True  # switched by the generator for --control_net_ratios
        in_dim = org_module.in_features
        kw: dict[str, Any] = dict(device=org_module.weight.device, dtype=torch.float32)
        self.conditioning1 = nn.Sequential(*conditioning_layers(self.depth, self.cond_emb_dim, **kw))
        self.down = nn.Sequential(nn.Linear(in_dim, mlp_dim, **kw), nn.ReLU(inplace=True))
        self.mid = nn.Sequential(nn.Linear(mlp_dim + cond_emb_dim, mlp_dim, **kw), nn.ReLU(inplace=True))
        self.up = nn.Sequential(nn.Linear(mlp_dim, in_dim, **kw))
        nn.init.zeros_(self.up[0].weight)
        nn.init.zeros_(self.up[0].bias)
        self._org = (org_module,)  # a tuple: the original is not a submodule (not in the state dict)
        self.org_forward = None
        self._had_own_forward = False
        self.cond_emb: torch.Tensor | None = None

    @property
    def org_module(self) -> nn.Linear:
        return self._org[0]

    def embed(self, cond_image: torch.Tensor) -> torch.Tensor:
        """``conditioning1`` of a (B, 3, H, W) image in [-1, 1], as (B, H/s * W/s, cond_emb_dim)."""
        weight = self.conditioning1[0].weight
        cx = self.conditioning1(cond_image.to(weight.device, weight.dtype))
        n, c, h, w = cx.shape
        return cx.view(n, c, h * w).permute(0, 2, 1)

    def set_cond_image(self, cond_image: torch.Tensor | None) -> None:
        """Embed the conditioning image (None: switch the module off until the next image)."""
        self.cond_emb = None if cond_image is None else self.embed(cond_image)

    def _org_call(self, x: torch.Tensor) -> torch.Tensor:
        org = self.org_module
        if org.weight.dtype in _FP8:  # fp8-stored base weights: compute in the activation dtype
            return _linear(org, x)
        return self.org_forward(x) if self.org_forward is not None else org.forward(x)

    def _embedding_for(self, x: torch.Tensor) -> torch.Tensor:
        cx = self.cond_emb
        if cx.shape[1] != x.shape[1]:
            raise UserError(f"ControlNet-LLLite: the conditioning image gives {cx.shape[1]} positions at "
                            f"{self.lllite_name} but the U-Net has {x.shape[1]} there; the guide image must "
                            "have the output image's size")
        if x.shape[0] != cx.shape[0]:  # guidance: [negative, positive(, ...)] blocks of the same images
            if x.shape[0] % cx.shape[0]:
                raise ValueError(f"{x.shape[0]} rows do not fit {cx.shape[0]} conditioning images")
            cx = cx.repeat(x.shape[0] // cx.shape[0], 1, 1)
        return cx.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``org(x + up(mid(cat(emb, down(x)))) * multiplier)``; the plain ``org(x)`` when off."""
        if self.multiplier == 0 or self.cond_emb is None or not self.enabled:
            return self._org_call(x)
        cx = torch.cat([self._embedding_for(x), F.relu(_linear(self.down[0], x))], dim=2)
        cx = F.relu(_linear(self.mid[0], cx))
        if self.dropout and self.training:
            cx = F.dropout(cx, p=self.dropout)
        return self._org_call(x + _linear(self.up[0], cx) * self.multiplier)


# ---- which modules ----------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    while type(model).__name__ in ("OptimizedModule", "DistributedDataParallel"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def candidate_modules(unet: nn.Module) -> Iterator[tuple[str, str, nn.Linear, int, str]]:
    """``(lllite name, diffusers path, Linear, depth, where)`` of every projection LLLite may hook.

    ``where`` is "input", "middle" or "output"; names use the SGM (SAI) module paths.
    """
    from library.models.convert_keys import unet_diffusers_to_sai

    unet = _unwrap(unet)
    down, mid, up = block_depths(unet)
    layers = int(getattr(unet.config, "layers_per_block", 2) or 2)
    up_attention = [i for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None)]
    for path, module in unet.named_modules():
        m = _TARGET.match(path)
        if m is None or not isinstance(module, nn.Linear):
            continue
        if m[1] is not None:
            where, depth = "input", down[int(m[1])]
        elif m[2] is not None:
            where, depth = "output", up[int(m[2])]
        else:
            where, depth = "middle", mid
        sai = unet_diffusers_to_sai(path, layers, up_attention)
        yield f"{PREFIX}_{sai.replace('.', '_')}", path, module, depth, where


def _block_index(path: str) -> int:
    return int(re.search(r"transformer_blocks\.(\d+)\.", path)[1])


# ---- the network ------------------------------------------------------------------------------------
@dataclass
class LLLiteSettings:
    """What decides the modules of a network (``--network_args`` names follow sd-scripts' constants)."""

    cond_emb_dim: int = DEFAULT_DIM
    mlp_dim: int = DEFAULT_DIM
    dropout: float | None = None
    multiplier: float = 1.0
    skip_input_blocks: bool = False
    skip_output_blocks: bool = True
    transformer_max_block_index: int | None = None
    # from a file: exactly these modules, name -> (depth, cond_emb_dim, mlp_dim)
    modules: dict[str, tuple[int, int, int]] | None = field(default=None)


class ControlNetLLLite(AdapterNetwork):
    """All LLLite modules of one U-Net; ``state_dict()`` is exactly the saved file's content."""

    def __init__(self, unet: nn.Module, settings: LLLiteSettings):
        super().__init__()
        self.settings = settings
        self.multiplier = settings.multiplier
        self.unet_modules: list[LLLiteModule] = []
        for name, path, child, depth, where in candidate_modules(unet):
            spec = self._spec(name, path, depth, where)
            if spec is None:
                continue
            module = LLLiteModule(name, child, spec[0], spec[1], spec[2], settings.dropout, settings.multiplier)
            self.add_module(name, module)
            self.unet_modules.append(module)
        if settings.modules is not None:
            unknown = sorted(set(settings.modules) - {m.lllite_name for m in self.unet_modules})
            if unknown:
                raise UserError(f"{len(unknown)} ControlNet-LLLite modules do not exist in this U-Net "
                                f"(e.g. {unknown[0]}); is the file for SDXL?")
        logger.info("ControlNet-LLLite: %d modules", len(self.unet_modules))

    def _spec(self, name: str, path: str, depth: int, where: str) -> tuple[int, int, int] | None:
        s = self.settings
        if s.modules is not None:
            if name not in s.modules:
                return None
            if s.modules[name][0] != depth:
                raise UserError(f"ControlNet-LLLite module {name} has depth {s.modules[name][0]} in the file, but "
                                f"that block of this U-Net is at depth {depth}")
            return s.modules[name]
        if (where == "input" and s.skip_input_blocks) or (where == "output" and s.skip_output_blocks):
            return None
        if s.transformer_max_block_index is not None and _block_index(path) > s.transformer_max_block_index:
            return None
        return depth, s.cond_emb_dim, s.mlp_dim

    # -- conditioning -------------------------------------------------------------------------
    def forward(self, cond_image: torch.Tensor | None) -> None:
        """Embed ``cond_image`` (B, 3, H, W) in [-1, 1] in every module (with gradients when
        training); the U-Net forward that follows uses it. Called through the accelerate-prepared
        wrapper in training, so distributed gradient sync sees the network's forward."""
        self.set_cond_image(cond_image)

    def set_cond_image(self, cond_image: torch.Tensor | None) -> None:
        """Embed the conditioning image once for all following U-Net calls (None: network off)."""
        for module in self.unet_modules:
            module.set_cond_image(cond_image)

    def clear_cond_image(self) -> None:
        """Drop the embeddings (frees their memory; the U-Net runs as the base model)."""
        self.set_cond_image(None)

    def set_enabled(self, enabled: bool) -> None:
        """Switch every module on or off without forgetting its embedding (``--control_net_ratios``)."""
        for module in self.unet_modules:
            module.enabled = enabled

    # -- NetworkProtocol ----------------------------------------------------------------------
    def apply_to(self, text_encoders: Any = None, unet: nn.Module | None = None, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Hook every module into its U-Net Linear (LLLite has no text-encoder part)."""
        for module in self.unet_modules:
            module.apply_to()

    def restore(self) -> None:
        """Unhook every module; the U-Net is the base model again."""
        for module in self.unet_modules:
            module.restore()

    def set_multiplier(self, multiplier: float) -> None:
        """Strength of every module (0: the base U-Net)."""
        self.multiplier = multiplier
        for module in self.unet_modules:
            module.multiplier = multiplier

    def is_mergeable(self) -> bool:
        """LLLite depends on the conditioning image, so it cannot be baked into weights."""
        return False

    def prepare_optimizer_params(self, text_encoder_lr: Any, unet_lr: float | None, default_lr: float
                                 ) -> tuple[list[dict[str, Any]], list[str]]:
        """One group ``unet`` with ``unet_lr`` (default ``default_lr``); text-encoder LRs do not apply."""
        lr = default_lr if unet_lr is None else float(unet_lr)
        return [{"params": list(self.parameters()), "lr": lr}], ["unet"]

    # -- files ----------------------------------------------------------------------------------
    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, Any] | None = None) -> None:
        """Write the state dict (cast to ``dtype``) as safetensors with metadata, or torch.save for .pt/.ckpt,
        through a temporary file renamed into place."""
        from library.models.atomic import atomic_path

        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        if Path(file).suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            from library.models.metadata import tensor_payload_hashes

            meta = {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}
            meta.setdefault("modelspec.architecture", ARCHITECTURE)
            meta.update(tensor_payload_hashes(state, meta))
            with atomic_path(file) as tmp:
                save_file(state, str(tmp), metadata=meta)
        else:
            with atomic_path(file) as tmp:
                torch.save(state, tmp)

    def load_weights(self, file: str | os.PathLike) -> Any:
        """Load an LLLite file (ours or sd-scripts'); a key or shape this network lacks is an error."""
        return self.load_lllite_state_dict(read_lllite_file(file), source=str(file))

    def load_lllite_state_dict(self, weights: Mapping[str, torch.Tensor], source: str = "weights") -> Any:
        """``load_state_dict`` that names the first mismatching key or shape."""
        own = self.state_dict()
        unknown = [k for k in weights if k not in own]
        if unknown:
            raise UserError(f"{source}: {len(unknown)} keys do not match this ControlNet-LLLite network (e.g. "
                            f"{unknown[0]}); use the same --cond_emb_dim / --network_dim and SDXL")
        for key, tensor in weights.items():
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise UserError(f"{source}: {key} has shape {tuple(tensor.shape)} but the network has "
                                f"{tuple(own[key].shape)}; set --cond_emb_dim / --network_dim as the file was trained")
        missing = [k for k in own if k not in weights]
        if missing:
            raise UserError(f"{source}: {len(missing)} tensors of this network are not in the file (e.g. {missing[0]})")
        return self.load_state_dict(dict(weights), strict=True)


# ---- creation -----------------------------------------------------------------------------------------
def read_lllite_file(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an LLLite file (safetensors, or a torch pickle read with weights_only)."""
    path = Path(file)
    if not path.is_file():
        raise UserError(f"{path}: ControlNet-LLLite file not found")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: cannot read the ControlNet-LLLite file ({exc})") from None
    if not isinstance(state, dict) or not any(str(k).startswith(PREFIX) for k in state):
        raise UserError(f"{path}: no {PREFIX}_* tensors; not a ControlNet-LLLite file")
    return state


def module_specs(weights: Mapping[str, torch.Tensor], source: str = "weights") -> dict[str, tuple[int, int, int]]:
    """``name -> (depth, cond_emb_dim, mlp_dim)`` read from key names and shapes, as ComfyUI's node does:
    ``conditioning1.4`` present -> depth 3, else the kernel of ``conditioning1.2`` (4 -> 2, 2 -> 1)."""
    names = sorted({k.split(".", 1)[0] for k in weights})
    specs = {}
    for name in names:
        try:
            c0 = weights[f"{name}.conditioning1.0.weight"]
            down = weights[f"{name}.down.0.weight"]
            if f"{name}.conditioning1.4.weight" in weights:
                depth = 3
            else:
                depth = 2 if weights[f"{name}.conditioning1.2.weight"].shape[-1] == 4 else 1
        except KeyError as exc:
            raise UserError(f"{source}: module {name} lacks {exc.args[0]}; not a ControlNet-LLLite file") from None
        if down.ndim != 2:
            raise UserError(f"{source}: module {name} is a Conv2d LLLite module; only Linear modules are supported")
        specs[name] = (depth, int(c0.shape[0]) * 2, int(down.shape[0]))
    return specs


def _bool(name: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UserError(f"--network_args {name}={value}: expected true or false")


def parse_network_args(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``--network_args`` of LLLite: ``cond_emb_dim``, ``skip_input_blocks``, ``skip_output_blocks``,
    ``transformer_max_block_index`` (sd-scripts' module constants, lower-case)."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if value is None:
            continue
        if key in ("skip_input_blocks", "skip_output_blocks"):
            out[key] = _bool(key, value)
        elif key in ("transformer_max_block_index", "cond_emb_dim"):
            try:
                out[key] = int(value)
            except ValueError:
                raise UserError(f"--network_args {key}={value}: expected an integer") from None
        else:
            raise UserError(f"--network_args: {key} is not a ControlNet-LLLite option (cond_emb_dim, "
                            "skip_input_blocks, skip_output_blocks, transformer_max_block_index)")
    return out


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: nn.Module, neuron_dropout: float | None = None,
                   **kwargs: Any) -> ControlNetLLLite:
    """A new network: ``network_dim`` is the mlp width, ``cond_emb_dim`` comes in ``kwargs`` (16 each by default);
    ``network_alpha`` has no meaning for LLLite and is ignored."""
    parsed = parse_network_args(kwargs)
    if neuron_dropout is not None and not 0 <= float(neuron_dropout) < 1:
        raise UserError(f"--network_dropout must be in [0, 1) (got {neuron_dropout})")
    settings = LLLiteSettings(multiplier=float(multiplier), mlp_dim=int(network_dim or DEFAULT_DIM),
                              dropout=float(neuron_dropout) if neuron_dropout else None,
                              cond_emb_dim=int(parsed.pop("cond_emb_dim", None) or DEFAULT_DIM), **parsed)
    return ControlNetLLLite(unet, settings)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any,
                                unet: nn.Module, weights_sd: Mapping[str, torch.Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any
                                ) -> tuple[ControlNetLLLite, dict[str, torch.Tensor]]:
    """A network shaped like an LLLite file (ours, sd-scripts' or ComfyUI's): its modules, depths and widths.

    Returns ``(network, weights)``; load the weights after :meth:`ControlNetLLLite.apply_to` (or before).
    """
    source = str(file) if file is not None else "weights"
    weights = dict(weights_sd) if weights_sd is not None else read_lllite_file(file)
    dropout = kwargs.get("neuron_dropout")
    settings = LLLiteSettings(multiplier=float(multiplier), modules=module_specs(weights, source),
                              dropout=float(dropout) if dropout else None)
    return ControlNetLLLite(unet, settings), weights


def load_for_inference(file: str | os.PathLike, unet: nn.Module, multiplier: float = 1.0,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None
                       ) -> ControlNetLLLite:
    """Read, build, load and hook one LLLite file onto ``unet`` in eval mode."""
    network, weights = create_network_from_weights(multiplier, file, None, None, unet)
    network.load_lllite_state_dict(weights, source=str(file))
    network.apply_to(None, unet)
    network.to(device=device, dtype=dtype)
    return network.eval().requires_grad_(False)


def network_summary(network: ControlNetLLLite) -> Sequence[tuple[str, int, int, int]]:
    """``(name, depth, cond_emb_dim, mlp_dim)`` of every module (for docs and logs)."""
    return [(m.lllite_name, m.depth, m.cond_emb_dim, m.mlp_dim) for m in network.unet_modules]
