"""Cross-option checks, run right after parsing and before anything heavy is loaded.

:func:`validate_training_args` raises :class:`~library.errors.UserError` with one clear line for the
first problem it finds, and logs warnings for options that are accepted but have no effect. The
per-item checks (:func:`check_te_cache_compat`, :func:`check_latent_cache_compat`,
:func:`check_bucket_reso_steps`) are public so the dataset-config code can apply the same rules to
every dataset and subset of a dataset TOML.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import re
from typing import Any, Callable, Optional

from library.config.arg_types import LR_SCHEDULER_NAMES
from library.errors import UserError

logger = logging.getLogger(__name__)

SCRIPTS = ("train", "train_network", "train_textual_inversion", "train_control_net_lllite")

BLOCK_LR_COUNT = 23
_BLOCK_LR_LAYOUT = ("0: time/label embed, 1-9: input blocks 0-8, 10-12: mid blocks 0-2, "
                    "13-21: output blocks 0-8, 22: out")
_CLI = "the command line / --config_file"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _get(ns: argparse.Namespace, name: str, default: Any = None) -> Any:
    value = getattr(ns, name, default)
    return default if value is None else value


# ----------------------------------------------------------------------------- public item checks

def check_te_cache_compat(shuffle: bool, dropout_rate: float, tag_dropout_rate: float, token_warmup_step: float,
                          where: str, *, dropout_every_n_epochs: int = 0) -> None:
    """Reject caption augmentation that cached text-encoder outputs cannot reproduce.

    Call it only when text-encoder outputs are cached; ``where`` names the place the settings come
    from (e.g. "dataset config x.toml, dataset 1 subset 2"). Raises UserError.
    """
    problems = []
    if shuffle:
        problems.append("shuffle_caption")
    if (dropout_rate or 0) > 0:
        problems.append(f"caption_dropout_rate={dropout_rate}")
    if (dropout_every_n_epochs or 0) > 0:
        problems.append(f"caption_dropout_every_n_epochs={dropout_every_n_epochs}")
    if (tag_dropout_rate or 0) > 0:
        problems.append(f"caption_tag_dropout_rate={tag_dropout_rate}")
    if (token_warmup_step or 0) > 0:
        problems.append(f"token_warmup_step={token_warmup_step}")
    if problems:
        raise UserError(
            f"--cache_text_encoder_outputs cannot be used with {', '.join(problems)} (set in {where}): cached "
            "outputs are computed once per caption, so captions cannot change between steps; turn these off "
            "or stop caching text-encoder outputs")


def check_latent_cache_compat(color_aug: bool, random_crop: bool, where: str) -> None:
    """Reject image augmentation that cached latents cannot reproduce (call when latents are cached)."""
    problems = [name for name, on in (("color_aug", color_aug), ("random_crop", random_crop)) if on]
    if problems:
        raise UserError(
            f"--cache_latents cannot be used with {' and '.join(problems)} (set in {where}): latents are "
            "encoded once per image; turn these off or stop caching latents (flip_aug works with caching)")


def check_bucket_reso_steps(steps: int, where: str) -> None:
    """SDXL needs bucket sides in multiples of 32 (at least 32)."""
    if steps is None or steps < 32 or steps % 32 != 0:
        raise UserError(f"bucket_reso_steps must be a multiple of 32 and at least 32 for SDXL, got {steps} "
                        f"(set in {where}); use 32 or 64")


def parse_block_lr(text: str) -> list[float]:
    """Parse ``--block_lr``: exactly 23 comma-separated non-negative learning rates."""
    parts = [p.strip() for p in str(text).split(",")]
    if parts == [""]:
        parts = []
    if len(parts) != BLOCK_LR_COUNT:
        raise UserError(f"--block_lr needs exactly {BLOCK_LR_COUNT} values ({_BLOCK_LR_LAYOUT}); got {len(parts)}")
    values = []
    for i, p in enumerate(parts):
        try:
            v = float(p)
        except ValueError:
            raise UserError(f"--block_lr value {i} ({p!r}) is not a number") from None
        if not v >= 0 or v == float("inf"):
            raise UserError(f"--block_lr value {i} is {p}; learning rates must be finite and >= 0")
        values.append(v)
    return values


def parse_resolution(text: Any) -> tuple[int, int]:
    """Parse ``--resolution`` ("SIZE" or "WIDTH,HEIGHT") into (width, height)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 0:
        raise UserError(f"--resolution must be SIZE or WIDTH,HEIGHT in pixels (e.g. 1024 or 1024,768), got {text!r}")
    return (values[0], values[-1])


