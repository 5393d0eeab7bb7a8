"""Where the time of the highres fix goes: per-phase times of our highres path, 512 -> 1024 and 768 -> 1024.

The harness' configs L and M (``sdxl_gen_img.py --W 1024 --H 1024 --steps 30 --sampler euler_a --scale 7
--bf16 --highres_fix_scale 0.5|0.75 --highres_fix_steps 28``) run the phases below; here each is timed
on its own (``torch.cuda.synchronize`` around host timers) on full-size random-weight SDXL in bf16:

  first pass    txt2img at the first-stage size, 28 steps (returns latents)
  decode        VAE decode of the first stage to PIL images
  upscale       LANCZOS to 1024 x 1024 (CPU, PIL)
  encode        VAE encode of the upscaled image (the sample x 0.13025)
  second pass   img2img at 1024 from those latents, strength 0.8 of 30 steps (24 U-Net calls)
  final decode  VAE decode at 1024
  end to end    library.inference.highres.generate_highres, all of the above in one call

and, for reference, txt2img at 1024 with 30 steps (config E without the decode) and single batched U-Net
calls (batch 2 = CFG) at each size, wall time and GPU time (CUDA events): a U-Net call whose wall time
is well above its GPU time is bound by the host (kernel launches), not by the GPU. The first-pass rows
also run with ``euler`` (no per-step noise drawn from CPU generators) to show what ancestral sampling adds.

Run on the GPU machine, from the project root (diffusers 0.42 from the harness wheels):
    pip install -q --no-deps --target /tmp/ours_site .anchor_bench/whl_ours/*.whl
    PYTHONPATH=/tmp/ours_site python3 bench/highres_phases.py [--images 3] [--profile 768]
(about 2-3 minutes; prints one JSON line per row and a markdown table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import device_name, markdown

from library.inference.highres import (
    HighresFix,
    _first_stage_kwargs,
    generate_highres,
    upscale_images,
)
from library.inference.img2img import InitImage, encode_images
from library.inference.pipeline import SDXLGenerator, seeded_generators
from library.models.presets import build_random
from library.models.tokenizers import load_tokenizers

PROMPT = "a photo of a red cat sitting on a wooden table, high quality"  # the harness' prompt
SIZE, STEPS, HR_STEPS, STRENGTH, CFG = 1024, 30, 28, 0.8, 7.0


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """(result, seconds) of ``fn()`` with the GPU drained before and after."""
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - t0


def base_kwargs(seed: int, sampler: str = "euler_a") -> dict:
    return {"prompts": [PROMPT], "negative_prompts": [""], "width": SIZE, "height": SIZE, "steps": STEPS,
            "guidance_scale": CFG, "sampler": sampler, "seeds": [seed]}


def highres_phases(gen: SDXLGenerator, scale: float, seed: int, sampler: str = "euler_a") -> dict[str, float]:
    """Seconds of each phase of one highres-fix image, run one after the other as generate_highres does."""
    hr = HighresFix(scale, steps=HR_STEPS)
    kwargs = base_kwargs(seed, sampler)
    first = _first_stage_kwargs(kwargs, hr)
    out: dict[str, float] = {}
    latents, out["first pass"] = timed(lambda: gen.generate(**first))
    images, out["decode"] = timed(lambda: gen.decode(latents, "pil"))
    upscaled, out["upscale"] = timed(lambda: upscale_images(images, SIZE, SIZE))
    x0, out["encode"] = timed(lambda: encode_images(gen.vae, upscaled, seeded_generators([seed + 1]), gen.device,
                                                    gen.vae_dtype))
    second = dict(kwargs, init=InitImage(latents=x0, strength=STRENGTH), seeds=[seed + 1], output_type="latent")
    final, out["second pass"] = timed(lambda: gen.generate(**second))
    _, out["final decode"] = timed(lambda: gen.decode(final, "pil"))
    _, out["end to end"] = timed(lambda: generate_highres(gen, dict(kwargs, strength=STRENGTH), hr))
    return out


def unet_call(gen: SDXLGenerator, size: int, calls: int = 10) -> dict[str, float]:
    """Median wall and GPU milliseconds of one batched (CFG) U-Net call at ``size``."""
    h = size // 8
    cfg = gen.unet.config
    x = torch.randn(2, 4, h, h, device=gen.device, dtype=gen.dtype)
    context = torch.randn(2, 77, cfg.cross_attention_dim, device=gen.device, dtype=gen.dtype)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, device=gen.device, dtype=gen.dtype),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, device=gen.device, dtype=torch.float32)}
    t = torch.tensor(500, device=gen.device)
    cuda = gen.device.type == "cuda"
    walls, gpus = [], []
    with torch.no_grad():
        for i in range(calls + 3):
            start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else (None, None)
            sync()
            t0 = time.perf_counter()
            if cuda:
                start.record()
            gen.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)
            if cuda:
                end.record()
            sync()
            if i >= 3:
                walls.append((time.perf_counter() - t0) * 1000)
                gpus.append(start.elapsed_time(end) if cuda else float("nan"))
    return {"wall_ms": round(statistics.median(walls), 1), "gpu_ms": round(statistics.median(gpus), 1)}


def profile_first_pass(gen: SDXLGenerator, first_size: int) -> None:
    """Top CUDA kernels and host ops of one first pass at ``first_size`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    hr = HighresFix(first_size / SIZE, steps=HR_STEPS)
    first = _first_stage_kwargs(base_kwargs(7), hr)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gen.generate(**first)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3, help="timed images per scale after one warm-up (default 3)")
    p.add_argument("--profile", type=int, default=None, metavar="SIZE",
                   help="also profile one first pass at SIZE (512 or 768) and print the top kernels")
    p.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny model, 256 px, 2+2 steps")
    args = p.parse_args()
    global SIZE, STEPS, HR_STEPS
    preset, device, dtype = "base", "cuda", torch.bfloat16
    if args.smoke:
        preset, device, dtype, SIZE, STEPS, HR_STEPS = "tiny", "cpu", torch.float32, 256, 3, 2
    t0 = time.perf_counter()
    models = build_random(preset, device=device, dtype=dtype)
    gen = SDXLGenerator.from_models(models, load_tokenizers(), dtype=dtype, device=device)
    print(f"models built in {time.perf_counter() - t0:.1f} s on {device_name()}; VAE in {gen.vae_dtype}", flush=True)
    rows = []
    for scale in (0.5, 0.75):
        for sampler in ("euler_a", "euler"):
            runs = [highres_phases(gen, scale, seed, sampler) for seed in range(args.images + 1)][1:]  # 1st: warm-up
            row = {"from": int(SIZE * scale), "sampler": sampler}
            row.update({k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]})
            row["sum of phases"] = round(sum(v for k, v in row.items() if k not in ("from", "sampler", "end to end")), 3)
            row["first ms/step"] = round(row["first pass"] / HR_STEPS * 1000, 1)
            row["second ms/step"] = round(row["second pass"] / max(1, int(STEPS * STRENGTH)) * 1000, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    ref = [timed(lambda s=s: gen.generate(**base_kwargs(s), output_type="latent"))[1] for s in range(args.images + 1)]
    reference = {f"txt2img {SIZE}, {STEPS} steps, euler_a (s)": round(statistics.median(ref[1:]), 3)}
    for size in (SIZE // 2, SIZE * 3 // 4, SIZE):
        call = unet_call(gen, size)
        reference[f"U-Net call {size} wall/gpu ms"] = f"{call['wall_ms']} / {call['gpu_ms']}"
    print(json.dumps(reference), flush=True)
    print(markdown(rows))
    print(markdown([reference]))
    if args.profile:
        profile_first_pass(gen, args.profile)


if __name__ == "__main__":
    main()
