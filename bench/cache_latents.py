"""GPU benchmark of latent caching and of the cached-latent data loader (full-size SDXL VAE).

    python bench/cache_latents.py [--iters 10] [--warmup 3] [--json results.json]

1. VAE encode throughput: a random-weight SDXL-base-shaped AutoencoderKL at 1024x1024, fp32 and
   bf16, batch 1 and 8 (the ``encode_fn`` the cachers use: posterior sample); median time over
   ``--iters`` timed calls after ``--warmup`` calls, ``torch.cuda.synchronize`` around each, and
   peak ``torch.cuda.max_memory_allocated``.
2. End-to-end caching: ``DatasetGroup.cache_latents`` to disk (JPEG decode, resize, encode, npz
   write) on ``--pipeline_images`` synthetic 1024x1024 images, bf16, VAE batch 8.
3. Loader: batches/s of ``make_dataloader`` (2 workers, pinned memory) serving a synthetic
   on-disk latent cache of ``--loader_images`` 1024x1024 images at batch size 8.

Prints a markdown table and a JSON object (also written to ``--json``). Needs torch with CUDA,
diffusers, numpy and Pillow; run from anywhere (the repository root is put on sys.path).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    """The benchmark's options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--pipeline_images", type=int, default=64, help="images for the end-to-end run (0: skip)")
    p.add_argument("--loader_images", type=int, default=256, help="images in the loader benchmark (0: skip)")
    p.add_argument("--loader_workers", type=int, default=2)
    p.add_argument("--json", type=str, default=None, help="also write the results here")
    return p.parse_args(argv)


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_vae():
    """Random-weight SDXL-base VAE on the GPU (float32)."""
    import torch
    from diffusers import AutoencoderKL

    from library.models.presets import PRESETS

    torch.manual_seed(0)
    return AutoencoderKL(**PRESETS["base"]["vae"]).to("cuda").eval().requires_grad_(False)


def bench_encode(vae, dtype_name: str, batch: int, args) -> dict:
    """Median seconds per encode call and peak memory for one dtype / batch size."""
    import torch

    from library.data.cachers import VaeEncoder

    dtype = _dtype(dtype_name)
    encoder = VaeEncoder(vae, "cuda", dtype)
    pixels = torch.rand(batch, 3, args.resolution, args.resolution) * 2 - 1  # CPU, as the cacher gives it
    for _ in range(args.warmup):
        encoder(pixels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        encoder(pixels)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"dtype": dtype_name, "batch": batch, "median_s": median, "images_per_s": batch / median,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def _write_images(folder: Path, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(count):
        arr = np.stack([np.add.outer(ramp, ramp * (i % 7) / 7) % 256, np.tile(ramp, (size, 1)),
                        np.full((size, size), (i * 37) % 256, np.float32)], axis=-1).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:05d}.jpg", quality=90)


def _group(folder: Path, size: int, batch: int):
    from library.config.dataset_toml import DatasetConfig, SubsetConfig
    from library.data.dataset import DataOptions, DatasetGroup

    config = DatasetConfig(resolution=(size, size), batch_size=batch, enable_bucket=True, min_bucket_reso=256,
                           max_bucket_reso=2 * size, bucket_reso_steps=64,
                           subsets=[SubsetConfig(image_dir=str(folder), class_tokens="bench", flip_aug=True)])
    return DatasetGroup([config], DataOptions(seed=0))


def bench_pipeline(vae, args, root: Path) -> dict:
    """End-to-end ``cache_latents`` to disk, bf16, VAE batch 8."""
    import torch

    from library.data.cachers import LatentCacheOptions, VaeEncoder

    folder = root / "pipeline"
    _write_images(folder, args.pipeline_images, args.resolution)
    group = _group(folder, args.resolution, 8)
    encoder = VaeEncoder(vae, "cuda", torch.bfloat16)
    encoder(torch.zeros(1, 3, args.resolution, args.resolution))  # warm-up
    torch.cuda.synchronize()
    opts = LatentCacheOptions(vae_dtype="bfloat16", vae_batch_size=8, to_disk=True, num_workers=4,
                              show_progress=False)
    start = time.perf_counter()
    report = group.cache_latents(encoder, "bench-vae", opts)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images": report.computed, "seconds": seconds, "images_per_s": report.computed / seconds,
            "flip_aug": True}


def bench_loader(args, root: Path) -> dict:
    """Batches/s of the DataLoader over an on-disk latent cache (random latents)."""
    import torch

    from library.data.cachers import LatentCacheOptions
    from library.data.dataset import make_dataloader

    folder = root / "loader"
    _write_images(folder, args.loader_images, args.resolution)
    group = _group(folder, args.resolution, 8)

    def fake_encode(pixels):
        """Random latents of the right shape: the loader, not the VAE, is measured here."""
        b, _, h, w = pixels.shape
        return torch.randn(b, 4, h // 8, w // 8)

    group.cache_latents(fake_encode, "bench-fake", LatentCacheOptions(to_disk=True, show_progress=False))
    loader = make_dataloader(group, num_workers=args.loader_workers, persistent_workers=True, pin_memory=True)
    rates = []
    for epoch in range(1, 4):  # epoch 1 warms workers and the page cache
        group.set_epoch(epoch)
        start = time.perf_counter()
        count = 0
        for batch in loader:
            batch["latents"].to("cuda", non_blocking=True)
            count += 1
        torch.cuda.synchronize()
        if epoch > 1:
            rates.append(count / (time.perf_counter() - start))
    batches = statistics.median(rates)
    return {"images": args.loader_images, "batch": 8, "workers": args.loader_workers,
            "batches_per_s": batches, "samples_per_s": batches * 8}


def markdown(results: dict) -> str:
    """The results as a markdown table plus two summary lines."""
    lines = [f"Device: {results['device']}, torch {results['torch']}, {results['date']}", "",
             "| VAE dtype | batch | median s/call | images/s | peak GiB |", "|---|---|---|---|---|"]
    for r in results["encode"]:
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['median_s']:.4f} | {r['images_per_s']:.2f} | "
                     f"{r['peak_mem_gib']:.2f} |")
    if results.get("pipeline"):
        p = results["pipeline"]
        lines += ["", f"End-to-end cache_latents (bf16, batch 8, flip_aug, to disk): {p['images']} images in "
                      f"{p['seconds']:.2f} s = {p['images_per_s']:.2f} images/s"]
    if results.get("loader"):
        r = results["loader"]
        lines += ["", f"Cached-latent loader ({r['workers']} workers, batch {r['batch']}): "
                      f"{r['batches_per_s']:.1f} batches/s = {r['samples_per_s']:.1f} samples/s"]
    return "\n".join(lines)


def main(argv=None) -> None:
    """Run every part, print markdown and JSON."""
    import torch

    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "resolution": args.resolution, "encode": []}
    vae = build_vae()
    for name in args.dtypes:
        for batch in args.batch_sizes:
            results["encode"].append(bench_encode(vae, name, batch, args))
            torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        if args.pipeline_images:
            results["pipeline"] = bench_pipeline(vae, args, Path(tmp))
        del vae
        torch.cuda.empty_cache()
        if args.loader_images:
            results["loader"] = bench_loader(args, Path(tmp))
    print(markdown(results))
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
