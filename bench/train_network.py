"""GPU benchmark of LoRA training steps: full-size random-weight SDXL at 1024x1024, cached latents and TE outputs.

    python bench/train_network.py [--steps 15] [--warmup 5] [--only a,b] [--compile]

Runs the real trainer step (``Trainer.step``: loss, backward, optimizer, scheduler) of
``sdxl_train_network.py`` for the workloads of docs/benchmarks.md and prints one JSON line each
plus a markdown table. (a) dim 32, AdamW, bf16, batch 1; (b) low-memory recipe: dim 8, gradient
checkpointing, Adafactor, batch 1 (and with --fp8_base); (c) batch 4 and larger.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import tempfile

import torch

from common import UNET_FWD_TFLOP_1024, SyntheticCachedData, device_name, markdown, report, time_steps

from library.models.presets import build_random
from library.models.regional_compile import CompileSettings, compile_unet_regions
from library.training.config import TrainConfig
from library.training.methods import NetworkMethod, NetworkOptions, apply_fp8
from library.training.setup import place_frozen_models
from library.training.trainer import Trainer, TrainingRun, make_accelerator

ADAFACTOR_ARGS = ("scale_parameter=False", "relative_step=False", "warmup_init=False")
# name, batch, dim, grad ckpt, optimizer, optimizer args, fp8
WORKLOADS = {
    "a": ("a: dim32 AdamW b1", 1, 32, False, "AdamW", (), False),
    "b": ("b: dim8 GC Adafactor b1", 1, 8, True, "Adafactor", ADAFACTOR_ARGS, False),
    "b8": ("b: dim8 GC AdamW8bit b1", 1, 8, True, "AdamW8bit", (), False),
    "c4": ("c: dim32 AdamW b4", 4, 32, False, "AdamW", (), False),
    "c8": ("c: dim32 AdamW b8", 8, 32, False, "AdamW", (), False),
    "c16": ("c: dim32 AdamW GC b16", 16, 32, True, "AdamW", (), False),
    "bfp8": ("b: dim8 GC Adafactor b1 fp8 base", 1, 8, True, "Adafactor", ADAFACTOR_ARGS, True),
}


def run_workload(key: str, steps: int, warmup: int, compile_unet: bool, mode: str | None = None) -> dict:
    name, batch, dim, gc_on, opt, opt_args, fp8 = WORKLOADS[key]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    models = build_random("base", device="cuda", dtype=torch.bfloat16)
    models.text_encoder1.to("cpu")  # cached TE outputs: the encoders stay off the GPU
    models.text_encoder2.to("cpu")
    models.vae.to("cpu")
    out = tempfile.mkdtemp()
    cfg = TrainConfig(mixed_precision="bf16", gradient_checkpointing=gc_on, optimizer_type=opt,
                      optimizer_args=opt_args, learning_rate=1e-4, max_train_steps=10_000, seed=0,
                      cache_latents=True, cache_text_encoder_outputs=True, output_dir=out, fp8_base=fp8,
                      max_data_loader_n_workers=2, torch_compile=compile_unet)
    data = SyntheticCachedData(batch)
    run = TrainingRun(cfg=cfg, models=models, conditioner=None, data=data, accelerator=make_accelerator(cfg),
                      weight_dtype=torch.bfloat16)
    place_frozen_models(run, unet_weights_trained=False, text_encoder_weights_trained=False)
    if fp8:
        apply_fp8(models.unet)
    if compile_unet:  # what --torch_compile does: the repeated blocks, compiled in place
        compile_unet_regions(models.unet, CompileSettings(mode=mode))
    torch.cuda.reset_peak_memory_stats()
    method = NetworkMethod(NetworkOptions(network_dim=dim, network_alpha=dim / 2, network_train_unet_only=True))
    trainer = Trainer(run, method)
    trainer.setup()
    batches = itertools.cycle(trainer.loader)
    times = time_steps(lambda: trainer.step(next(batches)), warmup + (3 if compile_unet else 0), steps)
    # LoRA backward needs input gradients only (~1x forward): ~2x forward FLOP per step, 3x with GC.
    flop = UNET_FWD_TFLOP_1024 * (3 if gc_on else 2)
    row = report(name + (" compiled" if compile_unet else ""), times, batch, flop, card=device_name())
    gc.collect()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=15, help="timed steps per workload")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--only", default="a,b,bfp8,c4,c8", help=f"comma-separated workloads of {','.join(WORKLOADS)}")
    p.add_argument("--compile", default="", help="comma-separated workloads to run again with torch.compile")
    p.add_argument("--dynamo_mode", default=None, help="torch.compile mode for --compile")
    p.add_argument("--compiled_only", action="store_true", help="run only the compiled variants")
    args = p.parse_args()
    rows = []
    for key in args.only.split(","):
        variants = [False, True] if key in args.compile.split(",") else [False]
        if args.compiled_only:
            variants = [True]
        for compiled in variants:
            try:
                rows.append(run_workload(key, args.steps, args.warmup, compiled, args.dynamo_mode))
            except Exception as exc:  # keep going: one failing workload must not hide the others
                print(f"{key}: failed: {type(exc).__name__}: {exc}", flush=True)
                torch.cuda.empty_cache()
    print(markdown(rows))


if __name__ == "__main__":
    main()
