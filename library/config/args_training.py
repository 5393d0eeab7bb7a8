"""Option groups for the training run itself: outputs, saving, sampling, logging, SDXL extras,
LoRA networks and the script-specific options of the fine-tune, textual-inversion and
ControlNet-LLLite trainers. Re-exported by :mod:`library.config.args`.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from library.config.arg_types import SAMPLER_NAMES, Opt, add_options, flag, group, opt


def timestep_options() -> list[Opt]:
    """The --min_timestep / --max_timestep pair (shared by the training and noise groups)."""
    return [
        opt("min_timestep", "Smallest training timestep (inclusive), 0 to 1000.", type=int, default=0),
        opt("max_timestep", "Training timesteps are drawn from [min_timestep, max_timestep); when both are "
            "equal every step uses that timestep.", type=int, default=1000),
    ]


def te_cache_options() -> list[Opt]:
    """The text-encoder-output caching switches (shared by the caching and SDXL groups)."""
    return [
        flag("cache_text_encoder_outputs", "Run both text encoders once before training and reuse their outputs "
             "(saves memory and time; the text encoders are not trained and captions must not change between "
             "epochs: no shuffling, dropout or tag warm-up)."),
        flag("cache_text_encoder_outputs_to_disk", "Like --cache_text_encoder_outputs, and also store the outputs "
             "as *_te_outputs.npz files next to the images."),
    ]


_METADATA = [
    opt("training_comment", "Free text stored in the saved model's metadata (ss_training_comment).",
        type=str, default=None),
    flag("no_metadata", "Write only the minimal metadata keys into saved networks."),
    opt("metadata_title", "Model title for the metadata (modelspec.title; default: the output name).",
        type=str, default=None),
    opt("metadata_author", "Author for the metadata (modelspec.author).", type=str, default=None),
    opt("metadata_description", "Description for the metadata (modelspec.description).", type=str, default=None),
    opt("metadata_license", "License for the metadata (modelspec.license).", type=str, default=None),
    opt("metadata_tags", "Comma-separated tags for the metadata (modelspec.tags).", type=str, default=None),
    opt("metadata_usage_hint", "Usage hint for the metadata (modelspec.usage_hint).", type=str, default=None),
    opt("metadata_thumbnail", "Thumbnail for the metadata, as a data URL (modelspec.thumbnail).",
        type=str, default=None),
    opt("metadata_merged_from", "Models this one was merged from (modelspec.merged_from).", type=str, default=None),
    opt("metadata_trigger_phrase", "Trigger phrase for the metadata (modelspec.trigger_phrase).",
        type=str, default=None),
    opt("metadata_preprocessor", "Preprocessor for the metadata (modelspec.preprocessor).", type=str, default=None),
    opt("metadata_is_negative_embedding", "Mark an embedding as negative (modelspec.is_negative_embedding).",
        type=str, default=None),
]

_HUB = [
    opt("huggingface_repo_id", "Hugging Face upload target. Accepted for compatibility; this toolkit does not "
        "upload (the option is ignored with a warning).", type=str, default=None),
    opt("huggingface_repo_type", "Hugging Face repository type (accepted, ignored).", type=str, default=None),
    opt("huggingface_path_in_repo", "Path inside the Hugging Face repository (accepted, ignored).",
        type=str, default=None),
    opt("huggingface_token", "Hugging Face token (accepted, ignored; never written to config files).",
        type=str, default=None),
    opt("huggingface_repo_visibility", "Hugging Face repository visibility (accepted, ignored).",
        type=str, default=None),
    flag("save_state_to_huggingface", "Upload saved states to Hugging Face (accepted, ignored)."),
    flag("resume_from_huggingface", "Resume from a state on Hugging Face (accepted; not supported)."),
    flag("async_upload", "Upload in the background (accepted, ignored)."),
]

_SAVING = [
    opt("save_precision", "Dtype of saved weights (default: float for networks, the training dtype for "
        "checkpoints).", type=str, default=None, choices=("float", "fp16", "bf16")),
    flag("use_safetensors", "Old switch: save as .safetensors (same as --save_model_as safetensors)."),
    opt("save_every_n_epochs", "Save the model every N epochs.", type=int, default=None),
    opt("save_every_n_steps", "Save the model every N steps.", type=int, default=None),
    opt("save_n_epoch_ratio", "Save every floor(epochs / N) epochs, so at least N saves happen over the run "
        "(overrides --save_every_n_epochs).", type=int, default=None),
    opt("save_last_n_epochs", "Keep only the last N epoch saves (older ones are deleted).", type=int, default=None),
    opt("save_last_n_epochs_state", "Keep only the last N epoch states (default: --save_last_n_epochs).",
        type=int, default=None),
    opt("save_last_n_steps", "Keep only the saves of the last N steps.", type=int, default=None),
    opt("save_last_n_steps_state", "Keep only the states of the last N steps (default: --save_last_n_steps).",
        type=int, default=None),
    flag("save_state", "Also save the full training state (optimizer, scheduler, RNG, counters) with each save."),
    flag("save_state_on_train_end", "Save the training state once at the end of training."),
    opt("resume", "Resume training from a saved state folder.", type=str, default=None),
    opt("initial_epoch", "Start at this epoch (1 = the first): the same as --initial_step (N-1) x steps per epoch.",
        type=int, default=None),
    opt("initial_step", "Start as if N optimizer steps were taken: the step counter, the epoch and the LR "
        "schedule start there and training runs to --max_train_steps (overrides --initial_epoch).",
        type=int, default=None),
    flag("skip_until_initial_step", "With --initial_step/--initial_epoch, also skip the batches those steps would "
         "have used, so the data continue where such a run would be."),
]


def add_saving_args(parser: argparse.ArgumentParser, model_formats: Sequence[str],
                    default_format: Optional[str]) -> None:
    """Add saving, state, resume and metadata options.

    ``model_formats`` are the choices of --save_model_as for this script and ``default_format`` its
    default (None for sdxl_train means "same format as the base model").
    """
    g = group(parser, "saving", "Saving, states, resuming and metadata")
    fmt_help = "Format of saved models: " + ", ".join(model_formats) + "."
    if default_format is None:
        fmt_help += " Default: the format of the base model."
    add_options(g, [opt("save_model_as", fmt_help, type=str, default=default_format, choices=tuple(model_formats))])
    add_options(g, _SAVING + _METADATA + _HUB)


_TRAINING = [
    opt("output_dir", "Folder for saved models, states and sample images.", type=str, default=None),
    opt("output_name", "File name (without extension) of saved models; default names are 'last', "
        "'epoch' and 'at'.", type=str, default=None),
    opt("seed", "Random seed (default: a random one).", type=int, default=None),
    opt("train_batch_size", "Batch size per device.", type=int, default=1),
    opt("max_train_steps", "Number of optimizer steps to train.", type=int, default=1600),
    opt("max_train_epochs", "Number of epochs to train (overrides --max_train_steps).", type=int, default=None),
    opt("max_token_length", "Caption length in tokens: 75 by default, or 150 / 225 for longer captions.",
        type=int, default=None, choices=(150, 225)),
    opt("max_data_loader_n_workers", "Maximum number of data-loader worker processes.", type=int, default=8),
    flag("persistent_data_loader_workers", "Keep data-loader workers alive between epochs."),
    opt("prior_loss_weight", "Loss weight of regularisation images.", type=float, default=1.0),
    opt("config_file", "Read options from this TOML file (the .toml suffix may be left out); options "
        "given on the command line win. A config file is code you trust (its optimizer_type / "
        "lr_scheduler_type class paths are imported and run).", type=str, default=None),
    flag("output_config", "Write the effective options to <output_dir>/<output_name or 'config'>.toml and "
         "exit (or to --config_file's path when that file does not exist yet)."),
]


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Add the run options: output, seed, length, batch size, token length, data loading, config file."""
    g = group(parser, "training", "Training run")
    add_options(g, _TRAINING)
    add_options(g, timestep_options())


