"""Diagnostic: U-Net fwd+bwd peak memory and time at 1024x1024 batch 1, with/without autocast and LoRA.

    python bench/diag_memory.py
"""

from __future__ import annotations

import gc
import itertools

import torch

from common import device_name, markdown, report, time_steps

from library.models.presets import PRESETS


def run(autocast: bool, lora: bool, gc_on: bool, compile_unet: bool = False) -> dict:
    from diffusers import UNet2DConditionModel

    from networks.lora import create_network

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**PRESETS["base"]["unet"]).to(torch.bfloat16).requires_grad_(False)
    if gc_on:
        unet.enable_gradient_checkpointing()
    params = []
    if lora:
        net = create_network(1.0, 32, 16, None, [], unet)
        net.apply_to([], unet, False, True)
        net.to("cuda", torch.float32)
        net.requires_grad_(True)
        params = list(net.parameters())
    if compile_unet:
        unet = torch.compile(unet)
    x = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.bfloat16, requires_grad=not lora)
    ctx = torch.randn(1, 77, 2048, device="cuda", dtype=torch.bfloat16)
    added = {"text_embeds": torch.randn(1, 1280, device="cuda", dtype=torch.bfloat16),
             "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device="cuda", dtype=torch.bfloat16)}
    t = torch.tensor([500], device="cuda")
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = unet(x, t, ctx, added_cond_kwargs=added).sample
        loss = out.float().pow(2).mean()
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None

    name = f"autocast={autocast} lora={lora} gc={gc_on} compile={compile_unet}"
    row = report(name, time_steps(step, 3 if not compile_unet else 3, 8), 1, card=device_name())
    gc.collect()
    return row


def main() -> None:
    rows = []
    for autocast, lora in itertools.product((True, False), (False, True)):
        rows.append(run(autocast, lora, False))
    rows.append(run(False, True, False, compile_unet=True))
    print(markdown(rows))


if __name__ == "__main__":
    main()
