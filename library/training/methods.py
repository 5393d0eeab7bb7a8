"""Training methods: what each trainer trains and what it saves. The loop is :mod:`library.training.trainer`."""

from __future__ import annotations

import importlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from library.errors import UserError
from library.models.checkpoint_io import save_dtype
from library.models.metadata import modelspec_metadata
from library.training.trainer import TrainingRun
from library.training.validation import validation_metadata

logger = logging.getLogger(__name__)


def apply_fp8(unet: torch.nn.Module) -> None:
    """Store the frozen U-Net's Linear/Conv weights as float8_e4m3fn; each layer upcasts its weight to
    bf16/fp16 when called (library.models.fp8), so the U-Net needs no autocast (torch >= 2.4 has float8)."""
    from library.models.fp8 import store_in_fp8

    store_in_fp8(unet)


def common_metadata(run: TrainingRun, kind: str, epoch: int, step: int) -> dict[str, str]:
    """``ss_*`` keys every trainer writes, plus ``modelspec.*``."""
    cfg = run.cfg
    data = run.data
    meta = {
        "ss_session_id": str(getattr(run, "session_id", uuid.uuid4().int % 2**31)),
        "ss_training_started_at": str(run.started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": cfg.output_name or "",
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_num_train_images": str(data.num_train_images),
        "ss_num_reg_images": str(data.num_reg_images),
        "ss_num_batches_per_epoch": str(len(data)),
        "ss_epoch": str(epoch),
        "ss_steps": str(step),
        "ss_max_train_steps": str(cfg.max_train_steps),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": str(cfg.full_fp16),
        "ss_v2": "False",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_max_token_length": str(cfg.max_token_length),
        "ss_cache_latents": str(cfg.cache_latents),
        "ss_seed": str(cfg.seed),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_optimizer": run.optimizer_description,
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_loss_type": cfg.loss_type,
        "ss_min_timestep": str(cfg.min_timestep),
        "ss_max_timestep": str(cfg.max_timestep),
        "ss_sd_model_name": Path(cfg.pretrained_model_name_or_path).name,
        "ss_vae_name": Path(cfg.vae).name if cfg.vae else "",
        "ss_training_comment": cfg.training_comment or "",
        "ss_datasets": json.dumps(data.datasets_metadata(), ensure_ascii=False),
        "ss_tag_frequency": json.dumps(data.tag_frequency(), ensure_ascii=False),
        "ss_bucket_info": json.dumps(data.bucket_info(), ensure_ascii=False),
    }
    meta.update(validation_metadata(cfg, data))
    from library.training.distributed import batch_metadata  # sd-scripts' batch keys, for N processes

    meta.update(batch_metadata([ds.batch_size for ds in getattr(data, "configs", ())], len(data),
                               run.accelerator.num_processes, cfg.gradient_accumulation_steps))
    res = data.resolution if hasattr(data, "resolution") else (1024, 1024)
    meta.update(modelspec_metadata(title=cfg.metadata.get("title") or cfg.output_name or "sdxl", kind=kind,
                                   resolution=tuple(res), v_parameterization=cfg.v_parameterization,
                                   timestep_range=(cfg.min_timestep, cfg.max_timestep),
                                   extra={k: v for k, v in cfg.metadata.items() if k != "title"}))
    return meta


@dataclass
class NetworkOptions:
    """The LoRA-trainer options (``--network_*`` and friends) as plain values."""

    network_module: str = "networks.lora"
    network_dim: int | None = None
    network_alpha: float | None = 1.0
    network_dropout: float | None = None
    network_args: Sequence[str] = ()
    network_weights: str | None = None
    dim_from_weights: bool = False
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    unet_lr: float | None = None
    text_encoder_lr: Sequence[float] | None = None
    scale_weight_norms: float | None = None
    base_weights: Sequence[str] = ()
    base_weights_multiplier: Sequence[float] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_namespace(cls, ns: Any) -> "NetworkOptions":
        names = cls.__dataclass_fields__.keys() - {"extra"}
        return cls(**{n: getattr(ns, n) for n in names if getattr(ns, n, None) is not None})


def parse_network_kwargs(entries: Sequence[str]) -> dict[str, str]:
    """``--network_args key=value ...`` as a dict of strings (the module interprets them)."""
    out = {}
    for entry in entries or ():
        if "=" not in entry:
            raise UserError(f"--network_args: {entry!r} is not key=value")
        key, value = entry.split("=", 1)
        out[key.strip()] = value.strip()
    return out


class NetworkMethod:
    """LoRA (or any ``--network_module``) on a frozen SDXL."""

    kind = "lora"

    def __init__(self, opts: NetworkOptions):
        self.opts = opts
        self.trains_unet = not opts.network_train_text_encoder_only
        self.trains_text_encoders = not opts.network_train_unet_only
        self.unet_weights_trained = False  # the base model stays frozen; only the network learns
        self.text_encoder_weights_trained = False
        self.network = None
        self.prepared = None

    def setup(self, run: TrainingRun) -> None:
        cfg, opts, models = run.cfg, self.opts, run.models
        try:
            module = importlib.import_module(opts.network_module)
        except ImportError as exc:
            raise UserError(f"--network_module {opts.network_module}: cannot import ({exc})")
        te = [models.text_encoder1, models.text_encoder2]
        kwargs = parse_network_kwargs(opts.network_args)
        for path, mult in zip(opts.base_weights, list(opts.base_weights_multiplier) or [1.0] * len(opts.base_weights)):
            base, _ = module.create_network_from_weights(mult, path, models.vae, te, models.unet, for_inference=True)
            base.merge_to(te, models.unet, dtype=run.weight_dtype, device=run.device)
        if opts.dim_from_weights:
            if not opts.network_weights:
                raise UserError("--dim_from_weights needs --network_weights")
            net, _ = module.create_network_from_weights(1.0, opts.network_weights, models.vae, te, models.unet,
                                                        **kwargs)
        else:
            net = module.create_network(1.0, opts.network_dim, opts.network_alpha, models.vae, te, models.unet,
                                        neuron_dropout=opts.network_dropout, **kwargs)
        net.apply_to(te, models.unet, self.trains_text_encoders, self.trains_unet)
        if opts.network_weights:
            net.load_weights(opts.network_weights)
        if cfg.gradient_checkpointing:
            models.unet.enable_gradient_checkpointing()
            if self.trains_text_encoders:
                for t in te:
                    t.gradient_checkpointing_enable()
            net.enable_gradient_checkpointing()
        net.prepare_grad_etc(te, models.unet)
        dtype = run.weight_dtype if (cfg.full_bf16 or cfg.full_fp16) else torch.float32
        net.to(run.device, dtype)
        self.network = net
        self.run = run

    def param_groups(self) -> list[dict]:
        cfg, opts = self.run.cfg, self.opts
        te_lr = list(opts.text_encoder_lr) if opts.text_encoder_lr else None
        if te_lr is not None and len(te_lr) == 1:
            te_lr = te_lr[0]
        groups, self.descriptions = self.network.prepare_optimizer_params(te_lr, opts.unet_lr, cfg.learning_rate)
        return groups

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.network]

    def set_prepared(self, modules: list[torch.nn.Module]) -> None:
        self.prepared = modules[0]

    def unet_forward(self, run, noisy, timesteps, context, added, batch) -> torch.Tensor:
        return run.models.unet(noisy, timesteps, context, added_cond_kwargs=added).sample

    def cuda_graph_blocker(self, checkpointing: bool) -> str | None:
        from library.training.cuda_graphs import network_graph_blocker

        return network_graph_blocker(self.network, self.opts.network_module, checkpointing)

    def after_optimizer_step(self, run: TrainingRun) -> None:
        if self.opts.scale_weight_norms:
            self.network.apply_max_norm_regularization(self.opts.scale_weight_norms, run.device)

    def metadata(self, run: TrainingRun, epoch: int, step: int) -> dict[str, str]:
        opts, cfg = self.opts, run.cfg
        network_meta = {
            "ss_network_module": opts.network_module,
            "ss_network_dim": str(opts.network_dim),
            "ss_network_alpha": str(opts.network_alpha),
            "ss_network_dropout": str(opts.network_dropout),
            "ss_network_args": json.dumps(parse_network_kwargs(opts.network_args)),
            "ss_v2": "False",
            "ss_base_model_version": "sdxl_base_v1-0",
        }
        if cfg.no_metadata:
            return network_meta
        meta = common_metadata(run, self.kind, epoch, step)
        meta.update(network_meta)
        meta["ss_unet_lr"] = str(opts.unet_lr)
        meta["ss_text_encoder_lr"] = str(list(opts.text_encoder_lr) if opts.text_encoder_lr else None)
        meta["ss_fp8_base"] = str(cfg.fp8_base)
        return meta

    def save(self, run: TrainingRun, stem: str, epoch: int, step: int) -> Path:
        fmt = run.cfg.save_model_as or "safetensors"
        path = Path(run.cfg.output_dir) / f"{stem}.{fmt}"
        network = run.accelerator.unwrap_model(self.prepared) if self.prepared is not None else self.network
        network.save_weights(str(path), save_dtype(run.cfg.save_precision), self.metadata(run, epoch, step))
        return path