_SAMPLING = [
    opt("sample_prompts", "Prompt file for sample images (.txt one prompt per line with --w --h --d --s --l --n "
        "options, .toml or .json).", type=str, default=None),
    opt("sample_every_n_steps", "Generate sample images every N steps.", type=int, default=None),
    opt("sample_every_n_epochs", "Generate sample images every N epochs (overrides --sample_every_n_steps).",
        type=int, default=None),
    flag("sample_at_first", "Generate sample images before training starts."),
    opt("sample_sampler", "Sampler for sample images.", type=str, default="ddim", choices=SAMPLER_NAMES),
]


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Add the sample-image options used during training."""
    add_options(group(parser, "sampling", "Sample images during training"), _SAMPLING)


_LOGGING = [
    opt("logging_dir", "Folder for TensorBoard logs (logging is off without it or --log_with).",
        type=str, default=None),
    opt("log_with", "Logger to use.", type=str, default=None, choices=("tensorboard", "wandb", "all")),
    opt("log_prefix", "Prefix of the run name in the logging folder.", type=str, default=None),
    opt("log_tracker_name", "Tracker (project) name.", type=str, default=None),
    opt("log_tracker_config", "TOML file of extra keyword arguments for the tracker's init.",
        type=str, default=None),
    opt("wandb_run_name", "Name of the wandb run.", type=str, default=None),
    opt("wandb_api_key", "wandb API key (never written to config files).", type=str, default=None),
    flag("log_config", "Log the training options (without secrets) to the tracker."),
    opt("console_log_level", "Console log level.", type=str, default=None,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    opt("console_log_file", "Also write the console log to this file.", type=str, default=None),
    flag("console_log_simple", "Plain console log lines (no colours or rich formatting)."),
    opt("log_every_n_steps", "Read the loss back from the GPU, show it and log it every N steps (each read is a "
        "host sync; NaN/inf losses are detected at these points).", type=int, default=10),
]


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    """Add the tracker (TensorBoard/wandb) and console logging options."""
    add_options(group(parser, "logging", "Logging"), _LOGGING)


def add_sdxl_args(parser: argparse.ArgumentParser) -> None:
    """Add the SDXL-specific options: text-encoder output caching and safetensors loading."""
    g = group(parser, "sdxl", "SDXL")
    add_options(g, te_cache_options())
    add_options(g, [flag("disable_mmap_load_safetensors", "Read .safetensors files fully into memory instead "
                         "of memory-mapping them (faster on some file systems, e.g. WSL).")])


_NETWORK = [
    opt("network_module", "Network module to train, e.g. networks.lora.", type=str, default=None),
    opt("network_dim", "Rank of the network (networks.lora uses 4 when not given).", type=int, default=None),
    opt("network_alpha", "LoRA alpha: the output is scaled by alpha / rank.", type=float, default=1),
    opt("network_dropout", "Dropout on the LoRA down-projection output (0 to 1).", type=float, default=None),
    opt("network_args", "Extra network arguments as key=value (e.g. conv_dim=4 conv_alpha=1).",
        type=str, default=None, nargs="*"),
    opt("network_weights", "Start from these network weights.", type=str, default=None),
    flag("dim_from_weights", "Take the rank from --network_weights instead of --network_dim."),
    flag("network_train_unet_only", "Train only the U-Net part of the network (recommended for SDXL)."),
    flag("network_train_text_encoder_only", "Train only the text-encoder part of the network."),
    opt("unet_lr", "Learning rate of the U-Net modules (default: --learning_rate).", type=float, default=None),
    opt("text_encoder_lr", "Learning rate of the text-encoder modules (default: --learning_rate); one value is "
        "used for both encoders, two values set TE1 and TE2.", type=float, default=None, nargs="*"),
    opt("scale_weight_norms", "Scale down network weights whose norm exceeds this (max-norm regularisation, "
        "about 1.0).", type=float, default=None),
    opt("base_weights", "Network weights merged into the base model before training.",
        type=str, default=None, nargs="*"),
    opt("base_weights_multiplier", "Multipliers of --base_weights (default 1.0 each).",
        type=float, default=None, nargs="*"),
    opt("loraplus_lr_ratio", "LoRA+: learning-rate ratio of the up-projections.", type=float, default=None),
    opt("loraplus_unet_lr_ratio", "LoRA+ ratio for the U-Net modules.", type=float, default=None),
    opt("loraplus_text_encoder_lr_ratio", "LoRA+ ratio for the text-encoder modules.", type=float, default=None),
]


def add_network_args(parser: argparse.ArgumentParser) -> None:
    """Add the LoRA / network options of sdxl_train_network.py."""
    add_options(group(parser, "network", "Network (LoRA) training"), _NETWORK)


_FINETUNE = [
    flag("train_text_encoder", "Also train both text encoders."),
    opt("learning_rate_te1", "Learning rate of text encoder 1 (CLIP ViT-L; default: --learning_rate; 0 freezes "
        "it).", type=float, default=None),
    opt("learning_rate_te2", "Learning rate of text encoder 2 (OpenCLIP ViT-bigG; default: --learning_rate; "
        "0 freezes it).", type=float, default=None),
    opt("block_lr", "Per-block U-Net learning rates: 23 comma-separated values (0: time/label embed, "
        "1-9: input blocks 0-8, 10-12: mid blocks 0-2, 13-21: output blocks 0-8, 22: out); 0 freezes a "
        "block.", type=str, default=None),
    flag("ema", "Keep an exponential moving average of the trained weights and save it instead of the raw "
         "weights."),
    opt("ema_decay", "EMA decay per update (closer to 1 = slower average).", type=float, default=0.9999),
    opt("ema_update_every", "Update the EMA every N optimizer steps.", type=int, default=1),
    flag("ema_on_cpu", "Keep the EMA copy in host memory (saves GPU memory; updates cost a transfer)."),
]


def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    """Add the options of sdxl_train.py (text-encoder training, per-encoder and per-block LRs)."""
    add_options(group(parser, "finetune", "Full fine-tuning"), _FINETUNE)


_TEXTUAL_INVERSION = [
    opt("token_string", "The new token to learn; it must not exist in either tokenizer and every caption "
        "must contain it.", type=str, default=None),
    opt("init_word", "Word(s) whose token embeddings initialise the new vectors (repeated cyclically when they "
        "are fewer tokens than --num_vectors_per_token; default: the mean embedding).", type=str, default=None),
    opt("num_vectors_per_token", "Number of embedding vectors N for the token (tokens tok, tok1, ..., tok{N-1}).",
        type=int, default=1),
    opt("weights", "Start from this embedding file (.safetensors/.pt/.ckpt with clip_l and clip_g, N vectors).",
        type=str, default=None),
    flag("use_object_template", "Ignore captions and use built-in object prompt templates."),
    flag("use_style_template", "Ignore captions and use built-in style prompt templates."),
]


def add_textual_inversion_args(parser: argparse.ArgumentParser) -> None:
    """Add the options of sdxl_train_textual_inversion.py."""
    add_options(group(parser, "textual_inversion", "Textual inversion"), _TEXTUAL_INVERSION)


_LLLITE = [
    opt("cond_emb_dim", "Width of the conditioning-image embedding of ControlNet-LLLite.", type=int, default=None),
    opt("network_dim", "Hidden width of each LLLite module.", type=int, default=None),
    opt("network_dropout", "Dropout inside the LLLite modules (0 to 1).", type=float, default=None),
    opt("network_weights", "Start from these LLLite weights.", type=str, default=None),
    opt("network_args", "LLLite module selection: skip_input_blocks=, skip_output_blocks=, "
        "transformer_max_block_index= (sd-scripts' module constants).", type=str, default=None, nargs="*"),
    opt("conditioning_data_dir", "Folder of control images with the same file names as the training images.",
        type=str, default=None),
]


def add_lllite_args(parser: argparse.ArgumentParser) -> None:
    """Add the options of sdxl_train_control_net_lllite.py."""
    add_options(group(parser, "lllite", "ControlNet-LLLite"), _LLLITE)


_DISTRIBUTED = [
    opt("ddp_timeout", "Timeout of distributed (DDP) operations in minutes.", type=int, default=None),
    flag("ddp_gradient_as_bucket_view", "DDP: gradient_as_bucket_view=True."),
    flag("ddp_static_graph", "DDP: static_graph=True."),
    flag("deepspeed", "Train with DeepSpeed (through accelerate)."),
    opt("zero_stage", "DeepSpeed ZeRO stage.", type=int, default=2, choices=(0, 1, 2, 3)),
    opt("offload_optimizer_device", "DeepSpeed: offload optimizer state to this device.", type=str,
        default=None, choices=("cpu", "nvme")),
    opt("offload_optimizer_nvme_path", "DeepSpeed: NVMe path for optimizer offload.", type=str, default=None),
    opt("offload_param_device", "DeepSpeed: offload parameters to this device (ZeRO-3).", type=str,
        default=None, choices=("cpu", "nvme")),
    opt("offload_param_nvme_path", "DeepSpeed: NVMe path for parameter offload.", type=str, default=None),
    flag("zero3_init_flag", "DeepSpeed: zero.Init for ZeRO-3 model construction."),
    flag("zero3_save_16bit_model", "DeepSpeed: gather a 16-bit model when saving with ZeRO-3."),
    flag("fp16_master_weights_and_gradients", "DeepSpeed: fp16 master weights and gradients."),
]


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Add the multi-GPU options (DDP knobs and DeepSpeed)."""
    add_options(group(parser, "distributed", "Multi-GPU"), _DISTRIBUTED)