# ----------------------------------------------------------------------------- legacy aliases

# Periodic options that sd-scripts switches off with a falsy value, so TOMLs carry 0 for "never".
EVERY_N_OPTIONS = ("save_every_n_epochs", "save_every_n_steps", "save_n_epoch_ratio", "sample_every_n_steps",
                   "sample_every_n_epochs", "validate_every_n_steps", "validate_every_n_epochs")


def normalize_legacy_args(ns: argparse.Namespace) -> None:
    """Fold old option spellings into the current ones, in place (idempotent).

    caption_extention -> caption_extension; use_8bit_adam / use_lion_optimizer -> optimizer_type;
    dynamo_backend "no" (from a TOML) -> no torch.compile;
    *_to_disk caching implies the in-memory switch; fp8_base_unet implies fp8_base;
    skip_latents_validity_check -> skip_cache_check; 0 for a periodic save/sample/validation -> off.
    """
    if getattr(ns, "caption_extention", None) is not None:
        ns.caption_extension = ns.caption_extention
        ns.caption_extention = None
    legacy = [(f, n) for f, n in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")) if _get(ns, f)]
    if len(legacy) == 2:
        raise UserError("--use_8bit_adam and --use_lion_optimizer cannot be used together; use --optimizer_type")
    if legacy:
        switch, name = legacy[0]
        current = _get(ns, "optimizer_type", "")
        if current and current.lower() != name.lower():
            raise UserError(f"--{switch} and --optimizer_type {current} disagree; give only --optimizer_type")
        ns.optimizer_type = name
    for disk, mem in (("cache_text_encoder_outputs_to_disk", "cache_text_encoder_outputs"),
                      ("cache_latents_to_disk", "cache_latents")):
        if _get(ns, disk):
            setattr(ns, mem, True)
    if _get(ns, "fp8_base_unet"):
        ns.fp8_base = True
    for name in EVERY_N_OPTIONS:  # TOMLs (the kohya_ss GUI's among them) write 0 for "off"
        if getattr(ns, name, None) == 0:
            setattr(ns, name, None)
    if str(_get(ns, "dynamo_backend", "")).lower() == "no":  # sd-scripts/GUI spelling of "do not compile"
        if _get(ns, "torch_compile"):
            logger.warning("dynamo_backend = \"no\" turns torch.compile off (as in sd-scripts); "
                           "--torch_compile is ignored")
        ns.torch_compile = False
        ns.dynamo_backend = "inductor"
    if _get(ns, "skip_latents_validity_check"):
        logger.warning("--skip_latents_validity_check is deprecated; use --skip_cache_check")
        ns.skip_cache_check = True


# ----------------------------------------------------------------------------- checks on a namespace

def _check_required(ns: argparse.Namespace, script: str) -> None:
    if not _get(ns, "pretrained_model_name_or_path"):
        raise UserError("--pretrained_model_name_or_path is required: an SDXL checkpoint file "
                        "(.safetensors/.ckpt) or a diffusers folder")
    if not _get(ns, "output_dir"):
        raise UserError("--output_dir is required: the folder where models, states and samples are written")
    if not (_get(ns, "dataset_config") or _get(ns, "train_data_dir") or _get(ns, "in_json")):
        raise UserError("no training data: give --dataset_config or --train_data_dir")
    if _get(ns, "v2"):
        raise UserError("--v2 is for Stable Diffusion 2.x models; these scripts train SDXL only (remove --v2)")


def _model_path_ok(path: str) -> bool:
    """A model path must exist, unless it looks like a Hugging Face id ("org/name")."""
    if os.path.exists(path):
        return True
    return bool(_HUB_ID.fullmatch(path)) and not path.lower().endswith(_WEIGHT_SUFFIXES)


def _check_paths(ns: argparse.Namespace, script: str) -> None:
    for name in ("pretrained_model_name_or_path", "vae"):
        value = _get(ns, name)
        if value and not _model_path_ok(str(value)):
            raise UserError(f"--{name}: file or folder not found: {value}")
    files = ["dataset_config", "sample_prompts", "network_weights", "weights", "log_tracker_config"]
    dirs = ["resume"]
    if not _get(ns, "dataset_config"):
        files.append("in_json")
        dirs += ["train_data_dir", "reg_data_dir", "conditioning_data_dir"]
    for name in files:
        value = _get(ns, name)
        if value and not os.path.isfile(value):
            raise UserError(f"--{name}: file not found: {value}")
    for name in dirs:
        value = _get(ns, name)
        if value and not os.path.isdir(value):
            raise UserError(f"--{name}: folder not found: {value}")
    for value in _get(ns, "base_weights", []) or []:
        if not os.path.isfile(value):
            raise UserError(f"--base_weights: file not found: {value}")


def _check_caching(ns: argparse.Namespace, script: str) -> None:
    if _get(ns, "cache_latents"):
        check_latent_cache_compat(_get(ns, "color_aug", False), _get(ns, "random_crop", False), _CLI)
    if not _get(ns, "cache_text_encoder_outputs"):
        return
    if script == "train_textual_inversion":
        raise UserError("--cache_text_encoder_outputs cannot be used for textual inversion: the new token's "
                        "embedding is trained, so the text encoders must run every step")
    if script == "train" and _get(ns, "train_text_encoder"):
        raise UserError("--cache_text_encoder_outputs cannot be used with --train_text_encoder: trained text "
                        "encoders change their outputs; remove one of them")
    if script == "train_network" and not _get(ns, "network_train_unet_only"):
        raise UserError("--cache_text_encoder_outputs needs --network_train_unet_only: text-encoder LoRA "
                        "modules cannot be trained from cached outputs")
    check_te_cache_compat(_get(ns, "shuffle_caption", False), _get(ns, "caption_dropout_rate", 0.0),
                          _get(ns, "caption_tag_dropout_rate", 0.0), _get(ns, "token_warmup_step", 0), _CLI,
                          dropout_every_n_epochs=_get(ns, "caption_dropout_every_n_epochs", 0))


def _cuda_available() -> bool:
    import torch  # imported here: validation must stay cheap to import

    return bool(torch.cuda.is_available())


def _check_precision(ns: argparse.Namespace, script: str) -> None:
    mp = _get(ns, "mixed_precision", "no")
    if _get(ns, "cpu_offload_checkpointing") and not _get(ns, "gradient_checkpointing"):
        logger.warning("--cpu_offload_checkpointing turns on --gradient_checkpointing (it offloads what "
                       "checkpointing keeps)")
        ns.gradient_checkpointing = True
    if _get(ns, "full_fp16") and _get(ns, "full_bf16"):
        raise UserError("--full_fp16 and --full_bf16 cannot be used together")
    if _get(ns, "full_bf16") and mp != "bf16":
        raise UserError(f"--full_bf16 needs --mixed_precision bf16 (got {mp})")
    if _get(ns, "full_fp16") and mp != "fp16":
        raise UserError(f"--full_fp16 needs --mixed_precision fp16 (got {mp})")
    if not _get(ns, "fp8_base"):
        return
    name = "--fp8_base_unet" if _get(ns, "fp8_base_unet") else "--fp8_base"
    if script == "train":
        logger.warning("%s only applies to frozen base weights; it has no effect in full fine-tuning", name)
        return
    if mp == "no":
        raise UserError(f"{name} needs --mixed_precision fp16 or bf16: weights are stored in float8 and "
                        "computed in the mixed-precision dtype")


def _check_device(ns: argparse.Namespace, script: str) -> None:
    """Checks that need torch (imported only here, after every cheap check has passed)."""
    if script != "train" and _get(ns, "fp8_base") and not _cuda_available():
        name = "--fp8_base_unet" if _get(ns, "fp8_base_unet") else "--fp8_base"
        raise UserError(f"{name} needs a CUDA GPU (torch.cuda.is_available() is False); remove {name}")
    if _get(ns, "mixed_precision") == "fp16" and not _cuda_available():
        import torch

        from library.training.precision import check_mixed_precision_device

        mps = getattr(torch.backends, "mps", None)
        check_mixed_precision_device("fp16", "mps" if mps is not None and mps.is_available() else "cpu")


def _check_buckets(ns: argparse.Namespace, script: str) -> None:
    steps = _get(ns, "bucket_reso_steps", 64)
    if steps < 32 or steps % 32 != 0:
        raise UserError(f"--bucket_reso_steps must be a multiple of 32 and at least 32 for SDXL, got {steps}; "
                        "use 32 or 64")
    lo, hi = _get(ns, "min_bucket_reso", 256), _get(ns, "max_bucket_reso", 1024)
    if lo <= 0 or lo > hi:
        raise UserError(f"--min_bucket_reso ({lo}) must be positive and not above --max_bucket_reso ({hi})")
    if _get(ns, "resolution") is not None:
        parse_resolution(ns.resolution)
    crop = _get(ns, "face_crop_aug_range")
    if crop is not None:
        try:
            a, b = (float(x) for x in str(crop).split(","))
        except ValueError:
            raise UserError(f"--face_crop_aug_range must be 'LOW,HIGH' (e.g. 2.0,4.0), got {crop!r}") from None
        if not 0 < a <= b:
            raise UserError(f"--face_crop_aug_range needs 0 < LOW <= HIGH, got {crop!r}")


def _check_ranges(ns: argparse.Namespace, script: str) -> None:
    lo, hi = _get(ns, "min_timestep", 0), _get(ns, "max_timestep", 1000)
    if lo < 0 or hi > 1000:
        raise UserError(f"--min_timestep/--max_timestep must lie in 0..1000, got {lo} and {hi}")
    if lo > hi:
        raise UserError(f"--min_timestep ({lo}) must not be above --max_timestep ({hi})")
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate", "network_dropout"):
        v = _get(ns, name, 0.0)
        if not 0.0 <= v <= 1.0:
            raise UserError(f"--{name} must be between 0 and 1, got {v}")
    if not 0.0 <= _get(ns, "validation_split", 0.0) < 1.0:
        raise UserError(f"--validation_split must be at least 0 and below 1, got {ns.validation_split}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "vae_batch_size",
                 "max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "sample_every_n_steps",
                 "sample_every_n_epochs", "num_vectors_per_token", "text_encoder_batch_size",
                 "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps", "save_n_epoch_ratio",
                 "initial_epoch"):
        v = getattr(ns, name, None)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be at least 1, got {v}")
    if _get(ns, "initial_step", 0) < 0:
        raise UserError(f"--initial_step must be 0 or more, got {ns.initial_step}")
    if _get(ns, "skip_until_initial_step") and _get(ns, "initial_step") is None and _get(ns, "initial_epoch") is None:
        logger.warning("--skip_until_initial_step has no effect without --initial_step or --initial_epoch")
    for name in ("learning_rate", "learning_rate_te1", "learning_rate_te2", "unet_lr", "text_encoder_lr",
                 "max_grad_norm"):
        for v in (lambda x: x if isinstance(x, (list, tuple)) else [x])(getattr(ns, name, None)):
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"--{name} must be a finite number, got {v}")
            if v is not None and v < 0:
                raise UserError(f"--{name} must not be negative, got {v}")


