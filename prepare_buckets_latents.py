"""Assign buckets to a fine-tuning dataset and cache its VAE latents (sd-scripts' finetune flow).

    python prepare_buckets_latents.py TRAIN_DATA_DIR IN_JSON OUT_JSON MODEL
        --max_resolution 1024,1024 --max_bucket_reso 2048 --batch_size 4 [--flip_aug] [--skip_existing]

Reads the metadata JSON (captions/tags per image key), puts every image of TRAIN_DATA_DIR that has
an entry into an aspect-ratio bucket, writes its latents to ``<image path without ext>.npz`` (the
legacy name training looks for first) and writes OUT_JSON: the metadata plus ``train_resolution``
[w, h] (the bucket) and ``image_size`` [w, h] per image. See docs/prepare_buckets_latents.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import UserError, run_cli  # noqa: E402

logger = logging.getLogger("prepare_buckets_latents")


_FLAGS = [
    ("--v2", "Ignored (SDXL only); accepted for compatibility."),
    ("--bucket_no_upscale", "Never enlarge images: buckets from their own size."),
    ("--no_half_vae", "Keep the VAE in float32 whatever --mixed_precision says."),
    ("--full_path", "Metadata keys are full image paths, not file stems."),
    ("--flip_aug", "Also cache the latents of the mirrored image."),
    ("--alpha_mask", "Also cache the alpha channel as a loss mask."),
    ("--skip_existing", "Keep .npz files that are valid for this run."),
    ("--recursive", "Also look for images in sub-folders."),
    ("--skip_bad_images", "Leave unreadable images out (each is listed) instead of stopping."),
]


def build_parser() -> argparse.ArgumentParser:
    """sd-scripts' positional arguments and options of finetune/prepare_buckets_latents.py."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of the training images")
    p.add_argument("in_json", help="metadata JSON to read (captions / tags per image key)")
    p.add_argument("out_json", help="metadata JSON to write (with train_resolution and image_size)")
    p.add_argument("model_name_or_path", help="SDXL checkpoint file or diffusers folder (its VAE is used)")
    p.add_argument("--batch_size", type=int, default=1, help="VAE batch size.")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None,
                   help="Threads loading images ahead of the VAE (default 2).")
    p.add_argument("--max_resolution", type=str, default="512,512",
                   help="Training area 'WIDTH,HEIGHT'; SDXL needs 1024,1024 (the default 512,512 is sd-scripts').")
    p.add_argument("--min_bucket_reso", type=int, default=256, help="Smallest bucket side.")
    p.add_argument("--max_bucket_reso", type=int, default=1024, help="Largest bucket side (2048 suits SDXL).")
    p.add_argument("--bucket_reso_steps", type=int, default=64, help="Bucket sides are multiples of this (32 or 64).")
    p.add_argument("--mixed_precision", type=str, default="no", choices=("no", "fp16", "bf16"),
                   help="dtype of the VAE: bf16 runs it in bf16 unless --no_half_vae; fp16 and no run it in "
                        "float32 (the SDXL VAE overflows in fp16), the rule the trainers use.")
    for name, help_text in _FLAGS:
        p.add_argument(name, action="store_true", help=help_text)
    return p


def parse_max_resolution(text: str) -> tuple:
    """'W,H' or 'S' -> (W, H); UserError otherwise."""
    try:
        sides = [int(v) for v in str(text).split(",")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) <= 0:
        raise UserError(f"--max_resolution {text!r}: expected 'WIDTH,HEIGHT' such as 1024,1024")
    return sides[0], sides[-1]


def read_metadata(path: str) -> dict:
    """The metadata JSON object; UserError when missing or malformed."""
    from library.data.dataset_items import load_metadata

    if not os.path.isfile(path):
        raise UserError(f"in_json {path}: file not found")
    data = dict(load_metadata(path))
    if not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f"in_json {path}: expected {{image key: {{\"caption\": ..., \"tags\": ...}}}}")
    return data


