"""Options of ``sdxl_gen_img.py`` (sd-scripts' names and defaults) and the image plan that follows from them.

:func:`build_parser` / :func:`parse_args` give the command line; :func:`validate_args` checks it
before anything heavy is loaded. :func:`plan_jobs` turns prompts (with their inline options) into
one :class:`ImageJob` per image, with seeds and dynamic prompts resolved, and :func:`batches`
groups consecutive jobs that can share a U-Net batch. Only plain values leave this module.

sd-scripts options that this generator does not implement (regional LoRA, CLIP guidance, full ControlNet, ...) are
still recognised, so a command line using them stops with a one-line error saying so instead of an
argparse "unrecognized arguments". img2img, inpainting, the highres fix, Deep Shrink, Gradual Latent
and the console-log options live in :mod:`library.inference.gen_features`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from library.errors import UserError
from library.inference.dynamic_prompts import expand_dynamic_prompts
from library.inference.prompts import PromptSpec, load_prompt_file, parse_prompt_line

logger = logging.getLogger(__name__)

MAX_SEED = 0x7FFFFFFF

# sd-scripts options we recognise but do not implement: (option, what it is)
UNSUPPORTED = (
    ("clip_vision_strength", "CLIP-vision img2img: needs the CLIP-ViT-bigG vision model"),
    ("clip_guidance_scale", "CLIP guidance"), ("clip_image_guidance_scale", "CLIP image guidance"),
    ("vgg16_guidance_scale", "VGG16 guidance"), ("control_net_models", "ControlNet"),
    ("network_regional_mask_max_color_codes", "regional LoRA"),
)


def _add_core(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", type=str, default=None,
                   help="SDXL checkpoint: .safetensors/.ckpt file or diffusers folder")
    g.add_argument("--vae", type=str, default=None, help="use this VAE instead of the checkpoint's")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None, help="folder to read/write the tokenizers")
    g.add_argument("--v_parameterization", action="store_true", help="the model predicts v (v-pred SDXL finetunes)")
    g.add_argument("--zero_terminal_snr", action="store_true", help="rescale the noise schedule to zero terminal SNR")
    g.add_argument("--textual_inversion_embeddings", type=str, nargs="*", default=None,
                   help="SDXL embedding files ({clip_l, clip_g}); the trigger word is the file name")
    g = p.add_argument_group("prompts and output")
    g.add_argument("--prompt", type=str, default=None, help="the prompt (inline options such as --n --w --d allowed)")
    g.add_argument("--from_file", type=str, default=None, help="prompt file: .txt (one per line), .toml or .json")
    g.add_argument("--outdir", type=str, default="outputs", help="folder for the images (default: outputs)")
    g.add_argument("--sequential_file_name", action="store_true", help="name files im_000001.png, ...")
    g.add_argument("--use_original_file_name", action="store_true",
                   help="img2img: name each image after its init image file (stem.png)")
    g.add_argument("--no_preview", action="store_true", help="accepted; --interactive never opens a preview window")
    g.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt (default 1)")
    g.add_argument("--n_iter", type=int, default=1, help="repeat the whole prompt list this many times")
    g.add_argument("--batch_size", type=int, default=1, help="images per U-Net batch (default 1)")
    g.add_argument("--max_embeddings_multiples", type=int, default=3,
                   help="prompt length limit in 75-token windows (default 3 = 225 tokens)")
    g.add_argument("--clip_skip", type=int, default=None,
                   help="ignored for SDXL (it always uses the penultimate layer)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--W", type=int, default=None,
                   help="image width (default 1024; img2img: the init image's, which --W/--H resize)")
    g.add_argument("--H", type=int, default=None, help="image height (default 1024; see --W)")
    g.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    g.add_argument("--scale", type=float, default=7.5, help="CFG scale (default 7.5; <= 1 disables guidance)")
    g.add_argument("--negative_scale", type=float, default=None, help="separate guidance scale of the negative prompt")
    g.add_argument("--sampler", type=str, default="ddim", help="sampler (default ddim); see docs/gen_img.md")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image; the others follow from it")
    g.add_argument("--iter_same_seed", action="store_true", help="every --n_iter iteration reuses the same seeds")
    g.add_argument("--original_width", type=int, default=None, help="SDXL original-size conditioning (default W)")
    g.add_argument("--original_height", type=int, default=None, help="SDXL original-size conditioning (default H)")
    g.add_argument("--original_width_negative", type=int, default=None, help="original width for the negative")
    g.add_argument("--original_height_negative", type=int, default=None, help="original height for the negative")
    g.add_argument("--crop_top", type=int, default=None, help="SDXL crop conditioning, top (default 0)")
    g.add_argument("--crop_left", type=int, default=None, help="SDXL crop conditioning, left (default 0)")


def _add_precision(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("precision and memory")
    g.add_argument("--fp16", action="store_true", help="U-Net and text encoders in fp16 (the VAE stays fp32)")
    g.add_argument("--bf16", action="store_true", help="U-Net, text encoders and VAE in bf16")
    g.add_argument("--no_half_vae", action="store_true", help="decode with the VAE in fp32")
    g.add_argument("--xformers", action="store_true", help="accepted; PyTorch SDPA attention is always used")
    g.add_argument("--sdpa", action="store_true", help="accepted; PyTorch SDPA attention is always used")
    g.add_argument("--diffusers_xformers", action="store_true", help="accepted; SDPA is always used")
    g.add_argument("--opt_channels_last", action="store_true", help="U-Net in channels-last memory format")
    g.add_argument("--cuda_graphs", type=str.lower, default="auto", choices=("auto", "off"),
                   help="auto (default): on a CUDA GPU, replay the U-Net calls of each sampling loop as CUDA graphs "
                   "(the same images, far fewer host launches; not with Deep Shrink prompts); off: eager calls")
    g.add_argument("--torch_compile", action="store_true",
                   help="compile the U-Net's repeated transformer blocks with torch.compile (regional: about a "
                   "minute before the first image, cached on disk for later runs; later images faster)")
    g.add_argument("--dynamo_dynamic", action="store_true",
                   help="with --torch_compile: dynamic shapes, one compile for every image size and batch")
    g.add_argument("--dynamo_mode", type=str, default=None,
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode for --torch_compile")
    g.add_argument("--vae_batch_size", type=float, default=None,
                   help="images per VAE decode (a value < 1 is a fraction of --batch_size)")
    g.add_argument("--vae_slices", type=int, default=None, help="accepted; ignored (decode is batched instead)")
    g.add_argument("--device", type=str, default=None, help="cuda, cuda:1, cpu ... (default: cuda when available)")


def _add_networks(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("networks (LoRA)")
    g.add_argument("--network_module", type=str, nargs="*", default=None, help="module per network (networks.lora)")
    g.add_argument("--network_weights", type=str, nargs="*", default=None, help="network files")
    g.add_argument("--network_mul", type=float, nargs="*", default=None, help="multiplier per network (default 1)")
    g.add_argument("--network_args", type=str, nargs="*", default=None,
                   help="per network: 'key=value;key=value' passed to create_network_from_weights")
    g.add_argument("--network_show_meta", action="store_true", help="print each network file's metadata")
    g.add_argument("--network_merge", action="store_true", help="bake the networks into the weights (no --am)")
    g.add_argument("--network_merge_n_models", type=int, default=None, help="bake only the first N networks")
    g.add_argument("--network_pre_calc", action="store_true", help="accepted; networks are applied on the fly")


def _add_control(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ControlNet-LLLite")
    g.add_argument("--control_net_lllite_models", type=str, nargs="*", default=None,
                   help="ControlNet-LLLite files (sd-scripts / ComfyUI layout); all use the same guide image")
    g.add_argument("--guide_image_path", type=str, nargs="*", default=None,
                   help="guide image(s), used in turn by the generated images (a prompt's --cn overrides); "
                        "resized to the output size, no preprocessing")
    g.add_argument("--control_net_multipliers", type=float, nargs="*", default=None,
                   help="strength per LLLite model (default 1.0; the last value repeats)")
    g.add_argument("--control_net_ratios", type=float, nargs="*", default=None,
                   help="fraction of the steps (from the first) that use each LLLite model (default 1.0)")


def build_parser() -> argparse.ArgumentParser:
    """The ``sdxl_gen_img.py`` argument parser (sd-scripts option names and defaults)."""
    p = argparse.ArgumentParser(prog="sdxl_gen_img.py", description="SDXL text-to-image generation")
    _add_core(p)
    _add_sampling(p)
    _add_precision(p)
    _add_networks(p)
    from library.inference.gen_features import add_feature_arguments

    add_feature_arguments(p)
    _add_control(p)
    g = p.add_argument_group("recognised sd-scripts options that are not supported (an error if given)")
    for name, what in UNSUPPORTED:
        g.add_argument(f"--{name}", nargs="*", default=None, help=f"not supported ({what})")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line."""
    return build_parser().parse_args(argv)


