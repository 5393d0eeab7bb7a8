"""GPU check: where the full-size U-Net's step time goes, and what the memory format does to it.

    python bench/unet_kernels.py [--batch 4] [--steps 8] [--modes ti,lora,gen] [--profile ti]

Times the bare U-Net of the trainers at 1024² in bf16 with random weights for three kinds of
step: ``ti`` (gradient checkpointing, gradients to the text context only: textual inversion),
``lora`` (no checkpointing, gradients to the input: what an adapter step costs without its own
small weights) and ``gen`` (forward only under no_grad, batch 2 for guidance). Each runs with the
U-Net in the contiguous (NCHW) format and in channels_last. ``--profile MODE`` prints the CUDA time
of that mode by kernel family (convolution, matmul, attention, normalisation, elementwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch

from common import UNET_FWD_TFLOP_1024, device_name, time_steps

from library.models.presets import build_random

FAMILIES = (("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_attn")),
            ("convolution", ("conv", "implicit", "winograd", "dgrad", "wgrad", "nchw", "nhwc")),
            ("matmul", ("gemm", "sm90_xmma", "cutlass", "matmul", "nvjet")),
            ("normalisation", ("norm", "welford")),
            ("layout copy", ("copy", "transpose", "contiguous")))


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "elementwise/other"


def inputs(batch: int, seq: int = 77):
    g = torch.Generator(device="cuda").manual_seed(0)
    sample = torch.randn(batch, 4, 128, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    ctx = torch.randn(batch, seq, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    added = {"text_embeds": torch.randn(batch, 1280, device="cuda", dtype=torch.bfloat16, generator=g),
             "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device="cuda", dtype=torch.bfloat16)}
    t = torch.full((batch,), 500, device="cuda")
    return sample, ctx, added, t


def make_step(unet, mode: str, batch: int):
    sample, ctx, added, t = inputs(2 if mode == "gen" else batch)
    if mode == "gen":
        def step():
            with torch.no_grad():
                unet(sample, t, ctx, added_cond_kwargs=added)
        return step
    if mode == "ti":
        ctx.requires_grad_(True)
    else:
        sample.requires_grad_(True)

    def step():
        out = unet(sample, t, ctx, added_cond_kwargs=added).sample
        out.float().square().mean().backward()
    return step


def profile(step) -> None:
    from torch.profiler import ProfilerActivity, profile as prof
    step()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        step()
        torch.cuda.synchronize()
    by_family: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, float] = defaultdict(float)
    for ev in p.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            by_family[family(ev.name)] += ev.device_time_total / 1e3
            by_kernel[ev.name[:110]] += ev.device_time_total / 1e3
    total = sum(by_family.values())
    print(json.dumps({"profile_ms_total": round(total, 1),
                      **{k: round(v, 1) for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])}}))
    for name, ms in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {ms:8.2f} ms  {family(name):18s} {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--modes", default="ti,lora,gen")
    p.add_argument("--formats", default="contiguous,channels_last")
    p.add_argument("--profile", default="", help="comma-separated modes to profile (in the first format)")
    args = p.parse_args()
    unet = build_random("base", device="cuda", dtype=torch.bfloat16).unet
    unet.requires_grad_(False)
    for fmt in args.formats.split(","):
        unet.to(memory_format=getattr(torch, {"contiguous": "contiguous_format"}.get(fmt, fmt)))
        for mode in args.modes.split(","):
            unet.train(mode == "ti")
            if mode == "ti":
                unet.enable_gradient_checkpointing()
            else:
                unet.disable_gradient_checkpointing()
            step = make_step(unet, mode, args.batch)
            torch.cuda.reset_peak_memory_stats()
            s = statistics.median(time_steps(step, 3, args.steps))
            images = 1 if mode == "gen" else args.batch
            flop = UNET_FWD_TFLOP_1024 * {"ti": 3, "lora": 2, "gen": 2}[mode] * images
            print(json.dumps({"mode": mode, "format": fmt, "batch": args.batch if mode != "gen" else 2,
                              "s_per_step": round(s, 4), "tflops": round(flop / s, 1),
                              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                              "card": device_name()}), flush=True)
            if mode in args.profile.split(",") and fmt == args.formats.split(",")[0]:
                profile(step)


if __name__ == "__main__":
    main()