def _check_optimizer(ns: argparse.Namespace, script: str) -> None:
    if _get(ns, "block_lr") is not None:
        parse_block_lr(ns.block_lr)
    for name in ("optimizer_args", "lr_scheduler_args", "network_args"):
        for item in _get(ns, name, []) or []:
            if "=" not in item:
                raise UserError(f"--{name} entries must be key=value, got {item!r}")
    sched = _get(ns, "lr_scheduler", "constant")
    if not _get(ns, "lr_scheduler_type") and sched.split(":")[0] not in LR_SCHEDULER_NAMES:
        guess = difflib.get_close_matches(sched, LR_SCHEDULER_NAMES, n=1)
        hint = f"; did you mean '{guess[0]}'?" if guess else f"; choose one of {', '.join(LR_SCHEDULER_NAMES)}"
        raise UserError(f"unknown --lr_scheduler '{sched}'{hint}")
    if _get(ns, "fused_backward_pass"):
        if _get(ns, "gradient_accumulation_steps", 1) > 1:
            raise UserError("--fused_backward_pass needs --gradient_accumulation_steps 1: the optimizer steps "
                            "inside the backward pass, so gradients cannot be accumulated")
        if _get(ns, "fused_optimizer_groups") is not None:
            raise UserError("--fused_backward_pass and --fused_optimizer_groups cannot be used together; pick one")
    groups = getattr(ns, "fused_optimizer_groups", None)
    if groups is not None:
        if groups < 1:
            raise UserError(f"--fused_optimizer_groups must be at least 1, got {groups}")
        if _get(ns, "optimizer_type", "").lower().startswith(("prodigy", "dadapt")):
            raise UserError(f"--fused_optimizer_groups does not work with {ns.optimizer_type} (its step size is "
                            "estimated over all parameters at once)")


