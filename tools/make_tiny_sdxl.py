"""Write a tiny random SDXL-shaped model (single file AND diffusers folder) plus sample images.

    python tools/make_tiny_sdxl.py OUT_DIR [--seed 0] [--images 8]

OUT_DIR/tiny_sdxl.safetensors   the Stability-AI single-file layout
OUT_DIR/tiny_sdxl_diffusers/    the same weights as a diffusers StableDiffusionXLPipeline folder
OUT_DIR/train/10_sks shape/     DreamBooth-style sample images of mixed sizes with .caption files
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder to write the tiny model (and sample images) into")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    p.add_argument("--images", type=int, default=8, help="number of sample training images to write (0: none)")
    return p.parse_args(argv)


def write_sample_images(folder: Path, count: int, seed: int) -> None:
    """Simple coloured shapes of mixed sizes and aspect ratios, each with a caption."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(64, 64), (96, 64), (64, 96), (80, 80), (128, 72), (72, 128)]
    shapes = ["circle", "square"]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(img)
        shape = shapes[i % 2]
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        img.save(folder / f"img_{i:03d}.png")
        (folder / f"img_{i:03d}.caption").write_text(f"sks {shape}, plain background", encoding="utf-8")


def main(argv=None) -> None:
    args = parse_args(argv)
    from library.models.checkpoint_io import save_diffusers_folder, save_single_file
    from library.models.metadata import modelspec_metadata
    from library.models.presets import build_random

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = build_random("tiny", seed=args.seed)
    meta = modelspec_metadata(title="tiny-sdxl", kind="checkpoint", resolution=(64, 64))
    save_single_file(models, out / "tiny_sdxl.safetensors", metadata=meta)
    save_diffusers_folder(models, out / "tiny_sdxl_diffusers")
    if args.images:
        write_sample_images(out / "train" / "10_sks shape", args.images, args.seed)
    print(f"wrote {out / 'tiny_sdxl.safetensors'} and {out / 'tiny_sdxl_diffusers'}")


if __name__ == "__main__":
    run_cli(main)
