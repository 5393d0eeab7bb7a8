#!/usr/bin/env python
"""SDXL text-to-image generation with sd-scripts' ``sdxl_gen_img.py`` command line.

    python sdxl_gen_img.py --ckpt sd_xl_base_1.0.safetensors --outdir out \\
        --prompt "a cat on a sofa --n blurry, lowres --d 42" --W 1024 --H 1024 --steps 30 --sampler euler_a

LoRA: ``--network_module networks.lora --network_weights a.safetensors b.safetensors --network_mul 0.8 0.5``;
textual inversion: ``--textual_inversion_embeddings emb.safetensors`` (say ``emb`` in the prompt);
ControlNet-LLLite: ``--control_net_lllite_models c.safetensors --guide_image_path edges.png``.
Every option and the prompt syntax: docs/gen_img.md.
"""

from __future__ import annotations

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


def _prompt_specs(args, ga):
    specs = ga.read_prompts(args.prompt, args.from_file)
    if args.network_merge and any(s.network_multipliers is not None for s in specs):
        logger.warning("--am is ignored with --network_merge (the networks are baked in)")
    files = args.network_weights or []
    multipliers = (list(args.network_mul or []) + [1.0] * len(files))[:len(files)] or None  # one per file
    return [s.with_defaults(
        width=args.W, height=args.H, steps=args.steps, scale=args.scale, negative_prompt="",
        negative_scale=args.negative_scale, sampler=args.sampler, network_multipliers=multipliers,
        original_width=args.original_width, original_height=args.original_height,
        original_width_negative=args.original_width_negative, original_height_negative=args.original_height_negative,
        crop_top=args.crop_top or 0, crop_left=args.crop_left or 0) for s in specs]


def _build_generator(args, device, dtype):
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
    _attach_lllite(args, gen, device, dtype)
    if args.torch_compile:  # after LoRA hooks are in place, so they are traced into the graph
        import torch

        gen.unet = torch.compile(gen.unet, mode=args.dynamo_mode)
    return gen, networks


def _attach_lllite(args, gen, device, dtype) -> None:
    """Hook each --control_net_lllite_models file onto the U-Net (after LoRA) and register the step hook."""
    if not args.control_net_lllite_models:
        return
    from library.inference.control import LLLiteControl, check_ratios
    from networks.control_net_lllite import load_for_inference

    count = len(args.control_net_lllite_models)
    nets = [load_for_inference(f, gen.unet, device=device, dtype=dtype) for f in args.control_net_lllite_models]
    gen.unet_hooks.append(LLLiteControl(nets, check_ratios(args.control_net_multipliers, count,
                                                           "control_net_multipliers"),
                                        check_ratios(args.control_net_ratios, count, "control_net_ratios")))
    logger.info("ControlNet-LLLite: %d model(s), %d modules", count, sum(len(n.unet_modules) for n in nets))


def _common_params(args) -> dict:
    return {"ckpt": Path(args.ckpt).name, "vae": Path(args.vae).name if args.vae else None,
            "network_weights": [Path(f).name for f in args.network_weights] if args.network_weights else None,
            "network_merge": args.network_merge or None,
            "textual_inversion_embeddings": [Path(f).name for f in args.textual_inversion_embeddings]
            if args.textual_inversion_embeddings else None,
            "max_embeddings_multiples": args.max_embeddings_multiples,
            "v_parameterization": args.v_parameterization or None}


def _generate_all(args, ga, gen, networks, jobs, guides=None) -> list[Path]:
    from library.inference import pipeline as pl
    from library.inference.control import LLLiteControl

    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sequence = pl.next_sequence_number(outdir) if args.sequential_file_name else None
    common, written = _common_params(args), []
    vae_batch = ga.vae_batch(args.vae_batch_size, args.batch_size)
    for batch in ga.batches(jobs, args.batch_size):
        s = batch[0].spec
        if networks and not args.network_merge:
            merged = len(args.network_weights) - len(networks)
            pl.set_network_multipliers(networks, s.network_multipliers, skip=merged)
        control = next((h for h in gen.unet_hooks if isinstance(h, LLLiteControl)), None) if guides else None
        if control is not None:
            control.prepare(gen.unet, guides[len(written):len(written) + len(batch)], s.width, s.height,
                            gen.device, gen.dtype)
        images = gen.generate(
            [j.spec.prompt for j in batch], [j.spec.negative_prompt for j in batch], width=s.width, height=s.height,
            steps=s.steps, guidance_scale=s.scale, sampler=s.sampler, seeds=[j.seed for j in batch],
            original_size=(s.original_height, s.original_width), crop_top_left=(s.crop_top, s.crop_left),
            negative_original_size=(s.original_height_negative, s.original_width_negative),
            max_embeddings_multiples=args.max_embeddings_multiples, negative_scale=s.negative_scale,
            vae_batch_size=vae_batch)
        if control is not None:
            control.clear()
        stamp = time.strftime("%Y%m%d%H%M%S")
        for job, image in zip(batch, images):
            name = pl.output_name(len(written), job.seed, stamp, sequence)
            path = pl.save_image(image, pl.unique_path(outdir / name), ga.image_params(job, common))
            written.append(path)
            sequence = sequence + 1 if sequence is not None else None
            logger.info("saved %s (seed %d)", path, job.seed)
    return written


def main(argv=None) -> list[Path]:
    """Parse the command line, load the models, generate and save every image; returns the written paths."""
    from library.inference import gen_args as ga

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = ga.parse_args(argv)
    ga.validate_args(args)
    jobs = ga.plan_jobs(_prompt_specs(args, ga), args.images_per_prompt, args.n_iter, args.seed, args.iter_same_seed)
    guides = None
    if args.control_net_lllite_models:
        from library.inference.control import guide_paths

        guides = guide_paths([j.spec for j in jobs], args.guide_image_path)
    device, dtype = _device_and_dtype(args)
    logger.info("%d image(s) on %s in %s", len(jobs), device, str(dtype).replace("torch.", ""))
    gen, networks = _build_generator(args, device, dtype)
    written = _generate_all(args, ga, gen, networks, jobs, guides)
    logger.info("done: %d image(s) in %s", len(written), args.outdir)
    return written


if __name__ == "__main__":
    run_cli(main)
