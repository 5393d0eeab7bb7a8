"""Profile the LoRA training step (workload a of train_network.py) and print the top host/device ops.

    python bench/profile_lora_step.py
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import train_network as tn


def main() -> None:
    original = tn.time_steps

    def timed_then_profiled(step, warmup, steps):
        times = original(step, warmup, steps)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        return times

    tn.time_steps = timed_then_profiled
    tn.run_workload("a", steps=5, warmup=3, compile_unet=False)


if __name__ == "__main__":
    main()
