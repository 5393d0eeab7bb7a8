"""Command-line options of the training scripts, as reusable argparse groups.

Option names and defaults are those of kohya-ss/sd-scripts, so an existing command line or
``--config_file`` TOML runs unchanged. Each ``add_*_args`` function adds one group of options to a
parser; adding is idempotent (an option already present is skipped), so groups that share an option
can be combined freely. :func:`build_trainer_parser` assembles the full parser of each trainer, and
:func:`parse_args_with_config` parses a command line together with its ``--config_file``.

The groups for training/saving/sampling/logging/networks live in :mod:`library.config.args_training`
and are re-exported here; the config-file machinery lives in :mod:`library.config.config_file`.
"""

from __future__ import annotations

import argparse
from typing import Optional

from library.config.arg_types import (
    DYNAMO_BACKENDS,
    LR_SCHEDULER_NAMES,
    RESIZE_INTERPOLATIONS,
    SAMPLER_NAMES,
    add_options,
    flag,
    group,
    int_or_float,
    opt,
)
from library.config.args_training import (
    add_distributed_args,
    add_finetune_args,
    add_lllite_args,
    add_logging_args,
    add_network_args,
    add_sampling_args,
    add_saving_args,
    add_sdxl_args,
    add_textual_inversion_args,
    add_training_args,
    te_cache_options,
    timestep_options,
)
from library.config.config_file import load_config_values, parse_args_with_config, write_config

__all__ = [
    "SAMPLER_NAMES", "LR_SCHEDULER_NAMES", "SCRIPT_SAVE_FORMATS",
    "add_model_args", "add_dataset_args", "add_caching_args", "add_precision_args",
    "add_optimizer_args", "add_noise_loss_args", "add_saving_args", "add_training_args",
    "add_sampling_args", "add_logging_args", "add_sdxl_args", "add_network_args",
    "add_finetune_args", "add_textual_inversion_args", "add_lllite_args", "add_distributed_args",
    "build_trainer_parser", "parse_args_with_config", "load_config_values", "write_config",
    "int_or_float",
]

