"""Full fine-tuning (``sdxl_train.py``): the U-Net, optionally both text encoders, per-block learning rates.

Block indices of ``--block_lr`` (SAI module numbering of the U-Net):

=====  =============================================================
0      ``time_embed.*`` and ``label_emb.*`` (timestep and size embeds)
1-9    ``input_blocks.0`` ... ``input_blocks.8``
10-12  ``middle_block.0`` ... ``middle_block.2``
13-21  ``output_blocks.0`` ... ``output_blocks.8``
22     ``out.*`` (final GroupNorm and conv)
=====  =============================================================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from library.errors import UserError
from library.models import convert_keys as ck
from library.models.checkpoint_io import save_diffusers_folder, save_single_file
from library.models.sdxl import SDXLModels
from library.training.ema import EMA
from library.training.methods import common_metadata
from library.training.trainer import TrainingRun

logger = logging.getLogger(__name__)

NUM_BLOCKS = 23


def unet_block_index(sai_name: str) -> int:
    """``--block_lr`` index (0-22) of an SAI U-Net parameter name."""
    head, _, rest = sai_name.partition(".")
    if head in ("time_embed", "label_emb"):
        return 0
    if head == "input_blocks":
        return 1 + int(rest.split(".")[0])
    if head == "middle_block":
        return 10 + int(rest.split(".")[0])
    if head == "output_blocks":
        return 13 + int(rest.split(".")[0])
    if head == "out":
        return 22
    raise ValueError(f"no block for {sai_name}")


def unet_param_blocks(unet: torch.nn.Module) -> dict[str, int]:
    """Diffusers parameter name -> block index."""
    lpb = unet.config.layers_per_block
    up_attention = {i for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None)}
    return {name: unet_block_index(ck.unet_diffusers_to_sai(name, lpb, up_attention))
            for name, _ in unet.named_parameters()}


@dataclass
class FineTuneOptions:
    """sdxl_train.py's own options as plain values."""

    train_text_encoder: bool = False
    learning_rate_te1: float | None = None
    learning_rate_te2: float | None = None
    block_lr: Sequence[float] | None = None
    ema: bool = False
    ema_decay: float = 0.9999
    ema_update_every: int = 1
    ema_on_cpu: bool = False

    @classmethod
    def from_namespace(cls, ns: Any, block_lr: Sequence[float] | None) -> "FineTuneOptions":
        names = cls.__dataclass_fields__.keys() - {"block_lr"}
        return cls(block_lr=block_lr, **{n: getattr(ns, n) for n in names if getattr(ns, n, None) is not None})