def plan_items(args, metadata: dict) -> list:
    """``[(metadata key, LatentCacheItem)]`` for every listed image with a metadata entry."""
    from library.data.buckets import BucketManager, crop_for
    from library.data.cache import legacy_latent_cache_path
    from library.data.cachers import LatentCacheItem
    from library.data.dataset_items import list_folder_images
    from library.data.images import scan_images

    if not os.path.isdir(args.train_data_dir):
        raise UserError(f"train_data_dir {args.train_data_dir}: folder not found")
    pairs = []
    for path in list_folder_images(args.train_data_dir, args.recursive):
        key = os.path.abspath(path) if args.full_path else os.path.splitext(os.path.basename(path))[0]
        if key in metadata or path in metadata:
            pairs.append((key if key in metadata else path, path))
    skipped = len(metadata) - len(pairs)
    if skipped > 0:
        logger.warning("%d metadata entries have no image in %s (with --full_path keys are full "
                       "paths, else file stems)", skipped, args.train_data_dir)
    scan = scan_images([p for _, p in pairs], num_workers=4 if len(pairs) > 8 else 0)
    scan.raise_if_bad(args.skip_bad_images)
    manager = BucketManager(parse_max_resolution(args.max_resolution), min_size=args.min_bucket_reso,
                            max_size=args.max_bucket_reso, step=args.bucket_reso_steps,
                            no_upscale=args.bucket_no_upscale)
    out = []
    for key, path in pairs:
        if path not in scan.sizes:
            continue
        size = scan.sizes[path]
        placed = manager.assign(size, path=path)
        plan = crop_for(size, placed.bucket, False, None, resized=placed.resized_size)
        out.append((key, LatentCacheItem(path, size, placed.bucket, placed.resized_size,
                                         (plan.left, plan.top), plan.crop_ltrb,
                                         legacy_latent_cache_path(path), fingerprint=scan.fingerprints.get(path))))
    if not out:
        raise UserError(f"no image of {args.train_data_dir} has an entry in {args.in_json}")
    return out


def main(argv=None) -> None:
    """Bucket, cache latents, write out_json."""
    from library.data.buckets import check_bucket_reso_steps  # torch-free: option errors stay quick

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    check_bucket_reso_steps(args.bucket_reso_steps, "--bucket_reso_steps")
    width, height = parse_max_resolution(args.max_resolution)
    if width * height < 1024 * 1024:
        logger.warning("--max_resolution %dx%d is below SDXL's 1024x1024; pass --max_resolution 1024,1024 "
                       "(and --max_bucket_reso 2048) unless you really train SDXL at a lower resolution",
                       width, height)
    if not os.path.isfile(args.in_json):
        raise UserError(f"in_json {args.in_json}: file not found")
    if not os.path.isdir(args.train_data_dir):
        raise UserError(f"train_data_dir {args.train_data_dir}: folder not found")
    import torch  # the heavy imports start here

    from library.data.cachers import LatentCacheOptions, LatentCacher, VaeEncoder, module_fingerprint, vae_cache_dtype
    from library.models.atomic import atomic_path
    from tools.cache_latents import load_vae_for

    metadata = read_metadata(args.in_json)
    items = plan_items(args, metadata)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = vae_cache_dtype(args.mixed_precision, getattr(args, "no_half_vae", False))  # the trainers' rule
    vae = load_vae_for(args.model_name_or_path, None, None)  # weights as stored: the trainers' fingerprint
    vae_id = module_fingerprint(vae)
    options = LatentCacheOptions(
        vae_dtype=str(dtype).replace("torch.", ""), vae_batch_size=args.batch_size, to_disk=True,
        skip_existing=args.skip_existing, flip_aug=args.flip_aug, alpha_mask=args.alpha_mask,
        num_workers=args.max_data_loader_n_workers if args.max_data_loader_n_workers is not None else 2)
    report = LatentCacher(VaeEncoder(vae, device, dtype), vae_id, options).cache(
        [item for _, item in items])
    for key, item in items:
        metadata[key]["train_resolution"] = list(item.bucket_reso)
        metadata[key]["image_size"] = list(item.original_size)
    with atomic_path(args.out_json) as tmp:
        tmp.write_text(json.dumps(metadata, indent=2, ensure_ascii=False), encoding="utf-8")
    for (w, h), count in sorted(Counter(tuple(item.bucket_reso) for _, item in items).items()):
        logger.info("bucket %dx%d: %d image(s)", w, h, count)
    print(f"latents: {report.computed} computed, {report.reused} reused; wrote {args.out_json}", flush=True)


if __name__ == "__main__":
    run_cli(main)
