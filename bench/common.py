"""Shared pieces of the GPU benchmarks: full-size random-weight SDXL, synthetic cached data, timing.

Random weights cost the same compute as real ones. Every benchmark reports the median step time
over timed steps after warm-up (``torch.cuda.synchronize`` around host timers), images/s and the
peak of ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

UNET_FWD_TFLOP_1024 = 6.76  # SDXL U-Net forward per 1024x1024 image (anchor_benchmarks_h100.md)


class SyntheticCachedData(torch.utils.data.Dataset):
    """A DatasetGroup stand-in serving cached latents and text-encoder outputs at one bucket.

    Only the attributes the trainer reads are provided; everything is random but fixed.
    """

    def __init__(self, batch_size: int, resolution: int = 1024, batches: int = 64, seq: int = 77,
                 widths: tuple[int, int, int] = (768, 1280, 1280)):
        g = torch.Generator().manual_seed(0)
        h = w = resolution // 8
        self.batches = batches
        self.latents = torch.randn(batch_size, 4, h, w, generator=g) / 0.13025
        self.h1 = torch.randn(batch_size, seq, widths[0], generator=g)
        self.h2 = torch.randn(batch_size, seq, widths[1], generator=g)
        self.pool = torch.randn(batch_size, widths[2], generator=g)
        sizes = torch.tensor([[resolution, resolution]] * batch_size)
        self.item = {"latents": self.latents, "te_outputs": (self.h1, self.h2, self.pool),
                     "original_sizes_hw": sizes, "crop_top_lefts": torch.zeros_like(sizes),
                     "target_sizes_hw": sizes, "loss_weights": torch.ones(batch_size), "captions": [""] * batch_size}
        self.num_train_images = batches * batch_size
        self.num_reg_images = 0
        self.resolution = (resolution, resolution)

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, i: int) -> dict:
        return self.item

    def set_epoch(self, epoch: int) -> None:
        pass

    def set_current_step(self, step: int) -> None:
        pass

    def datasets_metadata(self) -> list:
        return []

    def tag_frequency(self) -> dict:
        return {}

    def bucket_info(self) -> dict:
        return {}


def time_steps(step: Callable[[], None], warmup: int, steps: int) -> list[float]:
    """Seconds per call of ``step`` for ``steps`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def report(name: str, times: list[float], batch: int, tflop_per_image: float | None = None, **extra) -> dict:
    """One result row: median s/step, images/s, peak GiB and (optionally) the fraction of bf16 peak."""
    med = statistics.median(times)
    row = {"workload": name, "batch": batch, "median_s_per_step": round(med, 4),
           "images_per_s": round(batch / med, 2),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), **extra}
    if tflop_per_image:
        row["tflops"] = round(tflop_per_image * batch / med, 1)
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    """A markdown table of result rows."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