def _check_script(ns: argparse.Namespace, script: str) -> None:
    if script == "train_network":
        if not _get(ns, "network_module"):
            raise UserError("--network_module is required (e.g. --network_module networks.lora)")
        if _get(ns, "network_train_unet_only") and _get(ns, "network_train_text_encoder_only"):
            raise UserError("--network_train_unet_only and --network_train_text_encoder_only cannot be used "
                            "together: nothing would be trained")
        if _get(ns, "dim_from_weights") and not _get(ns, "network_weights"):
            raise UserError("--dim_from_weights needs --network_weights")
    elif script == "train_textual_inversion":
        if not _get(ns, "token_string"):
            raise UserError("--token_string is required: the new token whose embedding is learned")
        if _get(ns, "use_object_template") and _get(ns, "use_style_template"):
            raise UserError("--use_object_template and --use_style_template cannot be used together")
    elif script == "train_control_net_lllite":
        if not (_get(ns, "dataset_config") or _get(ns, "conditioning_data_dir")):
            raise UserError("ControlNet-LLLite needs control images: give --conditioning_data_dir or a "
                            "--dataset_config whose subsets set conditioning_data_dir")
        if _get(ns, "masked_loss"):
            raise UserError("--masked_loss is not an option of sdxl_train_control_net_lllite.py (nor of "
                            "sd-scripts' one): its conditioning images are the control images, not loss "
                            "masks; remove --masked_loss")


