#!/usr/bin/env python3
"""Extra assets for the configs bench/anchor_extra.sh adds to the side-by-side harness.

    anchor_assets.py cond --images DIR --out DIR
        one control image per training image of DIR (same stem, PNG, same size): its edge map
        (white contour lines of the grey image cut into 8 bands, PIL's FIND_EDGES), as RGB
    anchor_assets.py lllite --out FILE [--cond_emb_dim 32] [--network_dim 64]
        a ControlNet-LLLite file with random weights for the full-size SDXL U-Net, in sd-scripts'
        key layout (the generation configs use it when no LLLite training config left a file)

``cond`` needs only Pillow; ``lllite`` needs the project on the path (torch, diffusers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def build_cond(images: Path, out: Path) -> int:
    """Write ``out/<stem>.png`` (edge map) for every image in ``images``; returns how many."""
    from PIL import Image, ImageFilter, ImageOps

    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"anchor_assets.py cond: no images in {images}")
    out.mkdir(parents=True, exist_ok=True)
    for file in files:
        with Image.open(file) as im:
            # grey levels in 8 bands first, so that smooth images still give contour lines
            edges = ImageOps.posterize(im.convert("L"), 3).filter(ImageFilter.FIND_EDGES)
            edges = edges.point(lambda v: 255 if v > 0 else 0)
        tmp = out / f".{file.stem}.tmp.png"
        edges.convert("RGB").save(tmp, format="PNG")
        tmp.replace(out / f"{file.stem}.png")
    return len(files)


def build_lllite(out: Path, cond_emb_dim: int, network_dim: int, seed: int = 0) -> int:
    """Write a random-weight LLLite file for SDXL base shapes; returns the number of tensors."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from library.models.presets import build_random
    from networks.control_net_lllite import ControlNetLLLite, LLLiteSettings

    unet = build_random("base", meta=True).unet  # shapes only: the network needs module names and widths
    net = ControlNetLLLite(unet, LLLiteSettings(cond_emb_dim=cond_emb_dim, mlp_dim=network_dim))
    net.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    out.parent.mkdir(parents=True, exist_ok=True)
    net.save_weights(out, dtype=torch.float16)
    return len(net.state_dict())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cond", help="edge-map control images, one per training image, same stem")
    c.add_argument("--images", required=True, type=Path, help="folder of training images")
    c.add_argument("--out", required=True, type=Path, help="folder for the control images")
    ll = sub.add_parser("lllite", help="a random-weight ControlNet-LLLite file (sd-scripts' keys)")
    ll.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    ll.add_argument("--cond_emb_dim", type=int, default=32, help="conditioning embedding width (default 32)")
    ll.add_argument("--network_dim", type=int, default=64, help="LLLite MLP width (default 64)")
    a = p.parse_args()
    if a.cmd == "cond":
        n = build_cond(a.images, a.out)
        print(f"[cond] {n} control images in {a.out}")
    else:
        n = build_lllite(a.out, a.cond_emb_dim, a.network_dim)
        print(f"[lllite] {n} tensors in {a.out}")


if __name__ == "__main__":
    main()