class FineTuneMethod:
    """Trains the U-Net (learning rate 0 freezes it) and, with ``--train_text_encoder``, the text encoders."""

    kind = "checkpoint"
    forwards_through_prepared = True  # the step calls the prepared U-Net / text encoders: DDP can wrap them

    def __init__(self, opts: FineTuneOptions, learning_rate: float):
        self.opts = opts
        self.lr = learning_rate
        self.lr_te = [opts.learning_rate_te1 if opts.learning_rate_te1 is not None else learning_rate,
                      opts.learning_rate_te2 if opts.learning_rate_te2 is not None else learning_rate]
        self.trains_unet = learning_rate > 0 or any(v > 0 for v in (opts.block_lr or ()))
        self.trains_text_encoders = opts.train_text_encoder and any(lr > 0 for lr in self.lr_te)
        self.unet_weights_trained = self.trains_unet
        self.text_encoder_weights_trained = self.trains_text_encoders
        self.prepared: list[torch.nn.Module] = []
        self.ema: EMA | None = None

    def setup(self, run: TrainingRun) -> None:
        models, cfg = run.models, run.cfg
        self.run = run
        models.unet.requires_grad_(False)
        for te in (models.text_encoder1, models.text_encoder2):
            te.requires_grad_(False)
        self.groups = self._unet_groups(models.unet) + self._te_groups(models)
        if cfg.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
            for te in self._trained_encoders(models):
                te.gradient_checkpointing_enable()
        if self.opts.ema:
            named = [(f"unet.{n}", p) for n, p in models.unet.named_parameters() if p.requires_grad]
            for i, te in enumerate(self._trained_encoders(models)):
                named += [(f"te{i}.{n}", p) for n, p in te.named_parameters() if p.requires_grad]
            self.ema = EMA(named, self.opts.ema_decay, self.opts.ema_update_every, self.opts.ema_on_cpu)
            run.accelerator.register_for_checkpointing(self.ema)

    def _unet_groups(self, unet: torch.nn.Module) -> list[dict]:
        if not self.trains_unet:
            return []
        if self.opts.block_lr is None:
            unet.requires_grad_(True)
            return [{"params": list(unet.parameters()), "lr": self.lr}]
        if len(self.opts.block_lr) != NUM_BLOCKS:
            raise UserError(f"--block_lr needs exactly {NUM_BLOCKS} values; got {len(self.opts.block_lr)}")
        blocks = unet_param_blocks(unet)
        params = dict(unet.named_parameters())
        groups = []
        for index, lr in enumerate(self.opts.block_lr):
            chosen = [params[n] for n, b in blocks.items() if b == index]
            if lr > 0 and chosen:
                for p in chosen:
                    p.requires_grad_(True)
                groups.append({"params": chosen, "lr": lr})
        return groups

    def _trained_encoders(self, models: SDXLModels) -> list[torch.nn.Module]:
        if not self.opts.train_text_encoder:
            return []
        return [te for te, lr in zip((models.text_encoder1, models.text_encoder2), self.lr_te) if lr > 0]

    def _te_groups(self, models: SDXLModels) -> list[dict]:
        groups = []
        for te, lr in zip((models.text_encoder1, models.text_encoder2), self.lr_te):
            if not self.opts.train_text_encoder or lr <= 0:
                continue
            te.requires_grad_(True)
            if te is models.text_encoder1:
                # TE1 contributes its penultimate layer only: the last layer and the final norm get no gradient.
                encoder = te.text_model if hasattr(te, "text_model") else te
                encoder.encoder.layers[-1].requires_grad_(False)
                encoder.final_layer_norm.requires_grad_(False)
            groups.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": lr})
        return groups

    def param_groups(self) -> list[dict]:
        return self.groups

    def trained_modules(self) -> list[torch.nn.Module]:
        models = self.run.models
        return ([models.unet] if self.trains_unet else []) + self._trained_encoders(models)

    def set_prepared(self, modules: list[torch.nn.Module]) -> None:
        self.prepared = modules
        models = self.run.models
        i = 0
        if self.trains_unet:
            models.unet = modules[0]
            i = 1
        for te, wrapped in zip(self._trained_encoders(models), modules[i:]):
            if te is models.text_encoder1:
                models.text_encoder1 = wrapped
            else:
                models.text_encoder2 = wrapped
        if self.run.conditioner is not None:  # the step encodes captions through the wrapped encoders
            self.run.conditioner.text_encoder1 = models.text_encoder1
            self.run.conditioner.text_encoder2 = models.text_encoder2

    def unet_forward(self, run, noisy, timesteps, context, added, batch) -> torch.Tensor:
        return run.models.unet(noisy, timesteps, context, added_cond_kwargs=added).sample

    def after_optimizer_step(self, run: TrainingRun) -> None:
        if self.ema is not None:
            self.ema.step(run.progress.global_step + 1)

    def _unwrapped(self, run: TrainingRun) -> SDXLModels:
        """The models to save: trained ones unwrapped, frozen ones with their untouched original weights."""
        m = run.models
        unwrap = run.accelerator.unwrap_model
        pick = {name: run.originals.get(name, getattr(m, name))
                for name in ("unet", "vae", "text_encoder1", "text_encoder2")}
        if run.gathered is not None:  # FSDP / ZeRO-3: the modules hold shards; save the gathered full weights
            from library.training.distributed import materialize

            names = (["unet"] if self.trains_unet else []) + [
                name for name, lr in zip(("text_encoder1", "text_encoder2"), self.lr_te)
                if self.opts.train_text_encoder and lr > 0]
            for name, state in zip(names, run.gathered):
                pick[name] = materialize(unwrap(pick[name]), state)
        return SDXLModels(unwrap(pick["unet"]), pick["vae"], unwrap(pick["text_encoder1"]),
                          unwrap(pick["text_encoder2"]), extras=m.extras, metadata=m.metadata, source=m.source)

    def save(self, run: TrainingRun, stem: str, epoch: int, step: int) -> Path:
        cfg = run.cfg
        fmt = cfg.save_model_as or ("safetensors" if Path(cfg.pretrained_model_name_or_path).is_file() else "diffusers")
        models = self._unwrapped(run)
        restore = {}
        named = self._ema_targets(models)
        if self.ema is not None:
            restore = self.ema.copy_to(named)
        try:
            if fmt in ("diffusers", "diffusers_safetensors"):
                path = Path(cfg.output_dir) / stem
                save_diffusers_folder(models, path, cfg.save_precision, safe_serialization=fmt == "diffusers_safetensors")
            else:
                path = Path(cfg.output_dir) / f"{stem}.{fmt}"
                meta = common_metadata(run, self.kind, epoch, step) if fmt == "safetensors" else None
                save_single_file(models, path, cfg.save_precision, metadata=meta, epoch=epoch, global_step=step)
        finally:
            with torch.no_grad():
                for name, value in restore.items():
                    named[name].copy_(value)
        return path

    def _ema_targets(self, models: SDXLModels) -> dict[str, torch.nn.Parameter]:
        named = {f"unet.{n}": p for n, p in models.unet.named_parameters()}
        for i, te in enumerate(self._trained_encoders(models)):
            named.update({f"te{i}.{n}": p for n, p in te.named_parameters()})
        return named
