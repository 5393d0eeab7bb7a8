"""GPU benchmark of full fine-tuning steps (sdxl_train.py): full-size random-weight SDXL at 1024x1024.

    python bench/train_full.py [--steps 10] [--warmup 3] [--only r24,bf16,fused]

The brief's 24 GB recipe (U-Net only, gradient checkpointing, cached latents and text-encoder
outputs, Adafactor with fixed lr, batch 1) with mixed bf16 (fp32 master weights), then with
--full_bf16, then with --full_bf16 --fused_backward_pass. Runs ``Trainer.step`` of the real loop.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import tempfile

import torch

from common import UNET_FWD_TFLOP_1024, SyntheticCachedData, device_name, markdown, report, time_steps

from library.models.presets import build_random
from library.training.config import TrainConfig
from library.training.finetune import FineTuneMethod, FineTuneOptions
from library.training.setup import place_frozen_models
from library.training.trainer import Trainer, TrainingRun, make_accelerator

ADAFACTOR_ARGS = ("scale_parameter=False", "relative_step=False", "warmup_init=False")
WORKLOADS = {  # name, full_bf16, fused backward, gradient checkpointing
    "r24": ("24GB recipe: GC Adafactor b1 (mixed bf16)", False, False, True),
    "bf16": ("24GB recipe + full_bf16", True, False, True),
    "fused": ("24GB recipe + full_bf16 + fused_backward_pass", True, True, True),
    "fused_nogc": ("full_bf16 + fused_backward_pass, no GC", True, True, False),
}


def run_workload(key: str, steps: int, warmup: int) -> dict:
    name, full_bf16, fused, gc_on = WORKLOADS[key]
    torch.cuda.empty_cache()
    models = build_random("base", device="cpu", dtype=torch.float32)
    cfg = TrainConfig(mixed_precision="bf16", full_bf16=full_bf16, fused_backward_pass=fused,
                      gradient_checkpointing=gc_on, optimizer_type="adafactor", optimizer_args=ADAFACTOR_ARGS,
                      lr_scheduler="constant_with_warmup", lr_warmup_steps=100, learning_rate=4e-7,
                      max_train_steps=10_000, seed=0, cache_latents=True, cache_text_encoder_outputs=True,
                      output_dir=tempfile.mkdtemp(), max_data_loader_n_workers=2)
    run = TrainingRun(cfg=cfg, models=models, conditioner=None, data=SyntheticCachedData(1),
                      accelerator=make_accelerator(cfg), weight_dtype=torch.bfloat16)
    method = FineTuneMethod(FineTuneOptions(), cfg.learning_rate)
    torch.cuda.reset_peak_memory_stats()
    place_frozen_models(run, method.unet_weights_trained, method.text_encoder_weights_trained)
    trainer = Trainer(run, method)
    trainer.setup()
    batches = itertools.cycle(trainer.loader)
    times = time_steps(lambda: trainer.step(next(batches)), warmup, steps)
    flop = UNET_FWD_TFLOP_1024 * (4 if gc_on else 3)  # fwd + bwd (2x) (+ recomputed fwd)
    row = report(name, times, 1, flop, card=device_name())
    gc.collect()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per workload")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--only", default="r24,bf16,fused", help=f"comma-separated workloads of {','.join(WORKLOADS)}")
    args = p.parse_args()
    rows = []
    for key in args.only.split(","):
        try:
            rows.append(run_workload(key, args.steps, args.warmup))
        except Exception as exc:
            print(f"{key}: failed: {type(exc).__name__}: {exc}", flush=True)
            torch.cuda.empty_cache()
    print(markdown(rows))


if __name__ == "__main__":
    main()
