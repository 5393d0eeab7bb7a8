"""GPU benchmark of generation: 1024x1024, 30 steps, CFG 7, euler_a, bf16, full-size random-weight SDXL.

    python bench/generate.py [--images 3] [--compile] [--no_diffusers] [--phases]

Times our ``SDXLGenerator`` and diffusers' ``StableDiffusionXLPipeline`` on the same modules in the
same process (prompt encoding, 30 denoising steps with CFG, VAE decode), one image at a time;
median seconds per image after one warm-up image, and peak GPU memory. Ours runs eagerly, with the
U-Net calls replayed as CUDA graphs (what ``sdxl_gen_img.py`` does by default), and graphed with the
U-Net in channels_last; the graphed final latents are compared with the eager ones (same seed).
``--phases`` also times the graphed image's parts (prompt encoding, the 30 denoising steps, the VAE
decode to PIL images, and that decode with the VAE in channels_last).
"""

from __future__ import annotations

import argparse
import time

import torch

from common import device_name, markdown

from library.inference.pipeline import SDXLGenerator
from library.inference.samplers import make_sampler
from library.models.presets import build_random
from library.models.regional_compile import CompileSettings, compile_unet_regions
from library.models.tokenizers import load_tokenizers

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"


def timed(fn, images: int) -> tuple[float, float]:
    fn(0)  # warm-up (and compilation)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(images):
        t0 = time.perf_counter()
        fn(i + 1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3, help="timed images per variant")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile on the U-Net")
    p.add_argument("--no_diffusers", action="store_true", help="time only ours")
    p.add_argument("--dynamo_mode", default=None, help="torch.compile mode for --compile")
    p.add_argument("--phases", action="store_true", help="also time the parts of a graphed image")
    args = p.parse_args()
    models = build_random("base", device="cuda", dtype=torch.bfloat16)
    tokenizers = load_tokenizers()
    rows = []

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=models.vae, text_encoder=models.text_encoder1,
                                     text_encoder_2=models.text_encoder2, tokenizer=tokenizers[0],
                                     tokenizer_2=tokenizers[1], unet=models.unet,
                                     scheduler=make_sampler("euler_a")).to("cuda")
    pipe.set_progress_bar_config(disable=True)

    def run_diffusers(seed: int):
        pipe(PROMPT, negative_prompt=NEGATIVE, width=1024, height=1024, num_inference_steps=30, guidance_scale=7.0,
             generator=torch.Generator("cpu").manual_seed(seed))

    ours = SDXLGenerator.from_models(models, tokenizers, dtype=torch.bfloat16, device="cuda")

    def run_ours(seed: int, output_type: str = "pil"):
        return ours.generate([PROMPT], [NEGATIVE], width=1024, height=1024, steps=30, guidance_scale=7.0,
                             sampler="euler_a", seeds=[seed], output_type=output_type)

    def add(label: str, fn) -> None:
        med, peak = timed(fn, args.images)
        rows.append({"pipeline": label, "s_per_image": round(med, 3), "peak_gib": round(peak, 2)})

    if not args.no_diffusers:  # diffusers first and again last: the order effect shows in the two rows
        add("diffusers StableDiffusionXLPipeline", run_diffusers)
    add("ours (eager)", run_ours)
    eager = run_ours(7, "latent")
    ours.cuda_graphs = True
    add("ours (CUDA graphs)", run_ours)
    graphed = run_ours(7, "latent")
    rows[-1]["max_abs_latent_diff_vs_eager"] = float((graphed - eager).abs().max())
    if args.phases:
        final = run_ours(7, "latent")
        add("  part: prompt encoding (2 encoders, CFG)",
            torch.no_grad()(lambda seed: ours.conditioning([PROMPT], [NEGATIVE], 2, 3)))
        add("  part: prompt encoding + 30 denoising steps (graphed)", lambda seed: run_ours(seed, "latent"))
        add("  part: VAE decode to PIL", lambda seed: ours.decode(final))
        ours.vae.to(memory_format=torch.channels_last)
        add("  part: VAE decode to PIL, VAE in channels_last", lambda seed: ours.decode(final))
        ours.vae.to(memory_format=torch.contiguous_format)
    ours.unet.to(memory_format=torch.channels_last)
    add("ours (CUDA graphs, channels_last)", run_ours)
    ours.unet.to(memory_format=torch.contiguous_format)
    if not args.no_diffusers:
        add("diffusers StableDiffusionXLPipeline (again)", run_diffusers)
    if args.compile:
        compile_unet_regions(ours.unet, CompileSettings(mode=args.dynamo_mode))  # what --torch_compile does
        add(f"ours (torch.compile {args.dynamo_mode or 'default'} + CUDA graphs)", run_ours)
        ours.cuda_graphs = False
        add(f"ours (torch.compile {args.dynamo_mode or 'default'}, eager launches)", run_ours)
    for row in rows:
        row["card"] = device_name()
        print(row)
    print(markdown(rows))


if __name__ == "__main__":
    main()
