"""GPU check: eager steps and the fast paths give the same LoRA loss curve; their cost and speed.

    python bench/compile_check.py [--steps 20] [--workload a] [--rtol 0.02] [--variants compile,graphs]
                                  [--profile b]

Builds the full-size random-weight SDXL with the same seeds for each run and runs ``--steps`` real
trainer steps (``Trainer.step`` of sdxl_train_network.py at 1024², cached latents/TE outputs, bf16):
eagerly (``--cuda_graphs off``), and for each of ``--variants``: ``compile`` (the U-Net's repeated
blocks compiled, eager launches), ``graphs`` (``--cuda_graphs auto``: the U-Net step replayed as a
CUDA graph), ``compile+graphs``. Prints per-step losses of each, the largest relative
difference (must be under ``--rtol``; bf16 arithmetic differs in the last bits when kernels are
fused), the relative difference of the trained LoRA weights, the seconds to the first compiled step
and the median s/step of each. ``--profile KEY`` also profiles 3 eager steps of that workload of
train_network.py (e.g. ``b``: dim 8, GC, Adafactor) and prints the top ops by host and device time.
Exit code 1 when the curves differ by more than the tolerance.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import tempfile
import time

import torch

from common import SyntheticCachedData, device_name

from library.models.presets import build_random
from library.models.regional_compile import CompileSettings, compile_unet_regions
from library.training.config import TrainConfig
from library.training.methods import NetworkMethod, NetworkOptions
from library.training.setup import place_frozen_models
from library.training.trainer import Trainer, TrainingRun, make_accelerator
from train_network import WORKLOADS


def train(key: str, steps: int, compiled: bool, dynamic: bool, graphs: bool = False) -> dict:
    """Losses per step, step times and the trained LoRA weights of one run."""
    _, batch, dim, gc_on, opt, opt_args, _ = WORKLOADS[key]
    torch.cuda.empty_cache()
    t_start = time.perf_counter()
    models = build_random("base", seed=0, device="cuda", dtype=torch.bfloat16)
    for name in ("text_encoder1", "text_encoder2", "vae"):
        getattr(models, name).to("cpu")
    cfg = TrainConfig(mixed_precision="bf16", gradient_checkpointing=gc_on, optimizer_type=opt,
                      optimizer_args=opt_args, learning_rate=1e-4, max_train_steps=10_000, seed=0,
                      cache_latents=True, cache_text_encoder_outputs=True, output_dir=tempfile.mkdtemp(),
                      max_data_loader_n_workers=0, torch_compile=compiled, dynamo_dynamic=dynamic,
                      cuda_graphs="auto" if graphs else "off")
    run = TrainingRun(cfg=cfg, models=models, conditioner=None, data=SyntheticCachedData(batch),
                      accelerator=make_accelerator(cfg), weight_dtype=torch.bfloat16)
    place_frozen_models(run, unet_weights_trained=False, text_encoder_weights_trained=False)
    if compiled:
        compile_unet_regions(models.unet, CompileSettings(dynamic=dynamic))
    torch.manual_seed(0)  # the LoRA initialisation
    trainer = Trainer(run, NetworkMethod(NetworkOptions(network_dim=dim, network_alpha=dim / 2,
                                                        network_train_unet_only=True)))
    trainer.setup()
    batches = itertools.cycle(trainer.loader)
    losses, times = [], []
    first_step_s = None
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = trainer.step(next(batches))
        losses.append(float(loss))  # a host sync: this is a check, not a timing of the loop
        times.append(time.perf_counter() - t0)
        if first_step_s is None:
            first_step_s = time.perf_counter() - t_start
    net = trainer.trained[0]  # the LoRA network
    weights = torch.cat([p.detach().float().flatten().cpu() for p in net.parameters()])
    replays = trainer.graphed.replays if trainer.graphed is not None else 0
    out = {"losses": losses, "graph_replays": replays, "median_s": statistics.median(times[3:]), "first_step_s": first_step_s,
           "first_step_only_s": times[0], "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "weights": weights}
    del trainer, run, models, net
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def profile(key: str) -> None:
    """Top ops of 3 eager steps of a train_network.py workload."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    import train_network as tn

    original = tn.time_steps

    def timed_then_profiled(step, warmup, steps):
        times = original(step, warmup, steps)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
        return times

    tn.time_steps = timed_then_profiled
    tn.run_workload(key, steps=5, warmup=3, compile_unet=False)
    tn.time_steps = original


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="trainer steps per run")
    p.add_argument("--workload", default="a", help=f"one of {','.join(WORKLOADS)} (train_network.py)")
    p.add_argument("--rtol", type=float, default=0.02, help="largest allowed relative loss difference per step")
    p.add_argument("--variants", default="compile", help="comma-separated: compile, graphs, compile+graphs")
    p.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes (--dynamo_dynamic)")
    p.add_argument("--profile", default="", help="also profile eager steps of this workload")
    args = p.parse_args()
    eager = train(args.workload, args.steps, False, False)
    ok = True
    for variant in args.variants.split(","):
        fast = train(args.workload, args.steps, "compile" in variant, args.dynamic, graphs="graphs" in variant)
        rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager["losses"], fast["losses"])]
        w_rel = float((eager["weights"] - fast["weights"]).norm() / eager["weights"].norm().clamp(min=1e-12))
        row = {"card": device_name(), "workload": WORKLOADS[args.workload][0], "steps": args.steps,
               "variant": variant, "graph_replays": fast["graph_replays"],
               "max_rel_loss_diff": round(max(rel), 5), "mean_rel_loss_diff": round(sum(rel) / len(rel), 5),
               "lora_weight_rel_diff": round(w_rel, 5),
               "eager_s_per_step": round(eager["median_s"], 4), "fast_s_per_step": round(fast["median_s"], 4),
               "fast_first_step_s": round(fast["first_step_s"], 1),
               "fast_first_step_only_s": round(fast["first_step_only_s"], 1),
               "eager_peak_gib": round(eager["peak_gib"], 2), "fast_peak_gib": round(fast["peak_gib"], 2),
               "eager_losses": [round(x, 5) for x in eager["losses"]],
               "fast_losses": [round(x, 5) for x in fast["losses"]]}
        print(json.dumps(row), flush=True)
        good = max(rel) <= args.rtol
        ok = ok and good
        print(f"{variant}: " + ("PASS" if good else f"FAIL: loss curves differ by {max(rel):.4f} > {args.rtol}"),
              flush=True)
    if args.profile:
        profile(args.profile)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