def _check_positive(args: argparse.Namespace, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1 (got {value})")


def validate_args(args: argparse.Namespace) -> None:
    """Check the options before loading anything; raise :class:`UserError` with a one-line reason."""
    for name, what in UNSUPPORTED:
        if getattr(args, name) is not None:
            raise UserError(f"--{name} ({what}) is not supported by this sdxl_gen_img.py yet; "
                            "see docs/gen_img.md for what is")
    if not args.ckpt:
        raise UserError("--ckpt is required (an SDXL .safetensors/.ckpt file or a diffusers folder)")
    if not Path(args.ckpt).exists():
        raise UserError(f"--ckpt: {args.ckpt} not found")
    if args.vae and not Path(args.vae).exists():
        raise UserError(f"--vae: {args.vae} not found")
    if args.prompt is None and args.from_file is None and args.image_path is None and not args.interactive:
        raise UserError("give --prompt or --from_file (or --image_path with prompts in its PNGs, or --interactive)")
    if args.prompt is not None and args.from_file is not None:
        raise UserError("give either --prompt or --from_file, not both")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 are exclusive")
    _check_positive(args, ("images_per_prompt", "n_iter", "batch_size", "steps", "max_embeddings_multiples",
                           "W", "H", "network_merge_n_models"))
    from library.inference.gen_features import validate_feature_args

    validate_feature_args(args)
    from library.inference.samplers import canonical_sampler_name

    args.sampler = canonical_sampler_name(args.sampler)
    for file in (args.textual_inversion_embeddings or []) + (args.network_weights or []):
        if not Path(file).is_file():
            raise UserError(f"{file} not found (--textual_inversion_embeddings / --network_weights)")
    if args.network_mul and len(args.network_mul) > len(args.network_weights or []):
        raise UserError(f"--network_mul has {len(args.network_mul)} values for "
                        f"{len(args.network_weights or [])} --network_weights files")
    _validate_control(args)
    if args.vae_batch_size is not None and args.vae_batch_size <= 0:
        raise UserError("--vae_batch_size must be positive")
    if args.clip_skip is not None:
        logger.warning("--clip_skip is ignored: SDXL always uses the penultimate text-encoder layers")
    if args.vae_slices is not None:
        logger.warning("--vae_slices is ignored; use --vae_batch_size to lower VAE memory")


def _validate_control(args: argparse.Namespace) -> None:
    """ControlNet-LLLite options: files exist, one multiplier/ratio per model at most, ratios in (0, 1]."""
    from library.inference.control import check_ratios

    models = args.control_net_lllite_models or []
    for file in models + (args.guide_image_path or []):
        if not Path(file).is_file():
            raise UserError(f"{file} not found (--control_net_lllite_models / --guide_image_path)")
    if not models and (args.guide_image_path or args.control_net_multipliers or args.control_net_ratios):
        raise UserError("--guide_image_path / --control_net_multipliers / --control_net_ratios need "
                        "--control_net_lllite_models")
    check_ratios(args.control_net_multipliers, len(models), "control_net_multipliers")
    check_ratios(args.control_net_ratios, len(models), "control_net_ratios")


def read_prompts(prompt: Optional[str], from_file: Optional[str]) -> list[PromptSpec]:
    """The prompt specs of ``--prompt`` (one line with inline options) or ``--from_file``."""
    specs = [parse_prompt_line(prompt)] if prompt is not None else load_prompt_file(from_file)
    if not specs:
        raise UserError(f"{from_file}: no prompts found")
    return specs


_IGNORED_FIELDS = ("clip_prompt",)


@dataclass
class ImageJob:
    """One image to generate: its prompt spec (defaults filled in, dynamic prompts resolved) and seed."""

    spec: PromptSpec
    seed: int
    images: Any = None  # img2img / inpainting sources of this image (gen_features.JobImages)

    def batch_key(self) -> tuple:
        """Settings that must be equal for images to share a U-Net batch."""
        s = self.spec
        return (s.width, s.height, s.steps, s.scale, s.negative_scale, s.sampler, s.original_width,
                s.original_height, s.original_width_negative, s.original_height_negative, s.crop_top, s.crop_left,
                tuple(s.network_multipliers or ()), s.strength, s.ds_depth_1, s.ds_timesteps_1, s.ds_depth_2,
                s.ds_timesteps_2, s.ds_ratio, s.gradual_latent_timesteps, s.gradual_latent_ratio,
                s.gradual_latent_every_n_steps, s.gradual_latent_ratio_step, s.gradual_latent_s_noise,
                s.gradual_latent_unsharp_params)


class _SeedStream:
    """``first`` and then seeds drawn from ``random.Random(first)``; can restart (``--iter_same_seed``)."""

    def __init__(self, first: int):
        self.first = first
        self.restart()

    def restart(self) -> None:
        self._rng = random.Random(self.first)
        self._started = False

    def next(self) -> int:
        if not self._started:
            self._started = True
            return self.first
        return self._rng.randint(0, MAX_SEED)


def _image_prompts(spec: PromptSpec, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, negative) per image: an enumeration {e$$..} gives one image per variant; random picks
    are drawn again for every image."""
    variants = expand_dynamic_prompts(spec.prompt, rng)
    if len(variants) > 1:
        return [(v, expand_dynamic_prompts(spec.negative_prompt or "", rng)[0]) for v in variants]
    result = [(variants[0], expand_dynamic_prompts(spec.negative_prompt or "", rng)[0])]
    for _ in range(count - 1):
        result.append((expand_dynamic_prompts(spec.prompt, rng)[0],
                       expand_dynamic_prompts(spec.negative_prompt or "", rng)[0]))
    return result


def plan_jobs(specs: Sequence[PromptSpec], images_per_prompt: int = 1, n_iter: int = 1, seed: Optional[int] = None,
              iter_same_seed: bool = False) -> list[ImageJob]:
    """One job per image, in generation order (iteration, prompt, image).

    ``specs`` must already have their defaults filled (:meth:`PromptSpec.with_defaults`). Seeds: a
    prompt's own ``--d`` seeds come first (one image per seed, at least ``images_per_prompt``
    images); the rest come from one stream that starts with ``seed`` itself (random when None)
    and continues with ``random.Random(seed)``; ``iter_same_seed`` restarts it every iteration.
    """
    stream = _SeedStream(seed if seed is not None else random.randint(0, MAX_SEED))
    prompt_rng = random.Random(seed)
    jobs: list[ImageJob] = []
    warned: set[str] = set()
    for iteration in range(n_iter):
        if iteration and iter_same_seed:
            stream.restart()
        for spec in specs:
            for name in _IGNORED_FIELDS:
                if getattr(spec, name) is not None and name not in warned:
                    warned.add(name)
                    logger.warning("prompt option for %s is not supported and is ignored", name)
            own = list(spec.seeds or [])
            for i, (prompt, negative) in enumerate(_image_prompts(spec, max(images_per_prompt, len(own)), prompt_rng)):
                image_seed = own[i] if i < len(own) else stream.next()
                jobs.append(ImageJob(dataclasses.replace(spec, prompt=prompt, negative_prompt=negative,
                                                         seeds=[image_seed]), image_seed))
    return jobs


def batches(jobs: Sequence[ImageJob], batch_size: int) -> Iterator[list[ImageJob]]:
    """Consecutive runs of jobs with equal :meth:`ImageJob.batch_key`, at most ``batch_size`` each."""
    current: list[ImageJob] = []
    for job in jobs:
        if current and (len(current) >= batch_size or job.batch_key() != current[0].batch_key()):
            yield current
            current = []
        current.append(job)
    if current:
        yield current


def image_params(job: ImageJob, common: dict[str, Any]) -> dict[str, Any]:
    """The parameters written into the PNG (png_metadata's names) for one generated image."""
    s = job.spec
    params = dict(prompt=s.prompt, negative_prompt=s.negative_prompt, seed=job.seed, sampler=s.sampler,
                  steps=s.steps, scale=s.scale, negative_scale=s.negative_scale, width=s.width, height=s.height,
                  original_width=s.original_width, original_height=s.original_height,
                  original_width_negative=s.original_width_negative,
                  original_height_negative=s.original_height_negative, crop_top=s.crop_top, crop_left=s.crop_left)
    if s.raw_prompt and s.raw_prompt != s.prompt:
        params["raw_prompt"] = s.raw_prompt
    if s.network_multipliers is not None:
        params["network_multipliers"] = list(s.network_multipliers)
    params.update(common)
    return {k: v for k, v in params.items() if v is not None}


def vae_batch(vae_batch_size: Optional[float], batch_size: int) -> Optional[int]:
    """Images per VAE decode: ``--vae_batch_size`` as a count, or a fraction (< 1) of ``batch_size``."""
    if vae_batch_size is None:
        return None
    if vae_batch_size < 1:
        return max(1, int(batch_size * vae_batch_size))
    return int(vae_batch_size)
