"""``sdxl_gen_img.py`` beyond text-to-image: options, checks and per-image plumbing (sd-scripts' names).

img2img and inpainting (:mod:`library.inference.img2img`), the highres fix
(:mod:`library.inference.highres`), Deep Shrink (:mod:`library.inference.deep_shrink`), Gradual
Latent (:mod:`library.inference.gradual_latent`) and the console-log options. The namespace stops
here: the modules above take plain values and typed settings.

Refused with one line (sd-scripts features we do not implement): regional prompting (`` AND `` in a
prompt, and ``--mask_path`` together with LoRA networks that are not merged, which sd-scripts
treats as regional-LoRA masks rather than inpainting).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from library.errors import UserError

logger = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_SIZE = 1024


def _add_img2img(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("img2img and inpainting")
    g.add_argument("--image_path", type=str, default=None,
                   help="init image file or folder (png/jpg/jpeg/webp, used in turn); without prompts, the "
                        "prompts come from the images' PNG metadata")
    g.add_argument("--mask_path", type=str, default=None,
                   help="inpainting mask file or folder (white = repaint, black = keep; grey = partly)")
    g.add_argument("--strength", type=float, default=None,
                   help="img2img strength 0..1 (default 0.8; also the highres fix's second stage); prompt: --t")


def _add_highres(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("highres fix")
    g.add_argument("--highres_fix_scale", type=float, default=None,
                   help="enable the highres fix: first stage at this fraction of --W/--H (e.g. 0.5)")
    g.add_argument("--highres_fix_steps", type=int, default=28, help="steps of the first stage (default 28)")
    g.add_argument("--highres_fix_strength", type=float, default=None,
                   help="img2img strength of the first stage when it is img2img (default: --strength)")
    g.add_argument("--highres_fix_save_1st", action="store_true", help="also save the first-stage images")
    g.add_argument("--highres_fix_latents_upscaling", action="store_true",
                   help="upscale the latents bilinearly (default: decode, LANCZOS-resize, encode)")
    g.add_argument("--highres_fix_upscaler", type=str, default=None,
                   help="Python module with create_upscaler(**kwargs) (sd-scripts' upscaler protocol)")
    g.add_argument("--highres_fix_upscaler_args", type=str, default=None,
                   help="'key=value;key=value' for create_upscaler")
    g.add_argument("--highres_fix_disable_control_net", action="store_true",
                   help="switch control adapters (ControlNet-LLLite) off in the second stage")


def _add_deep_shrink(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Deep Shrink (prompt options --dsd1 --dst1 --dsd2 --dst2 --dsr)")
    g.add_argument("--ds_depth_1", type=int, default=None,
                   help="enable Deep Shrink at this U-Net input block (0-8; 3 is common)")
    g.add_argument("--ds_timesteps_1", type=int, default=650, help="shrink depth 1 while timestep >= this (650)")
    g.add_argument("--ds_depth_2", type=int, default=None, help="second depth, shrunk below --ds_timesteps_1")
    g.add_argument("--ds_timesteps_2", type=int, default=650, help="shrink depth 2 while timestep >= this (650)")
    g.add_argument("--ds_ratio", type=float, default=0.5, help="Deep Shrink downscale ratio (0.5)")


def _add_gradual_latent(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Gradual Latent, euler_a only (prompt options --glt --glr --gls --gle --glsn --glus)")
    g.add_argument("--gradual_latent_timesteps", type=int, default=None,
                   help="enable Gradual Latent: start growing the latent below this timestep")
    g.add_argument("--gradual_latent_ratio", type=float, default=0.5, help="starting size ratio (0.5)")
    g.add_argument("--gradual_latent_ratio_step", type=float, default=0.125, help="ratio added per growth (0.125)")
    g.add_argument("--gradual_latent_every_n_steps", type=int, default=3, help="grow every N steps (3)")
    g.add_argument("--gradual_latent_s_noise", type=float, default=1.0, help="noise scale at growth steps (1.0)")
    g.add_argument("--gradual_latent_unsharp_params", type=str, default=None,
                   help="unsharp mask 'ksize,sigma,strength[,target_x]', e.g. 3,0.5,0.5,1")


def _add_logging(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("interactive mode and console log")
    g.add_argument("--interactive", action="store_true",
                   help="read prompts (with inline options) from stdin, one line at a time, until end of input; "
                        "--n_iter is 1")
    g.add_argument("--console_log_level", type=str.upper, default=None, choices=LOG_LEVELS,
                   help="log level (default INFO)")
    g.add_argument("--console_log_file", type=str, default=None, help="also write the log to this file")
    g.add_argument("--console_log_simple", action="store_true",
                   help="accepted; the log is always plain text lines")


def add_feature_arguments(p: argparse.ArgumentParser) -> None:
    """Add the img2img, highres-fix, Deep Shrink, Gradual Latent and console-log option groups."""
    _add_img2img(p)
    _add_highres(p)
    _add_deep_shrink(p)
    _add_gradual_latent(p)
    _add_logging(p)


def configure_logging(args: argparse.Namespace) -> None:
    """Console logging from --console_log_level / --console_log_file."""
    level = getattr(logging, args.console_log_level or "INFO")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.console_log_file:
        try:
            handlers.append(logging.FileHandler(args.console_log_file, encoding="utf-8"))
        except OSError as exc:
            raise UserError(f"--console_log_file: cannot write {args.console_log_file}: {exc}") from None
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    for noisy in ("transformers", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    logging.getLogger("diffusers").setLevel(max(level, logging.ERROR))


def _check_fraction(value: Optional[float], option: str, low_open: bool = False) -> None:
    if value is not None and (value > 1.0 or value < 0.0 or (low_open and value == 0.0)):
        raise UserError(f"--{option} {value}: must be between 0 and 1")


def validate_feature_args(args: argparse.Namespace) -> None:
    """Check the feature options before any model loads (one-line :class:`UserError` each)."""
    from library.inference.deep_shrink import deep_shrink_settings
    from library.inference.gradual_latent import check_sampler, gradual_latent_settings

    for option in ("image_path", "mask_path"):
        value = getattr(args, option)
        if value is not None and not Path(value).exists():
            raise UserError(f"--{option}: {value} not found")
    if args.mask_path and not args.image_path:
        raise UserError("--mask_path needs --image_path (the image to inpaint)")
    if args.mask_path and args.network_weights and not args.network_merge and \
            (args.network_merge_n_models or 0) < len(args.network_weights):
        raise UserError("--mask_path with LoRA networks that are not merged is sd-scripts' regional LoRA, which is "
                        "not supported; add --network_merge to inpaint with the networks baked in")
    _check_fraction(args.strength, "strength")
    _check_fraction(args.highres_fix_strength, "highres_fix_strength")
    _check_fraction(args.highres_fix_scale, "highres_fix_scale", low_open=True)
    if args.highres_fix_steps < 1:
        raise UserError("--highres_fix_steps must be at least 1")
    if args.highres_fix_upscaler_args and not args.highres_fix_upscaler:
        raise UserError("--highres_fix_upscaler_args needs --highres_fix_upscaler")
    if args.highres_fix_scale is None and any(getattr(args, o) for o in (
            "highres_fix_save_1st", "highres_fix_latents_upscaling", "highres_fix_upscaler")):
        raise UserError("--highres_fix_save_1st/--highres_fix_latents_upscaling/--highres_fix_upscaler need "
                        "--highres_fix_scale")
    deep_shrink_settings(args.ds_depth_1, args.ds_timesteps_1, args.ds_depth_2, args.ds_timesteps_2, args.ds_ratio)
    if gradual_latent_settings(args.gradual_latent_timesteps, args.gradual_latent_ratio,
                               args.gradual_latent_ratio_step, args.gradual_latent_every_n_steps,
                               args.gradual_latent_s_noise, args.gradual_latent_unsharp_params) is not None:
        check_sampler(args.sampler)
        if args.mask_path:
            raise UserError("Gradual Latent cannot be combined with inpainting (--mask_path)")
    if args.interactive:
        if args.prompt is not None or args.from_file is not None:
            raise UserError("--interactive reads the prompts from stdin: leave out --prompt / --from_file")
        args.n_iter = 1  # as sd-scripts
    if args.console_log_file and Path(args.console_log_file).is_dir():
        raise UserError(f"--console_log_file: {args.console_log_file} is a folder")


# ---- per prompt ------------------------------------------------------------------------------------------
_DS_FIELDS = ("ds_depth_1", "ds_timesteps_1", "ds_depth_2", "ds_timesteps_2", "ds_ratio")
_GL_FIELDS = ("gradual_latent_timesteps", "gradual_latent_ratio", "gradual_latent_ratio_step",
              "gradual_latent_every_n_steps", "gradual_latent_s_noise", "gradual_latent_unsharp_params")


def _pick(spec, args, name):
    value = getattr(spec, name)
    return getattr(args, name) if value is None else value


def deep_shrink_for(spec, args: argparse.Namespace):
    """The Deep Shrink settings of one prompt: the command line, or the prompt's --dsd1 ... options.

    As in sd-scripts, any Deep Shrink prompt option switches it on for that prompt (depth 1 from
    --dsd1, else --ds_depth_1, else 3); unlike sd-scripts it does not stay on for the next prompts.
    """
    from library.inference.deep_shrink import deep_shrink_settings

    values = {name: _pick(spec, args, name) for name in _DS_FIELDS}
    if any(getattr(spec, name) is not None for name in _DS_FIELDS) and values["ds_depth_1"] is None:
        values["ds_depth_1"] = 3
    return deep_shrink_settings(*(values[name] for name in _DS_FIELDS))


def gradual_latent_for(spec, args: argparse.Namespace):
    """The Gradual Latent settings of one prompt (command line or the prompt's --glt ... options)."""
    from library.inference.gradual_latent import gradual_latent_settings

    values = {name: _pick(spec, args, name) for name in _GL_FIELDS}
    if any(getattr(spec, name) is not None for name in _GL_FIELDS) and values["gradual_latent_timesteps"] is None:
        values["gradual_latent_timesteps"] = 650
    return gradual_latent_settings(*(values[name] for name in _GL_FIELDS))


def check_jobs(jobs: Sequence, args: argparse.Namespace) -> None:
    """Per-image checks after planning: regional prompts, Gradual Latent samplers, prompt option ranges."""
    from library.inference.gradual_latent import check_sampler

    for job in jobs:
        if " AND " in job.spec.prompt:
            raise UserError(f"prompt {job.spec.prompt[:60]!r}: ' AND ' is sd-scripts' regional prompting, which is "
                            "not supported (write 'and' for plain text)")
        deep_shrink_for(job.spec, args)
        if gradual_latent_for(job.spec, args) is not None:
            check_sampler(job.spec.sampler)
            if args.mask_path:
                raise UserError("Gradual Latent cannot be combined with inpainting (--mask_path)")


# ---- init images -----------------------------------------------------------------------------------------
@dataclass
class JobImages:
    """The init image and mask (``SourceImage`` or ``None``) of one generated image."""

    init: Any = None
    mask: Any = None


def load_sources(args: argparse.Namespace) -> tuple[list, list]:
    """(init images, masks) of --image_path / --mask_path, resized to --W x --H (scaled for the highres fix)."""
    from library.inference.img2img import load_images, resize_images

    images = load_images(args.image_path, "--image_path") if args.image_path else []
    masks = load_images(args.mask_path, "--mask_path") if args.mask_path else []
    if (args.W is not None and args.H is not None) or (args.highres_fix_scale and images):
        w, h = args.W or DEFAULT_SIZE, args.H or DEFAULT_SIZE
        if args.highres_fix_scale:
            from library.inference.highres import first_stage_size

            w, h = first_stage_size(w, h, args.highres_fix_scale)
        images, masks = resize_images(images, (w, h)), resize_images(masks, (w, h))
    return images, masks


def prompts_from_images(images: Sequence) -> list[str]:
    """Prompt lines from the init images' PNG text (sd-scripts' ``prompt`` / ``negative-prompt`` keys)."""
    lines = []
    for source in images:
        prompt = source.image.info.get("prompt")
        if prompt is None:
            logger.warning("%s has no 'prompt' in its PNG metadata; an empty prompt is used", source.path)
            prompt = ""
        negative = source.image.info.get("negative-prompt")
        lines.append(prompt + (f" --n {negative}" if negative else ""))
    return lines


def attach_images(jobs: Sequence, n_iter: int, images: Sequence, masks: Sequence, highres: bool,
                  repeat: int = 1) -> None:
    """Give every job its init image and mask (used in turn, counting from 0 in each --n_iter iteration).

    Without the highres fix the image size becomes the init image's (rounded down to /32).
    ``repeat`` > 1 uses each image that many times in a row (prompts read from the images).
    """
    from library.inference.img2img import output_size

    if not images:
        return
    for init, mask in zip(images, masks or [None] * len(images)):
        if min(output_size(init.image)) < 32:
            raise UserError(f"--image_path: {init.path} is {init.image.size[0]}x{init.image.size[1]}; "
                            "img2img needs at least 32x32")
    per_iter = max(1, len(jobs) // max(1, n_iter))
    for k, job in enumerate(jobs):
        step = (k % per_iter) // repeat
        job.images = JobImages(images[step % len(images)], masks[step % len(masks)] if masks else None)
        init, mask = job.images.init, job.images.mask
        if mask is not None and output_size(mask.image) != output_size(init.image):
            raise UserError(f"--mask_path: {mask.path} ({mask.image.size[0]}x{mask.image.size[1]}) does not fit "
                            f"{init.path} ({init.image.size[0]}x{init.image.size[1]}); give masks of the image "
                            "size, or --W and --H to resize both")
        if not highres:
            w, h = output_size(job.images.init.image)
            if (w, h) != job.images.init.image.size:
                logger.warning("init image %s is %dx%d: resized to %dx%d (multiples of 32)", job.images.init.path,
                               *job.images.init.image.size, w, h)
            job.spec = dataclasses.replace(job.spec, width=w, height=h)


def init_for(batch: Sequence, strength: float):
    """The :class:`~library.inference.img2img.InitImage` of a batch (``None`` for text-to-image)."""
    from library.inference.img2img import InitImage, mask_to_latent

    if batch[0].images is None:
        return None
    import torch

    masks = [j.images.mask for j in batch]
    mask = torch.cat([mask_to_latent(m.image) for m in masks]) if masks[0] is not None else None
    return InitImage(images=[j.images.init.image for j in batch], strength=strength, mask=mask)


def job_strength(job, args: argparse.Namespace) -> float:
    """The img2img strength of a job: --t, else --strength, else 0.8."""
    value = job.spec.strength if job.spec.strength is not None else args.strength
    return 0.8 if value is None else float(value)


def image_params_extra(job, args: argparse.Namespace, first_stage: Optional[dict] = None) -> dict:
    """PNG parameters of the features used for this image (strength, sources, highres, Deep Shrink ...).

    ``first_stage``: the generate() arguments of a saved highres-fix first stage (its size and steps).
    """
    params: dict[str, Any] = {}
    if first_stage:
        params.update(width=first_stage["width"], height=first_stage["height"], steps=first_stage["steps"],
                      highres_fix_stage=1)
    if job.images is not None:
        params["init_image"] = job.images.init.path.name
        if job.images.mask is not None:
            params["mask_image"] = job.images.mask.path.name
    if job.images is not None or args.highres_fix_scale:
        params["strength"] = job_strength(job, args)
    if args.highres_fix_scale:
        params.update(highres_fix_scale=args.highres_fix_scale, highres_fix_steps=args.highres_fix_steps)
    ds = deep_shrink_for(job.spec, args)
    if ds is not None:
        params["deep_shrink"] = dataclasses.asdict(ds)
    gl = gradual_latent_for(job.spec, args)
    if gl is not None:
        params["gradual_latent"] = dataclasses.asdict(gl)
    return params


def highres_from_args(args: argparse.Namespace, device, dtype):
    """The :class:`~library.inference.highres.HighresFix` of the command line (``None`` when off)."""
    if not args.highres_fix_scale:
        return None
    from library.inference.highres import HighresFix, load_upscaler

    upscaler = (load_upscaler(args.highres_fix_upscaler, args.highres_fix_upscaler_args, device, dtype)
                if args.highres_fix_upscaler else None)
    return HighresFix(args.highres_fix_scale, args.highres_fix_steps, args.highres_fix_strength,
                      args.highres_fix_latents_upscaling, args.highres_fix_save_1st,
                      args.highres_fix_disable_control_net, upscaler)


def plan(args: argparse.Namespace, specs: Sequence, images: Sequence, masks: Sequence,
         from_images: bool = False) -> list:
    """The image jobs of prompt specs (defaults filled in), with their init images attached and checked."""
    from library.inference.gen_args import plan_jobs

    jobs = plan_jobs(specs, args.images_per_prompt, args.n_iter, args.seed, args.iter_same_seed)
    attach_images(jobs, args.n_iter, images, masks, bool(args.highres_fix_scale),
                  args.images_per_prompt if from_images else 1)
    check_jobs(jobs, args)
    return jobs


def install_deep_shrink(gen, args: argparse.Namespace) -> None:
    """Put Deep Shrink hooks on ``gen.unet`` (as ``gen.deep_shrink``) when any prompt may ask for it."""
    if may_deep_shrink(args):
        from library.inference.deep_shrink import DeepShrink  # inert until run_batch gives it settings

        gen.deep_shrink = DeepShrink(gen.unet)


def set_cuda_graphs(gen, args: argparse.Namespace) -> None:
    """``--cuda_graphs auto``: graphed U-Net calls on a CUDA device, unless a prompt may use Deep Shrink
    (its hooks change the U-Net's work by timestep, which a replay would not see)."""
    gen.cuda_graphs = args.cuda_graphs == "auto" and gen.device.type == "cuda"
    if gen.cuda_graphs and may_deep_shrink(args):
        gen.cuda_graphs = False
        logger.info("CUDA graphs off: Deep Shrink changes the U-Net's work by timestep")


def may_deep_shrink(args: argparse.Namespace) -> bool:
    """Whether Deep Shrink can be asked for (command line, or a prompt option starting with --ds)."""
    if args.ds_depth_1 is not None:
        return True
    text = args.prompt or ""
    if args.from_file:
        try:
            text = Path(args.from_file).read_text(encoding="utf-8-sig", errors="replace")
        except OSError:
            return False
    return "--ds" in text.lower()


def specs_from_images(images: Sequence) -> list:
    """Prompt specs read from the init images' PNG metadata (when neither --prompt nor --from_file is given)."""
    from library.inference.prompts import parse_prompt_line

    specs = [parse_prompt_line(line) for line in prompts_from_images(images)]
    if not specs:
        raise UserError("--image_path: no images, hence no prompts; give --prompt or --from_file")
    return specs


def batch_names(batch: Sequence, args: argparse.Namespace, first_index: int, stamp: str,
                sequence: Optional[int], prefix: str) -> list[str]:
    """Output file names of a batch (sd-scripts' patterns; ``prefix`` "0"/"1" marks highres-fix stages)."""
    from library.inference.pipeline import output_name

    names = []
    for i, job in enumerate(batch):
        if args.use_original_file_name and job.images is not None:
            names.append(f"{job.images.init.path.stem}{'_1st' if prefix == '0' else ''}.png")
        else:
            names.append(output_name(first_index + i, job.seed, stamp,
                                     None if sequence is None else sequence + i, prefix))
    return names


def run_batch(gen, batch: Sequence, args: argparse.Namespace, kwargs: dict, highres=None, save_first=None):
    """Generate one batch with the per-prompt features (init image, Deep Shrink, Gradual Latent, highres fix)."""
    s = batch[0].spec
    if getattr(gen, "deep_shrink", None) is not None:
        gen.deep_shrink.settings = deep_shrink_for(s, args)
    kwargs = dict(kwargs, init=init_for(batch, job_strength(batch[0], args)),
                  gradual_latent=gradual_latent_for(s, args))
    if highres is None:
        return gen.generate(**kwargs)
    from library.inference.highres import generate_highres

    return generate_highres(gen, dict(kwargs, strength=job_strength(batch[0], args)), highres, save_first)


def save_images(args: argparse.Namespace, outdir: Path, batch: Sequence, images: Sequence, names: Sequence[str],
                common: dict, first_stage: Optional[dict] = None) -> list[Path]:
    """Write a batch's PNGs (never over an existing file) with their generation parameters."""
    from library.inference.gen_args import image_params
    from library.inference.pipeline import save_image, unique_path

    paths = []
    for job, image, name in zip(batch, images, names):
        params = {**image_params(job, common), **image_params_extra(job, args, first_stage)}
        paths.append(save_image(image, unique_path(outdir / name), params))
        logger.info("saved %s (seed %d)", paths[-1], job.seed)
    return paths


def generate_kwargs(batch: Sequence, max_embeddings_multiples: int, vae_batch_size: Optional[int]) -> dict:
    """:meth:`SDXLGenerator.generate` arguments of a batch of jobs with equal settings (text-to-image part)."""
    s = batch[0].spec
    return dict(prompts=[j.spec.prompt for j in batch], negative_prompts=[j.spec.negative_prompt for j in batch],
                width=s.width, height=s.height, steps=s.steps, guidance_scale=s.scale, sampler=s.sampler,
                seeds=[j.seed for j in batch], original_size=(s.original_height, s.original_width),
                crop_top_left=(s.crop_top, s.crop_left),
                negative_original_size=(s.original_height_negative, s.original_width_negative),
                max_embeddings_multiples=max_embeddings_multiples, negative_scale=s.negative_scale,
                vae_batch_size=vae_batch_size)


def interactive(run, read=input) -> list[Path]:
    """Read prompt lines with ``read`` until end of input and ``run(line)`` each; returns every written path.

    Blank lines are skipped; a line with a mistake (a bad inline option ...) is reported and the
    session goes on.
    """
    written: list[Path] = []
    while True:
        logger.info("type a prompt (end of input to finish):")
        try:
            line = read()
        except EOFError:
            return written
        if not line.split(" --")[0].strip():
            continue
        try:
            written.extend(run(line))
        except UserError as exc:
            logger.error("%s", exc)
