"""Convert an SDXL checkpoint between the single-file layout and a diffusers folder.

    python tools/convert_sdxl_checkpoint.py IN OUT [--save_precision fp16] [--vae VAE]

IN is a .safetensors/.ckpt single file or a diffusers folder. OUT's form picks the output: a
path ending in .safetensors or .ckpt writes a single file (SDXL base 1.0 keys and layouts);
anything else writes a diffusers StableDiffusionXLPipeline folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import UserError, run_cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="SDXL single file (.safetensors/.ckpt) or diffusers folder to read")
    p.add_argument("output", help="where to write: *.safetensors / *.ckpt for a single file, else a diffusers folder")
    p.add_argument("--save_precision", choices=["float", "fp16", "bf16"], default=None,
                   help="dtype of the written weights (default: as read)")
    p.add_argument("--vae", default=None, help="replace the VAE with this file or folder before writing")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from library.models.checkpoint_io import load_sdxl, save_diffusers_folder, save_single_file
    from library.models.metadata import modelspec_metadata

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if Path(args.input).resolve() == out.resolve():
        raise UserError("input and output are the same path")
    models = load_sdxl(args.input, vae=args.vae)
    if out.suffix.lower() in (".safetensors", ".ckpt"):
        meta = dict(models.metadata)
        meta.update(modelspec_metadata(title=meta.get("modelspec.title", out.stem)))
        save_single_file(models, out, args.save_precision, metadata=meta)
    else:
        save_diffusers_folder(models, out, args.save_precision)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
