"""ControlNet-LLLite training as a method of the one training loop.

The U-Net stays frozen; only the LLLite network learns. Each step embeds the batch's
``conditioning_images`` (cropped, resized and flipped exactly like the training images by the
dataset, also when latents are cached) in every module, with gradients, and then runs the U-Net.
The network comes from a factory module passed in by the script (``networks.control_net_lllite``),
so the library does not import the networks package.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from library.errors import UserError
from library.models.checkpoint_io import save_dtype
from library.training.methods import common_metadata, parse_network_kwargs
from library.training.trainer import TrainingRun

logger = logging.getLogger(__name__)


@dataclass
class LLLiteOptions:
    """The options of sdxl_train_control_net_lllite.py as plain values."""

    cond_emb_dim: int | None = None
    network_dim: int | None = None
    network_dropout: float | None = None
    network_weights: str | None = None
    network_args: Sequence[str] = ()

    @classmethod
    def from_namespace(cls, ns: Any) -> "LLLiteOptions":
        names = cls.__dataclass_fields__.keys()
        return cls(**{n: getattr(ns, n) for n in names if getattr(ns, n, None) is not None})


def conditioning_for(batch: dict, device: torch.device) -> torch.Tensor:
    """The batch's conditioning images (dataset range [0, 1]) as the network's [-1, 1] input."""
    cond = batch.get("conditioning_images")
    if cond is None:
        raise UserError("a training batch has no conditioning images; every subset needs conditioning_data_dir "
                        "for ControlNet-LLLite")
    return cond.to(device, torch.float32) * 2.0 - 1.0


def check_sample_guides(prompts_file: str | None) -> None:
    """Before any model loads: every ``--cn`` image of the sample prompts exists (paths relative to the
    working directory, as sd-scripts reads them); prompts without one are sampled without LLLite."""
    if not prompts_file:
        return
    from library.inference.prompts import load_prompt_file

    for spec in load_prompt_file(prompts_file):
        if spec.controlnet_image is None:
            logger.warning("%s: prompt %r has no --cn guide image; it is sampled without ControlNet-LLLite",
                           prompts_file, spec.prompt)
        elif not Path(spec.controlnet_image).is_file():
            raise UserError(f"{prompts_file}: --cn {spec.controlnet_image} not found (prompt {spec.prompt!r}; "
                            f"relative paths are read from {Path.cwd()})")


class LLLiteMethod:
    """ControlNet-LLLite on a frozen SDXL (``factory``: a module with ``create_network`` /
    ``create_network_from_weights`` as in ``networks.control_net_lllite``)."""

    kind = "control-net-lllite"
    trains_unet = True
    trains_text_encoders = False
    unet_weights_trained = False
    text_encoder_weights_trained = False
    unet_batch_keys = ("conditioning_images",)  # batch entries unet_forward reads

    def __init__(self, opts: LLLiteOptions, factory: Any):
        self.opts = opts
        self.factory = factory
        self.network = None
        self.prepared = None
        self.run: TrainingRun | None = None

    def setup(self, run: TrainingRun) -> None:
        cfg, opts, unet = run.cfg, self.opts, run.models.unet
        kwargs = parse_network_kwargs(opts.network_args)
        if opts.cond_emb_dim is not None:
            kwargs["cond_emb_dim"] = str(opts.cond_emb_dim)
        net = self.factory.create_network(1.0, opts.network_dim, None, None, None, unet,
                                          neuron_dropout=opts.network_dropout, **kwargs)
        net.apply_to(None, unet)
        if opts.network_weights:
            net.load_weights(opts.network_weights)
            logger.info("loaded LLLite weights %s", opts.network_weights)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        net.prepare_grad_etc(None, unet)
        dtype = run.weight_dtype if (cfg.full_bf16 or cfg.full_fp16) else torch.float32
        net.to(run.device, dtype)
        self.network, self.run = net, run

    def param_groups(self) -> list[dict]:
        groups, self.descriptions = self.network.prepare_optimizer_params(None, None, self.run.cfg.learning_rate)
        return groups

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.network]

    def set_prepared(self, modules: list[torch.nn.Module]) -> None:
        self.prepared = modules[0]

    def unet_forward(self, run, noisy, timesteps, context, added, batch) -> torch.Tensor:
        network = self.prepared if self.prepared is not None else self.network
        network(conditioning_for(batch, run.device))  # embeds in every module, with gradients
        # The embeddings stay until the optimizer step: a checkpointed U-Net recomputes its blocks
        # (and the modules inside them) during backward.
        return run.models.unet(noisy, timesteps, context, added_cond_kwargs=added).sample

    def cuda_graph_blocker(self, checkpointing: bool) -> str | None:
        from library.training.cuda_graphs import network_graph_blocker

        return network_graph_blocker(self.network, getattr(self.factory, "__name__", ""), checkpointing)

    def after_optimizer_step(self, run: TrainingRun) -> None:
        self.network.clear_cond_image()

    @contextlib.contextmanager
    def sample_context(self, spec: Any, width: int, height: int) -> Iterator[None]:
        """While one sample image is generated: the prompt's ``--cn`` image embedded (LLLite off without one)."""
        from library.inference.control import check_image_size, load_guide_image

        path = getattr(spec, "controlnet_image", None)
        if path is None:
            self.network.clear_cond_image()
        else:
            check_image_size(self.run.models.unet, width, height)
            with torch.no_grad():
                self.network.set_cond_image(load_guide_image(path, width, height)[None].to(self.run.device))
        try:
            yield
        finally:
            self.network.clear_cond_image()

    def metadata(self, run: TrainingRun, epoch: int, step: int) -> dict[str, str]:
        opts, net = self.opts, self.network
        first = net.unet_modules[0] if net.unet_modules else None
        meta = {
            "ss_network_module": "networks.control_net_lllite",
            "ss_network_dim": str(first.mlp_dim if first else opts.network_dim),
            "ss_cond_emb_dim": str(first.cond_emb_dim if first else opts.cond_emb_dim),
            "ss_network_dropout": str(opts.network_dropout),
            "ss_network_args": json.dumps(parse_network_kwargs(opts.network_args)),
            "ss_v2": "False",
            "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/control-net-lllite",
        }
        if run.cfg.no_metadata:
            return meta
        full = common_metadata(run, self.kind, epoch, step)
        full.update(meta)
        return full

    def save(self, run: TrainingRun, stem: str, epoch: int, step: int) -> Path:
        fmt = run.cfg.save_model_as or "safetensors"
        path = Path(run.cfg.output_dir) / f"{stem}.{fmt}"
        self.network.save_weights(str(path), save_dtype(run.cfg.save_precision), self.metadata(run, epoch, step))
        return path
