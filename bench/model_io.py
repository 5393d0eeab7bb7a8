"""GPU benchmark of model saving and loading with full-size random-weight SDXL.

    python bench/model_io.py [--dir /tmp/sdxl_io]

Builds SDXL base 1.0 shapes with random weights on the GPU, saves them as an fp16 single file,
then reloads it in a fresh process (so the host peak is the loader's alone) straight to the GPU
in fp16 and in bf16. Reports file size, save and load times, peak host RSS and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import device_name, markdown

from library.models.checkpoint_io import load_sdxl, save_single_file
from library.models.presets import build_random


def child_load(path: str, dtype: str) -> None:
    """Load to the GPU in a fresh process and print the measurements as JSON."""
    torch.cuda.init()
    t0 = time.perf_counter()
    models = load_sdxl(path, dtype=getattr(torch, dtype), device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for m in (models.unet, models.vae, models.text_encoder1, models.text_encoder2)
                 for p in m.parameters())
    print(json.dumps({"step": f"load single file -> cuda {dtype}", "seconds": round(seconds, 2),
                      "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                      "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      "params_billion": round(params / 1e9, 3)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/sdxl_io", help="where to write the checkpoint")
    p.add_argument("--child", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_load(*args.child)
        return
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sdxl_random_fp16.safetensors"
    models = build_random("base", device="cuda", dtype=torch.float16)
    t0 = time.perf_counter()
    save_single_file(models, path, save_precision="fp16")
    rows = [{"step": "save single file fp16", "seconds": round(time.perf_counter() - t0, 2),
             "file_gib": round(path.stat().st_size / 2**30, 3)}]
    del models
    for dtype in ("float16", "bfloat16"):
        r = subprocess.run([sys.executable, __file__, "--child", str(path), dtype], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:])
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    for row in rows:
        row["card"] = device_name()
        print(json.dumps(row))
    print(markdown(rows))


if __name__ == "__main__":
    main()
