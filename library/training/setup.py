"""Everything between parsed options and the first step: models in the right dtypes, caches filled.

The order keeps memory low: models load on the CPU (or straight to the GPU with ``--lowram``),
the VAE visits the GPU only to fill the latent cache, the text encoders only to fill theirs, and
whatever is frozen afterwards is stored in the mixed-precision dtype.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Sequence

import torch

from library.data.cachers import (LatentCacheOptions, TextEncoderCacheOptions, module_fingerprint,
                                  sample_posterior_per_image)
from library.diffusion.conditioning import TextConditioner
from library.models.checkpoint_io import load_sdxl
from library.models.sdxl import SDXLModels
from library.models.tokenizers import load_tokenizers
from library.training import distributed
from library.training.config import TrainConfig
from library.training.trainer import DTYPES, TrainingRun, make_accelerator

logger = logging.getLogger(__name__)


def vae_dtype_for(cfg: TrainConfig, weight_dtype: torch.dtype) -> torch.dtype:
    """fp32 unless asked otherwise: the SDXL VAE overflows in fp16 (black images, sd-scripts #952).

    bf16 has fp32's range, so a bf16 run keeps a bf16 VAE unless ``--no_half_vae``.
    """
    from library.data.cachers import vae_cache_dtype

    return vae_cache_dtype("bf16" if weight_dtype == torch.bfloat16 else "other", cfg.no_half_vae)


def text_encoder_fn(cfg: TrainConfig, conditioner: TextConditioner) -> Callable[[Sequence[str]], tuple]:
    """captions -> (context, pooled) with or without A1111 weights (``--weighted_captions``)."""
    if not cfg.weighted_captions:
        return conditioner.encode
    from library.text.weighting import encode_weighted_prompt

    def encode(captions: Sequence[str]):
        return encode_weighted_prompt((conditioner.tokenizer1, conditioner.tokenizer2),
                                      (conditioner.text_encoder1, conditioner.text_encoder2), captions,
                                      cfg.max_token_length)
    return encode


def working_copy(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype,
                 keep_original: bool = True) -> torch.nn.Module:
    """``module`` on ``device`` in ``dtype`` without rounding the original weights.

    Moving is lossless, so a module already in ``dtype`` is just moved. Casting is not: with
    ``keep_original`` a cast copy is returned and ``module`` stays as it was (a checkpoint saved later
    holds the untouched frozen weights); without it the module itself is cast.
    """
    if {p.dtype for p in module.parameters()} == {dtype}:
        return module.to(device)
    if keep_original:
        module = copy.deepcopy(module)
    return module.to(device, dtype)


def fill_caches(run: TrainingRun, encode_text: Callable) -> None:
    """Fill the latent and text-encoder caches the options ask for.

    The VAE and text encoders visit the device only for this, as cast working copies, so their
    original (fp32) weights are neither rounded nor kept on the GPU.
    """
    cfg, data, models, device = run.cfg, run.data, run.models, run.device
    acc = run.accelerator
    if cfg.cache_latents or cfg.cache_latents_to_disk:
        vae_dtype = vae_dtype_for(cfg, run.weight_dtype)
        vae_id = module_fingerprint(models.vae)  # the weights, not the path (same id as tools/cache_latents.py)
        vae = working_copy(models.vae, device, vae_dtype)

        @torch.no_grad()
        def encode_images(images: torch.Tensor) -> torch.Tensor:  # the same latents whichever process encodes
            posterior = vae.encode(images.to(device, vae_dtype)).latent_dist
            return sample_posterior_per_image(posterior, images, cfg.seed or 0).cpu()

        opts = LatentCacheOptions(vae_dtype=str(vae_dtype).replace("torch.", ""), vae_batch_size=cfg.vae_batch_size,
                                  to_disk=cfg.cache_latents_to_disk, skip_cache_check=cfg.skip_cache_check,
                                  show_progress=acc.is_local_main_process)
        data.cache_latents(encode_images, vae_id, opts, process_index=acc.process_index,
                           num_processes=acc.num_processes)
        acc.wait_for_everyone()
        del vae, encode_images
        models.vae.to("cpu")
    if cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk:
        _cache_text_encoder_outputs(run, encode_text)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cache_text_encoder_outputs(run: TrainingRun, encode_text: Callable) -> None:
    cfg, models, acc, conditioner = run.cfg, run.models, run.accelerator, run.conditioner
    width1 = models.text_encoder1.config.hidden_size
    te_id = module_fingerprint(models.text_encoder1, models.text_encoder2)  # weights, as the caching tool
    originals = conditioner.text_encoder1, conditioner.text_encoder2
    conditioner.text_encoder1 = working_copy(models.text_encoder1, run.device, run.weight_dtype)
    conditioner.text_encoder2 = working_copy(models.text_encoder2, run.device, run.weight_dtype)

    @torch.no_grad()
    def encode_captions(captions: Sequence[str]):
        with acc.autocast():
            context, pooled = encode_text(captions)
        return (context[..., :width1].float().cpu(), context[..., width1:].float().cpu(), pooled.float().cpu())

    opts = TextEncoderCacheOptions(batch_size=max(cfg.vae_batch_size, 8), to_disk=cfg.cache_text_encoder_outputs_to_disk,
                                   skip_cache_check=cfg.skip_cache_check, weighted_captions=cfg.weighted_captions,
                                   show_progress=acc.is_local_main_process)
    try:
        run.data.cache_text_encoder_outputs(encode_captions, te_id, opts, process_index=acc.process_index,
                                            num_processes=acc.num_processes)
        acc.wait_for_everyone()
    finally:
        conditioner.text_encoder1, conditioner.text_encoder2 = originals
        for te in originals:
            te.to("cpu")


def place_frozen_models(run: TrainingRun, unet_weights_trained: bool, text_encoder_weights_trained: bool,
                        keep_originals: bool = False) -> None:
    """Move what the step needs to the device: frozen weights in the mixed-precision dtype, trained
    weights in fp32 (master weights) unless --full_bf16/--full_fp16.

    ``keep_originals`` (methods that save whole checkpoints): frozen modules that must be cast get a
    working copy and their untouched weights are kept in ``run.originals`` for saving.
    """
    cfg, models, device = run.cfg, run.models, run.device
    full_low = cfg.full_bf16 or cfg.full_fp16

    def place(name: str, dtype: torch.dtype, trained: bool) -> None:
        module = getattr(models, name)
        placed = working_copy(module, device, dtype, keep_original=keep_originals and not trained)
        if placed is not module:
            run.originals[name] = module
        setattr(models, name, placed)

    place("unet", run.weight_dtype if (not unet_weights_trained or full_low) else torch.float32, unet_weights_trained)
    if not (cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk):
        te_dtype = run.weight_dtype if (not text_encoder_weights_trained or full_low) else torch.float32
        place("text_encoder1", te_dtype, text_encoder_weights_trained)
        place("text_encoder2", te_dtype, text_encoder_weights_trained)
    if not (cfg.cache_latents or cfg.cache_latents_to_disk):
        place("vae", vae_dtype_for(cfg, run.weight_dtype), False)
    if run.conditioner is not None:
        run.conditioner.text_encoder1, run.conditioner.text_encoder2 = models.text_encoder1, models.text_encoder2


def create_run(cfg: TrainConfig, data) -> TrainingRun:
    """Load the model, build the accelerator, the conditioner and the caption encoder."""
    acc = make_accelerator(cfg)
    if cfg.seed is not None:
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
    weight_dtype = DTYPES[cfg.weight_dtype_name]
    load_device = acc.device if cfg.lowram else "cpu"
    with distributed.plain_model_construction(acc):  # ZeRO-3 partitions them at prepare, not while loading
        models: SDXLModels = load_sdxl(cfg.pretrained_model_name_or_path, dtype=torch.float32, device=load_device,
                                       vae=cfg.vae, mmap=not cfg.disable_mmap_load_safetensors)
    tok1, tok2 = load_tokenizers(cfg.tokenizer_cache_dir)
    conditioner = TextConditioner(tok1, tok2, models.text_encoder1, models.text_encoder2, cfg.max_token_length)
    run = TrainingRun(cfg=cfg, models=models, conditioner=conditioner, data=data, accelerator=acc,
                      weight_dtype=weight_dtype)
    run.encode_text = text_encoder_fn(cfg, conditioner)
    return run


def run_training(cfg: TrainConfig, data, method, sampler: Callable | None = None):
    """Load, cache, place, set up the method and train; returns the final saved path (main process)."""
    from library.training.methods import apply_fp8
    from library.training.trainer import Trainer

    from library.training.distributed import check_options

    check_options(cfg.deepspeed, cfg.fused_backward_pass, method.kind,  # before any model loads
                  ema=bool(getattr(getattr(method, "opts", None), "ema", False)), zero_stage=cfg.zero_stage,
                  trains_text_encoders=method.text_encoder_weights_trained)
    run = create_run(cfg, data)
    fill_caches(run, run.encode_text)
    place_frozen_models(run, method.unet_weights_trained, method.text_encoder_weights_trained,
                        keep_originals=method.kind == "checkpoint")
    if cfg.fp8_base:
        apply_fp8(run.models.unet)
    if cfg.torch_compile and (cfg.dynamo_backend or "no").lower() != "no":
        from library.models.regional_compile import CompileSettings, compile_unet_regions

        compile_unet_regions(run.models.unet, CompileSettings(cfg.dynamo_backend.lower(), cfg.dynamo_mode,
                                                              cfg.dynamo_fullgraph, cfg.dynamo_dynamic))
    trainer = Trainer(run, method, sampler)
    trainer.setup()
    return trainer.train()
