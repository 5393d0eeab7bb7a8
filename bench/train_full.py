"""GPU benchmark of full fine-tuning steps (sdxl_train.py): full-size random-weight SDXL at 1024x1024.

    python bench/train_full.py [--steps 10] [--warmup 3] [--only r24,bf16,fused] [--cuda_graphs auto|off]
    python bench/train_full.py --check bf16,fused [--steps 20] [--rtol 0.02]

The brief's 24 GB recipe (U-Net only, gradient checkpointing, cached latents and text-encoder
outputs, Adafactor with fixed lr, batch 1) with mixed bf16 (fp32 master weights), then with
--full_bf16, then with --full_bf16 --fused_backward_pass. Runs ``Trainer.step`` of the real loop.

``--check W,...``: for each workload, ``--steps`` steps from the same seeds eagerly and with CUDA
graphs; prints both loss curves and the largest relative difference per step, and exits 1 when it
is above ``--rtol`` (bf16 arithmetic: kernels may differ in the last bits).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
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


def make_trainer(key: str, cuda_graphs: str, learning_rate: float = 4e-7, warmup: int = 100) -> Trainer:
    """A set-up trainer for workload ``key`` on the full-size random-weight model (seeded)."""
    _, full_bf16, fused, gc_on = WORKLOADS[key]
    torch.cuda.empty_cache()
    models = build_random("base", seed=0, device="cpu", dtype=torch.float32)
    cfg = TrainConfig(mixed_precision="bf16", full_bf16=full_bf16, fused_backward_pass=fused, cuda_graphs=cuda_graphs,
                      gradient_checkpointing=gc_on, optimizer_type="adafactor", optimizer_args=ADAFACTOR_ARGS,
                      lr_scheduler="constant_with_warmup", lr_warmup_steps=warmup, learning_rate=learning_rate,
                      max_train_steps=10_000, seed=0, cache_latents=True, cache_text_encoder_outputs=True,
                      output_dir=tempfile.mkdtemp(), max_data_loader_n_workers=2)
    run = TrainingRun(cfg=cfg, models=models, conditioner=None, data=SyntheticCachedData(1),
                      accelerator=make_accelerator(cfg), weight_dtype=torch.bfloat16)
    method = FineTuneMethod(FineTuneOptions(), cfg.learning_rate)
    torch.cuda.reset_peak_memory_stats()
    place_frozen_models(run, method.unet_weights_trained, method.text_encoder_weights_trained)
    trainer = Trainer(run, method)
    trainer.setup()
    return trainer


def run_workload(key: str, steps: int, warmup: int, cuda_graphs: str = "auto") -> dict:
    name, _, _, gc_on = WORKLOADS[key]
    trainer = make_trainer(key, cuda_graphs)
    batches = itertools.cycle(trainer.loader)
    times = time_steps(lambda: trainer.step(next(batches)), warmup, steps)
    flop = UNET_FWD_TFLOP_1024 * (4 if gc_on else 3)  # fwd + bwd (2x) (+ recomputed fwd)
    row = report(name, times, 1, flop, card=device_name(), cuda_graphs=cuda_graphs)
    gc.collect()
    return row


def check(key: str, steps: int, rtol: float) -> bool:
    """Eager and graphed loss curves of ``steps`` steps from the same seeds; True when they agree."""
    curves, updates = {}, {}
    for mode in ("off", "auto"):
        trainer = make_trainer(key, mode, learning_rate=1e-4, warmup=0)  # updates large enough to show
        params = trainer.trained_params[::50]  # a sample of the U-Net's tensors, to compare the updates
        before = [p.detach().float().cpu() for p in params]
        batches = itertools.cycle(trainer.loader)
        curves[mode] = [float(trainer.step(next(batches))) for _ in range(steps)]
        updates[mode] = [p.detach().float().cpu() - b for p, b in zip(params, before)]
        del trainer, batches, params
        gc.collect()
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(curves["off"], curves["auto"]))
    update_diff = max(float((a - b).norm() / a.norm().clamp(min=1e-30)) for a, b in zip(updates["off"], updates["auto"]))
    ok = worst <= rtol and update_diff <= 0.05
    print(json.dumps({"check": WORKLOADS[key][0], "card": device_name(), "steps": steps, "eager": curves["off"],
                      "graphed": curves["auto"], "max_rel_loss_diff": worst, "max_rel_update_diff": update_diff,
                      "pass": ok}), flush=True)
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per workload")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--only", default="r24,bf16,fused", help=f"comma-separated workloads of {','.join(WORKLOADS)}")
    p.add_argument("--cuda_graphs", default="auto", choices=("auto", "off"), help="as the trainers' option")
    p.add_argument("--check", default="", help="compare eager and graphed loss curves of these workloads instead")
    p.add_argument("--rtol", type=float, default=0.02, help="--check: largest relative loss difference allowed")
    args = p.parse_args()
    if args.check:
        results = [check(key, args.steps, args.rtol) for key in args.check.split(",")]
        sys.exit(0 if all(results) else 1)
    rows = []
    for key in args.only.split(","):
        try:
            rows.append(run_workload(key, args.steps, args.warmup, args.cuda_graphs))
        except Exception as exc:
            print(f"{key}: failed: {type(exc).__name__}: {exc}", flush=True)
            torch.cuda.empty_cache()
    print(markdown(rows))


if __name__ == "__main__":
    main()