# Options parsed so sd-scripts command lines and TOMLs run unchanged, whose feature is not built yet.
NOT_IMPLEMENTED: tuple[str, ...] = ()


def _warn_ineffective(ns: argparse.Namespace, script: str) -> None:
    if (_get(ns, "sample_every_n_steps") or _get(ns, "sample_every_n_epochs")
            or _get(ns, "sample_at_first")) and not _get(ns, "sample_prompts"):
        logger.warning("sample images are requested but --sample_prompts is not set; no samples will be made")
    if _get(ns, "clip_skip") is not None:
        logger.warning("--clip_skip has no effect for SDXL (it already uses the penultimate layers); ignored")
    if _get(ns, "huggingface_repo_id") or _get(ns, "resume_from_huggingface"):
        logger.warning("Hugging Face upload/download options are accepted but not supported; ignored")
    if _get(ns, "dataset_config") and any(_get(ns, n) for n in ("train_data_dir", "reg_data_dir", "in_json")):
        logger.warning("--train_data_dir/--reg_data_dir/--in_json are ignored because --dataset_config is given")
    not_yet = [f"--{n}" for n in NOT_IMPLEMENTED if _get(ns, n) not in (None, False, 0, 0.0, "")]
    if not_yet:
        logger.warning("%s: accepted for sd-scripts compatibility but not implemented yet; ignored",
                       ", ".join(not_yet))
    if any(_get(ns, n) for n in ("xformers", "mem_eff_attn", "diffusers_xformers")):
        logger.info("attention always uses PyTorch SDPA; --xformers/--mem_eff_attn/--diffusers_xformers are "
                    "accepted for compatibility")


_CHECKS: tuple[Callable[[argparse.Namespace, str], None], ...] = (
    _check_required, _check_paths, _check_precision, _check_caching, _check_buckets, _check_ranges,
    _check_optimizer, _check_script, _warn_ineffective, _check_device,
)


def validate_training_args(ns: argparse.Namespace, script: str) -> None:
    """Check the options of a trainer before any model or data is loaded.

    ``script`` is one of "train", "train_network", "train_textual_inversion",
    "train_control_net_lllite". Old option spellings are first folded into the current ones
    (see :func:`normalize_legacy_args`; ``ns`` is changed in place). Raises UserError with one line
    for the first problem; logs a warning for options that are accepted but have no effect.
    """
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; expected one of {SCRIPTS}")
    normalize_legacy_args(ns)
    for check in _CHECKS:
        check(ns, script)


def block_lr_or_none(ns: argparse.Namespace) -> Optional[list[float]]:
    """The parsed ``--block_lr`` of ``ns`` or None when it is not given."""
    value = getattr(ns, "block_lr", None)
    return None if value is None else parse_block_lr(value)
