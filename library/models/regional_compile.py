"""Regional ``torch.compile`` of the SDXL U-Net (``--torch_compile``).

Compiling the whole U-Net traces ~1,700 modules into one graph and takes many minutes (with LoRA hooks, no
first step within 465 s on an H200). The U-Net is mostly the same block repeated:
70 ``BasicTransformerBlock``s of only two widths (640 and 1280). Compiling each repeated block on its
own (diffusers' ``_repeated_blocks``, "regional compilation") traces one block per distinct shape;
every other block of that shape reuses the compiled code, because dynamo treats the parameters
(and the LoRA modules hooked into the block's Linear layers) as graph inputs instead of constants.
The result is most of the speed of a whole-model compile at a small fraction of the compile time.

Compilation is lazy: nothing is traced until the first forward, so LoRA hooks, gradient
checkpointing and fp8 weights set up after :func:`compile_unet_regions` are traced as they are.
Compiled kernels are cached by inductor on disk (``TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_<user>``), so a second run with the same shapes skips most of the work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

logger = logging.getLogger(__name__)

DEFAULT_REGIONS = ("BasicTransformerBlock",)
# Each distinct (block shape, batch, resolution, grad mode) is one compile with static shapes. dynamo's
# default limit of 8 per function would silently fall back to eager after a few buckets.
MIN_RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class CompileSettings:
    """What ``torch.compile`` is given for every region (sd-scripts' ``--dynamo_*`` options)."""

    backend: str = "inductor"
    mode: Optional[str] = None  # "default", "reduce-overhead", "max-autotune", ...
    fullgraph: bool = False  # --dynamo_fullgraph: fail on a graph break instead of splitting the region
    dynamic: bool = False  # --dynamo_dynamic: symbolic shapes (one compile serves every bucket)

    def compile_kwargs(self) -> dict:
        """Keyword arguments for ``torch.compile``."""
        mode = None if self.mode in (None, "", "default") else self.mode
        return {"backend": self.backend, "mode": mode, "fullgraph": self.fullgraph, "dynamic": self.dynamic}


def region_classes(model: torch.nn.Module) -> tuple[str, ...]:
    """Class names of the blocks compiled one by one: the model's ``_repeated_blocks`` or the default."""
    declared = getattr(model, "_repeated_blocks", None)
    return tuple(declared) if declared else DEFAULT_REGIONS


def compile_unet_regions(unet: torch.nn.Module, settings: CompileSettings,
                         regions: tuple[str, ...] | None = None) -> int:
    """Compile every repeated block of ``unet`` in place; returns how many blocks were wrapped.

    The module tree, its parameter names and its ``state_dict`` keys stay as they were (no
    ``_orig_mod.`` prefix), so saving, LoRA hooks and EMA work unchanged.
    """
    names = regions or region_classes(unet)
    kwargs = settings.compile_kwargs()
    count = 0
    for module in unet.modules():
        if type(module).__name__ in names:
            module.compile(**kwargs)
            count += 1
    if count == 0:
        raise ValueError(f"no {', '.join(names)} blocks found in {type(unet).__name__} to compile")
    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, limit_name) < MIN_RECOMPILE_LIMIT:
        setattr(config, limit_name, MIN_RECOMPILE_LIMIT)
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, MIN_RECOMPILE_LIMIT * 4)
    logger.info("torch.compile: %d %s regions (backend %s, mode %s, fullgraph %s, dynamic %s)", count,
                "/".join(names), kwargs["backend"], kwargs["mode"] or "default", settings.fullgraph, settings.dynamic)
    return count


def is_compiled_region(module: torch.nn.Module) -> bool:
    """True when ``module`` was compiled in place by :func:`compile_unet_regions`."""
    return getattr(module, "_compiled_call_impl", None) is not None
