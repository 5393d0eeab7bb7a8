#!/usr/bin/env python
"""SDXL text-to-image generation with sd-scripts' ``sdxl_gen_img.py`` command line.

    python sdxl_gen_img.py --ckpt sd_xl_base_1.0.safetensors --outdir out \\
        --prompt "a cat on a sofa --n blurry, lowres --d 42" --W 1024 --H 1024 --steps 30 --sampler euler_a

LoRA: ``--network_module networks.lora --network_weights a.safetensors b.safetensors --network_mul 0.8 0.5``;
textual inversion: ``--textual_inversion_embeddings emb.safetensors`` (say ``emb`` in the prompt);
img2img / inpainting ``--image_path --mask_path --strength``; highres fix ``--highres_fix_scale 0.5``;
Deep Shrink ``--ds_depth_1 3``; Gradual Latent ``--gradual_latent_timesteps 650``.
ControlNet-LLLite: ``--control_net_lllite_models c.safetensors --guide_image_path edges.png``.
Every option and the prompt syntax: docs/gen_img.md.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import UserError, run_cli  # noqa: E402

logger = logging.getLogger("sdxl_gen_img")


def _device_and_dtype(args):
    import torch

    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available here")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    return device, dtype


def _prompt_specs(args, ga, specs=None):
    specs = specs if specs is not None else ga.read_prompts(args.prompt, args.from_file)
    if args.network_merge and any(s.network_multipliers is not None for s in specs):
        logger.warning("--am is ignored with --network_merge (the networks are baked in)")
    files = args.network_weights or []
    multipliers = (list(args.network_mul or []) + [1.0] * len(files))[:len(files)] or None  # one per file
    return [s.with_defaults(
        width=args.W or 1024, height=args.H or 1024, steps=args.steps, scale=args.scale, negative_prompt="",
        strength=args.strength, negative_scale=args.negative_scale, sampler=args.sampler, network_multipliers=multipliers,
        original_width=args.original_width, original_height=args.original_height,
        original_width_negative=args.original_width_negative, original_height_negative=args.original_height_negative,
        crop_top=args.crop_top or 0, crop_left=args.crop_left or 0) for s in specs]


def _build_generator(args, device, dtype):
    from library.inference import gen_features as gf
    from library.inference import pipeline as pl
    from library.models.checkpoint_io import load_sdxl, read_safetensors_metadata
    from library.models.tokenizers import load_tokenizers

    models = load_sdxl(args.ckpt, dtype=None, device="cpu", vae=args.vae)
    tokenizers = load_tokenizers(args.tokenizer_cache_dir)
    replacements = {}
    for file in args.textual_inversion_embeddings or []:
        trigger, tokens = pl.load_textual_inversion(file, tokenizers, [models.text_encoder1, models.text_encoder2])
        replacements[trigger] = " ".join(tokens)
    gen = pl.SDXLGenerator.from_models(models, tokenizers, dtype=dtype, device=device, no_half_vae=args.no_half_vae,
                                       v_parameterization=args.v_parameterization,
                                       zero_terminal_snr=args.zero_terminal_snr, channels_last=args.opt_channels_last)
    gen.token_replacements.update(replacements)
    files = args.network_weights or []
    if args.network_show_meta:
        for file in files:
            meta = read_safetensors_metadata(file) if file.endswith(".safetensors") else {}
            print(f"{file}: " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items())))
    network_args = [pl.parse_network_args(a.split(";")) for a in args.network_args or []]
    networks = pl.load_networks(args.network_module or ["networks.lora"], files, args.network_mul or [], gen.unet,
                                gen.vae, gen.text_encoders, dtype, device, merge=args.network_merge,
                                merge_count=args.network_merge_n_models, network_args=network_args)
    gf.install_deep_shrink(gen, args)  # before torch.compile
    gf.set_cuda_graphs(gen, args)
    if args.control_net_lllite_models:  # after LoRA, before torch.compile
        from library.inference.control import LLLiteControl
        from networks.control_net_lllite import load_for_inference

        nets = [load_for_inference(f, gen.unet, device=device, dtype=dtype) for f in args.control_net_lllite_models]
        gen.unet_hooks.append(LLLiteControl.from_options(nets, args.control_net_multipliers, args.control_net_ratios))
    if args.torch_compile:  # after LoRA hooks are in place, so they are traced into the graph
        from library.models.regional_compile import CompileSettings, compile_unet_regions

        compile_unet_regions(gen.unet, CompileSettings(mode=args.dynamo_mode, dynamic=args.dynamo_dynamic))
    return gen, networks


def _common_params(args) -> dict:
    return {"ckpt": Path(args.ckpt).name, "vae": Path(args.vae).name if args.vae else None,
            "network_weights": [Path(f).name for f in args.network_weights] if args.network_weights else None,
            "network_merge": args.network_merge or None,
            "textual_inversion_embeddings": [Path(f).name for f in args.textual_inversion_embeddings]
            if args.textual_inversion_embeddings else None,
            "max_embeddings_multiples": args.max_embeddings_multiples,
            "v_parameterization": args.v_parameterization or None}


def _generate_all(args, ga, gen, networks, jobs, highres=None, guides=None) -> list[Path]:
    from library.inference import gen_features as gf
    from library.inference import pipeline as pl
    from library.inference.control import lllite_control
    from library.inference.image_writer import ImageWriter

    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    prefix = "1" if highres else ""  # sd-scripts' stage mark in the file names
    sequence = pl.next_sequence_number(outdir, prefix) if args.sequential_file_name else None
    common, count = _common_params(args), 0
    vae_batch = ga.vae_batch(args.vae_batch_size, args.batch_size)
    control = lllite_control(gen) if guides else None  # ControlNet-LLLite: one guide image per generated image
    with ImageWriter() as writer:  # PNGs are compressed and written while the GPU makes the next batch
        for batch in ga.batches(jobs, args.batch_size):
            s = batch[0].spec
            if networks and not args.network_merge:
                merged = len(args.network_weights) - len(networks)
                pl.set_network_multipliers(networks, s.network_multipliers, skip=merged)
            if control is not None:
                control.prepare(gen.unet, guides[count:count + len(batch)], s.width, s.height, gen.device, gen.dtype)
            stamp = time.strftime("%Y%m%d%H%M%S")
            kwargs = gf.generate_kwargs(batch, args.max_embeddings_multiples, vae_batch)
            save_first = None
            if highres and highres.save_1st:  # the first stage's images, named with sd-scripts' "0" stage mark
                first_names = gf.batch_names(batch, args, count, stamp, sequence, "0")
                save_first = functools.partial(_save_first, writer, args, outdir, batch, first_names, common)
            images = gf.run_batch(gen, batch, args, kwargs, highres, save_first)
            if control is not None:
                control.clear()
            names = gf.batch_names(batch, args, count, stamp, sequence, prefix)
            writer.submit(gf.save_images, args, outdir, batch, images, names, common)
            count += len(batch)
            sequence = sequence + len(batch) if sequence is not None else None
    return writer.results


def _save_first(writer, args, outdir, batch, names, common, images, first_stage) -> None:
    from library.inference import gen_features as gf

    writer.submit(gf.save_images, args, outdir, batch, images, names, common, first_stage)


def _guides(args, jobs) -> list[str] | None:
    """One ControlNet-LLLite guide image per job (a prompt's ``--cn`` wins), or None without LLLite."""
    if not args.control_net_lllite_models:
        return None
    from library.inference.control import guide_paths

    return guide_paths([j.spec for j in jobs], args.guide_image_path)


def main(argv=None) -> list[Path]:
    """Parse the command line, load the models, generate and save every image; returns the written paths."""
    from library.inference import gen_args as ga
    from library.inference import gen_features as gf

    args = ga.parse_args(argv)
    gf.configure_logging(args)
    ga.validate_args(args)
    from library.output_dir import check_writable_dir

    check_writable_dir(args.outdir, "--outdir")  # before loading: a file or read-only folder is one line
    images, masks = gf.load_sources(args)
    from_images = args.prompt is None and args.from_file is None and not args.interactive  # prompts in the PNGs
    jobs = [] if args.interactive else gf.plan(args, _prompt_specs(
        args, ga, gf.specs_from_images(images) if from_images else None), images, masks, from_images)
    guides = _guides(args, jobs)  # every guide image checked before any model loads
    device, dtype = _device_and_dtype(args)
    logger.info("%d image(s) on %s in %s", len(jobs), device, str(dtype).replace("torch.", ""))
    gen, networks = _build_generator(args, device, dtype)
    highres = gf.highres_from_args(args, device, dtype)
    if args.interactive:  # one prompt line at a time from stdin, until end of input
        def one_line(line: str) -> list[Path]:
            line_jobs = gf.plan(args, _prompt_specs(args, ga, [ga.parse_prompt_line(line)]), images, masks)
            return _generate_all(args, ga, gen, networks, line_jobs, highres, _guides(args, line_jobs))
        written = gf.interactive(one_line)
    else:
        written = _generate_all(args, ga, gen, networks, jobs, highres, guides)
    logger.info("done: %d image(s) in %s", len(written), args.outdir)
    return written


if __name__ == "__main__":
    run_cli(main)