_MODEL = [
    opt("pretrained_model_name_or_path", "SDXL base model: a single-file checkpoint (.safetensors or .ckpt), "
        "a diffusers folder, or a Hugging Face model id available offline.", type=str, default=None),
    opt("vae", "Use this VAE instead of the one in the base model (single file or diffusers folder).",
        type=str, default=None),
    opt("tokenizer_cache_dir", "Folder to read/write the two CLIP tokenizers from/to, for offline use. "
        "By default the tokenizers shipped with this toolkit are used.", type=str, default=None),
    flag("v2", "Stable Diffusion 2.x model. Accepted for compatibility only: SDXL scripts reject it."),
    flag("v_parameterization", "Train with the v-prediction target (for v-pred SDXL models such as "
         "NoobAI-XL v-pred); the default is epsilon prediction."),
    flag("disable_mmap_load_safetensors", "Read .safetensors files fully into memory instead of memory-mapping "
         "them (faster on some file systems, e.g. WSL)."),
    flag("lowram", "Load the models straight to the GPU to keep host RAM low."),
    flag("highvram", "Do not free the CUDA cache between batches while caching latents (faster with ample VRAM)."),
    opt("clip_skip", "Use the output of the n-th last text-encoder layer. Has no effect for SDXL, which "
        "already uses the penultimate layers; accepted for compatibility.", type=int, default=None),
]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Add the model-loading options (base model, VAE, tokenizers, memory placement, clip_skip)."""
    add_options(group(parser, "model", "Base model loading"), _MODEL)


_DATASET = [
    opt("train_data_dir", "Training images: a folder of DreamBooth-style sub-folders named "
        "'<repeats>_<class tokens>' (e.g. '10_sks dog'), or the image folder of a --in_json metadata file. "
        "Ignored when --dataset_config is given.", type=str, default=None),
    opt("reg_data_dir", "Regularisation images, organised like --train_data_dir.", type=str, default=None),
    opt("in_json", "Fine-tuning metadata JSON (captions/tags per image key).", type=str, default=None),
    opt("dataset_config", "Dataset TOML (or JSON) with [general], [[datasets]] and [[datasets.subsets]]; "
        "its values win over the dataset options given here.", type=str, default=None),
    opt("dataset_class", "Use a custom dataset class, given as 'package.module.ClassName'.", type=str, default=None),
    opt("dataset_repeats", "Repeats of each image per epoch for a --in_json dataset.", type=int, default=1),
    opt("resolution", "Training resolution: 'SIZE' or 'WIDTH,HEIGHT' (e.g. 1024 or 1024,1024).",
        type=str, default=None),
    flag("enable_bucket", "Group images into aspect-ratio buckets instead of one fixed resolution."),
    opt("min_bucket_reso", "Smallest bucket side in pixels.", type=int, default=256),
    opt("max_bucket_reso", "Largest bucket side in pixels. The default 1024 clips SDXL's non-square buckets; "
        "2048 keeps about one megapixel for every aspect ratio.", type=int, default=1024),
    opt("bucket_reso_steps", "Bucket sides are multiples of this (SDXL needs a multiple of 32, at least 32).",
        type=int, default=64),
    flag("bucket_no_upscale", "Never upscale small images: their bucket is made from their own size."),
    opt("resize_interpolation", "Resampling filter for resizing images (default: area when shrinking, "
        "lanczos when enlarging).", type=str, default=None, choices=RESIZE_INTERPOLATIONS),
    opt("caption_extension", "Extension of caption files next to the images.", type=str, default=".caption"),
    opt("caption_extention", "Old misspelt name of --caption_extension; still accepted.", type=str, default=None),
    flag("shuffle_caption", "Shuffle the comma-separated tags of each caption every time it is used."),
    opt("caption_separator", "Separator between tags in captions.", type=str, default=","),
    opt("keep_tokens", "Keep this many leading tags in place when shuffling or dropping tags.", type=int, default=0),
    opt("keep_tokens_separator", "Tags before this separator stay fixed when shuffling (an alternative to "
        "--keep_tokens); a second occurrence marks a fixed suffix.", type=str, default=""),
    opt("secondary_separator", "A separator that groups several tags into one unit for shuffling/dropping; "
        "it is replaced by --caption_separator afterwards.", type=str, default=None),
    flag("enable_wildcard", "Expand {a|b} wildcards in captions and pick a random line of multi-line captions."),
    opt("caption_prefix", "Text prepended to every caption.", type=str, default=None),
    opt("caption_suffix", "Text appended to every caption.", type=str, default=None),
    opt("caption_dropout_rate", "Probability of training a sample with an empty caption.", type=float, default=0.0),
    opt("caption_dropout_every_n_epochs", "Use empty captions for every sample every N-th epoch (0: never).",
        type=int, default=0),
    opt("caption_tag_dropout_rate", "Probability of dropping each individual tag.", type=float, default=0.0),
    opt("token_warmup_min", "Number of tags used at the start of tag warm-up.", type=int, default=1),
    opt("token_warmup_step", "Step at which all tags are used (values below 1 are a fraction of the total "
        "steps; 0 disables tag warm-up).", type=float, default=0),
    flag("color_aug", "Random hue augmentation (incompatible with latent caching)."),
    flag("flip_aug", "Random horizontal flips (works with latent caching: flipped latents are cached too)."),
    flag("random_crop", "Crop at a random offset instead of the centre (incompatible with latent caching)."),
    opt("face_crop_aug_range", "Face-centred crop augmentation scale range 'LOW,HIGH' (e.g. 2.0,4.0).",
        type=str, default=None),
    flag("alpha_mask", "Weight the loss by the image's alpha channel."),
    flag("masked_loss", "Weight the loss by a mask image from --conditioning_data_dir (its red channel)."),
    opt("conditioning_data_dir", "Folder of conditioning images with the same file names as the training "
        "images (loss masks for --masked_loss, control images for ControlNet-LLLite).", type=str, default=None),
    flag("cache_info", "DreamBooth folders: write image sizes and captions to metadata_cache.json in each "
         "folder and reuse it on the next run."),
    flag("debug_dataset", "Show the prepared training samples instead of training."),
    flag("weighted_captions", "Read A1111-style attention weights like '(word:1.3)' in captions."),
    flag("skip_bad_images", "Skip unreadable or corrupt images (each is reported by path) instead of "
         "stopping with an error."),
    opt("validation_split", "Fraction of each dataset's training images held out (never trained on) for the "
        "validation loss; a dataset config's validation_split wins.",
        type=float, default=0.0),
    opt("validation_seed", "Seed of the validation split and of the fixed validation noise (default: --seed).",
        type=int, default=None),
    opt("validate_every_n_steps", "Compute the validation loss every N steps (logged as "
        "loss/validation/step_average).", type=int, default=None),
    opt("validate_every_n_epochs", "Compute the validation loss every N epochs (default: every epoch when "
        "there is a validation split).", type=int, default=None),
    opt("max_validation_steps", "Use at most N validation batches per evaluation (each at 4 fixed timesteps).",
        type=int, default=None),
]


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """Add the dataset, bucketing, caption, augmentation and validation options (all CLI dataset options)."""
    add_options(group(parser, "dataset", "Dataset, buckets and captions"), _DATASET)


_CACHING = [
    flag("cache_latents", "Encode all images with the VAE once before training and keep the latents in memory."),
    flag("cache_latents_to_disk", "Like --cache_latents, and also store the latents as .npz files next to the "
         "images for later runs."),
    opt("vae_batch_size", "Batch size for VAE encoding while caching latents.", type=int, default=1),
    flag("skip_cache_check", "Trust existing cache files without opening them (only their existence is checked)."),
    flag("skip_latents_validity_check", "Deprecated name of --skip_cache_check."),
    opt("text_encoder_batch_size", "Batch size for caching text-encoder outputs (default: the training batch "
        "size).", type=int, default=None),
]


def add_caching_args(parser: argparse.ArgumentParser) -> None:
    """Add the latent and text-encoder-output caching options."""
    g = group(parser, "caching", "Latent and text-encoder output caches")
    add_options(g, _CACHING)
    add_options(g, te_cache_options())


_PRECISION = [
    opt("mixed_precision", "Mixed-precision compute dtype.", type=str, default="no", choices=("no", "fp16", "bf16")),
    flag("full_fp16", "Keep the trained weights and gradients in fp16 (needs --mixed_precision fp16)."),
    flag("full_bf16", "Keep the trained weights and gradients in bf16 (needs --mixed_precision bf16)."),
    flag("fp8_base", "Store the frozen base model in float8 (e4m3) and compute in the mixed-precision dtype; "
         "needs a CUDA GPU."),
    flag("fp8_base_unet", "Store only the frozen U-Net in float8; the text encoders stay in fp16/bf16."),
    flag("no_half_vae", "Keep the VAE in float32 (the SDXL VAE produces NaNs in fp16)."),
    flag("gradient_checkpointing", "Recompute activations in the backward pass to save memory."),
    flag("cpu_offload_checkpointing", "Keep the U-Net's gradient-checkpointed block inputs in CPU memory between "
         "forward and backward (less GPU memory, two copies per block; turns on --gradient_checkpointing)."),
    opt("gradient_accumulation_steps", "Number of batches whose gradients are summed before each optimizer step.",
        type=int, default=1),
    flag("sdpa", "Use PyTorch scaled-dot-product attention. Accepted for compatibility: SDPA is always used."),
    flag("xformers", "Use xformers attention. Accepted for compatibility: PyTorch SDPA is always used "
         "(it selects flash/memory-efficient kernels itself)."),
    flag("mem_eff_attn", "Memory-efficient attention. Accepted for compatibility: PyTorch SDPA is always used."),
    flag("diffusers_xformers", "xformers for the VAE. Accepted for compatibility: PyTorch SDPA is always used."),
    flag("torch_compile", "Compile the U-Net's repeated transformer blocks with torch.compile (regional "
         "compilation, LoRA hooks inside; about a minute once, cached on disk for later runs)."),
    opt("dynamo_backend", "torch.compile backend.", type=str, default="inductor", choices=DYNAMO_BACKENDS),
    opt("dynamo_mode", "torch.compile mode.", type=str, default=None,
        choices=("default", "reduce-overhead", "max-autotune")),
    flag("dynamo_fullgraph", "With --torch_compile: compile each region as one graph (fullgraph=True); a graph "
         "break is an error instead of a silent split."),
    flag("dynamo_dynamic", "With --torch_compile: dynamic shapes (dynamic=True), one compile serves every bucket "
         "resolution and batch size; without it each distinct shape compiles once (static, fastest kernels)."),
    opt("cuda_graphs", "Replay the U-Net forward, loss and backward (LoRA, LLLite, textual inversion, full "
        "fine-tuning) as a CUDA graph per batch shape, removing the host's kernel-launch time (the first batch "
        "of each shape runs eagerly; with Adafactor the optimizer step replays too, inside the backward with "
        "--fused_backward_pass, else after it when gradients are not accumulated and no text encoder is trained). "
        "auto: on where safe (CUDA; on several GPUs for adapters, whose gradients are averaged after the replay, "
        "not for DDP-wrapped full fine-tuning; no fp16 loss scaling, no host-side dropout choices, memory to "
        "spare after the eager steps (about 1 GiB for a full fine-tune); the log says why when off); off: always eager.",
        type=str, default="auto", choices=("auto", "off")),
    flag("fused_backward_pass", "Step the optimizer for each parameter inside the backward pass, freeing its "
         "gradient at once (needs --gradient_accumulation_steps 1)."),
    opt("fused_optimizer_groups", "Split the trained parameters into N groups, each with its own optimizer "
        "stepped (and its gradients freed) as soon as the group's gradients are complete in the backward pass; "
        "--max_grad_norm clips per group. Not with --fused_backward_pass, gradient accumulation, fp16 or "
        "D-Adaptation/Prodigy.", type=int, default=None),
]


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    """Add precision, memory and speed options (mixed precision, fp8, checkpointing, attention, compile)."""
    add_options(group(parser, "precision", "Precision, memory and speed"), _PRECISION)


_OPTIMIZER = [
    opt("optimizer_type", "Optimizer: AdamW (default), AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, "
        "Lion, Lion8bit, PagedLion8bit, SGDNesterov, SGDNesterov8bit, DAdaptation, DAdaptAdaGrad, DAdaptAdam, "
        "DAdaptAdan, DAdaptAdanIP, DAdaptLion, DAdaptSGD, Prodigy, Adafactor, RAdamScheduleFree, "
        "AdamWScheduleFree, SGDScheduleFree, or any class path such as bitsandbytes.optim.AdEMAMix8bit "
        "(case-insensitive). A class path is imported and run, by design: use only ones you trust.",
        type=str, default=""),
    flag("use_8bit_adam", "Old switch for --optimizer_type AdamW8bit."),
    flag("use_lion_optimizer", "Old switch for --optimizer_type Lion."),
    opt("learning_rate", "Learning rate (for sdxl_train: of the U-Net; 0 freezes it).", type=float, default=2e-6),
    opt("max_grad_norm", "Clip the gradient norm to this value (0: no clipping).", type=float, default=1.0),
    opt("optimizer_args", "Extra optimizer arguments as key=value (e.g. weight_decay=0.01 betas=0.9,0.999).",
        type=str, default=None, nargs="*"),
    opt("lr_scheduler", "Learning-rate schedule: " + ", ".join(LR_SCHEDULER_NAMES) + ".",
        type=str, default="constant"),
    opt("lr_scheduler_type", "Custom scheduler class path (overrides --lr_scheduler); it is imported and run, "
        "by design: use only ones you trust.", type=str, default=""),
    opt("lr_scheduler_args", "Extra scheduler arguments as key=value.", type=str, default=None, nargs="*"),
    opt("lr_warmup_steps", "Warm-up steps: a number, a fraction of the total steps below 1, or a percentage "
        "like 10%%.", type=int_or_float, default=0),
    opt("lr_decay_steps", "Decay steps for warmup_stable_decay: a number, a fraction below 1, or a percentage.",
        type=int_or_float, default=0),
    opt("lr_scheduler_num_cycles", "Number of restarts of cosine_with_restarts.", type=int, default=1),
    opt("lr_scheduler_power", "Power of the polynomial schedule.", type=float, default=1),
    opt("lr_scheduler_timescale", "Time scale of inverse_sqrt (default: the warm-up steps).", type=int, default=None),
    opt("lr_scheduler_min_lr_ratio", "Final learning rate as a ratio of the initial one (cosine_with_min_lr, "
        "warmup_stable_decay).", type=float, default=None),
]


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    """Add the optimizer and learning-rate scheduler options (including the old optimizer switches)."""
    add_options(group(parser, "optimizer", "Optimizer and learning-rate schedule"), _OPTIMIZER)


_NOISE_LOSS = [
    opt("noise_offset", "Add offset noise of this strength per sample and channel (about 0.1 helps very dark "
        "or bright images).", type=float, default=None),
    flag("noise_offset_random_strength", "Draw the offset strength uniformly from 0 to --noise_offset."),
    opt("adaptive_noise_scale", "Add this times the mean absolute latent value to the noise offset.",
        type=float, default=None),
    opt("multires_noise_iterations", "Pyramid (multi-resolution) noise levels (6 to 10 suggested).",
        type=int, default=None),
    opt("multires_noise_discount", "Weight decay per pyramid-noise level.", type=float, default=0.3),
    opt("ip_noise_gamma", "Input-perturbation noise strength (about 0.1), added to the noisy input only.",
        type=float, default=None),
    flag("ip_noise_gamma_random_strength", "Draw the input-perturbation strength uniformly from 0 to "
         "--ip_noise_gamma."),
    flag("zero_terminal_snr", "Rescale the noise schedule to zero signal-to-noise at the last timestep."),
    opt("min_snr_gamma", "Min-SNR loss weighting with this gamma (5 suggested).", type=float, default=None),
    flag("scale_v_pred_loss_like_noise_pred", "Scale the v-prediction loss like an epsilon-prediction loss."),
    opt("v_pred_like_loss", "Add a v-prediction-like loss term with this weight.", type=float, default=None),
    flag("debiased_estimation_loss", "Weight the loss by 1/sqrt(SNR) (debiased estimation)."),
    opt("loss_type", "Loss function.", type=str, default="l2", choices=("l1", "l2", "huber", "smooth_l1")),
    opt("huber_schedule", "How the Huber parameter varies with the timestep.", type=str, default="snr",
        choices=("constant", "exponential", "snr")),
    opt("huber_c", "Huber loss parameter c.", type=float, default=0.1),
    opt("huber_scale", "Huber loss scale.", type=float, default=1.0),
]


def add_noise_loss_args(parser: argparse.ArgumentParser) -> None:
    """Add the timestep-range, noise and loss options."""
    g = group(parser, "noise_loss", "Timesteps, noise and loss")
    add_options(g, timestep_options())
    add_options(g, _NOISE_LOSS)


# Model formats --save_model_as offers per trainer, and the default.
SCRIPT_SAVE_FORMATS = {
    "train": (("ckpt", "safetensors", "diffusers", "diffusers_safetensors"), None),
    "train_network": (("ckpt", "pt", "safetensors"), "safetensors"),
    "train_textual_inversion": (("ckpt", "pt", "safetensors"), "pt"),
    "train_control_net_lllite": (("ckpt", "pt", "safetensors"), "safetensors"),
}


def build_trainer_parser(script: str, description: Optional[str] = None) -> argparse.ArgumentParser:
    """Return the complete parser of one trainer.

    ``script`` is "train" (sdxl_train.py), "train_network" (sdxl_train_network.py),
    "train_textual_inversion" or "train_control_net_lllite".
    """
    if script not in SCRIPT_SAVE_FORMATS:
        raise ValueError(f"unknown script {script!r}; expected one of {sorted(SCRIPT_SAVE_FORMATS)}")
    parser = argparse.ArgumentParser(description=description)
    add_model_args(parser)
    add_dataset_args(parser)
    add_caching_args(parser)
    add_precision_args(parser)
    add_optimizer_args(parser)
    add_noise_loss_args(parser)
    formats, default_format = SCRIPT_SAVE_FORMATS[script]
    add_saving_args(parser, formats, default_format)
    add_training_args(parser)
    add_sampling_args(parser)
    add_logging_args(parser)
    add_sdxl_args(parser)
    add_distributed_args(parser)
    if script == "train":
        add_finetune_args(parser)
    elif script == "train_network":
        add_network_args(parser)
    elif script == "train_textual_inversion":
        add_textual_inversion_args(parser)
    else:
        add_lllite_args(parser)
    return parser
