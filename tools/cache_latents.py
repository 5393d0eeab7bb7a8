"""Cache VAE latents of a training dataset to disk (``<stem>_<W>x<H>_sdxl.npz`` next to each image).

    python tools/cache_latents.py --pretrained_model_name_or_path MODEL --dataset_config data.toml [--sdxl]
    accelerate launch tools/cache_latents.py ...      # several processes: each caches its own share

Takes the same dataset options as the trainers (``--dataset_config`` or ``--train_data_dir`` ...,
``--resolution``, buckets, ``--flip_aug``, ``--alpha_mask``), so the files match what training
uses. Files that are valid for this run are kept; stale ones (edited image, other bucket, VAE or
dtype) are recomputed. See docs/caching.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import UserError, run_cli  # noqa: E402

logger = logging.getLogger(__name__)
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def build_parser(description: str) -> argparse.ArgumentParser:
    """The options of both caching tools: the trainers' model, dataset, caching and precision
    groups plus ``--sdxl``, ``--flux`` and ``--skip_existing``."""
    from library.config.args import (add_caching_args, add_dataset_args, add_model_args,
                                     add_precision_args, add_training_args)

    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (add_model_args, add_dataset_args, add_caching_args, add_precision_args, add_training_args):
        add(parser)
    parser.add_argument("--sdxl", action="store_true", help="Accepted for compatibility: the model is SDXL.")
    parser.add_argument("--flux", action="store_true", help="Not supported (this toolkit trains SDXL only).")
    parser.add_argument("--skip_existing", action="store_true",
                        help="Keep cache files that are valid for this run (always done; accepted for "
                             "compatibility). Stale files are recomputed.")
    return parser


class Processes:
    """This process's place among the caching processes: ``index``, ``count``, ``device`` and
    ``wait()``. Under ``accelerate launch`` (WORLD_SIZE > 1) it comes from accelerate's
    PartialState; a plain run is process 0 of 1 and touches no global state."""

    def __init__(self) -> None:
        import torch

        self._state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self._state = PartialState(cpu=not torch.cuda.is_available())
            self.index, self.count, self.device = (self._state.process_index,
                                                   self._state.num_processes, self._state.device)
        else:
            self.index, self.count = 0, 1
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wait(self) -> None:
        """Wait until every process got here."""
        if self._state is not None:
            self._state.wait_for_everyone()


def prepare(argv, description: str, cache_flag: str):
    """Parse and check the options, build the dataset (reporting every bad image) and find this
    process's place; returns ``(args, dataset group, Processes)``."""
    from library.config.args import parse_args_with_config
    from library.config.dataset_cli import dataset_configs_from_values
    from library.config.schema import normalize_legacy_args
    from library.data.buckets import check_bucket_reso_steps

    args = parse_args_with_config(build_parser(description), argv)
    normalize_legacy_args(args)
    logging.basicConfig(level=getattr(logging, getattr(args, "console_log_level", None) or "INFO"),
                        format="%(levelname)s %(message)s")
    if args.flux or args.v2:
        raise UserError("--flux / --v2: this toolkit caches for SDXL only; remove the option")
    if not args.pretrained_model_name_or_path:
        raise UserError("--pretrained_model_name_or_path is required: the SDXL checkpoint whose "
                        "encoders produce the cache")
    if not (args.dataset_config or args.train_data_dir or args.in_json):
        raise UserError("no data: give --dataset_config or --train_data_dir (or --in_json)")
    for name in ("pretrained_model_name_or_path", "vae"):
        path = getattr(args, name)
        if path and not os.path.exists(path) and (os.path.isabs(path) or path.startswith(".")
                                                  or path.lower().endswith(_WEIGHT_SUFFIXES)):
            raise UserError(f"--{name}: file or folder not found: {path}")
    check_bucket_reso_steps(args.bucket_reso_steps, "--bucket_reso_steps")
    values = dict(vars(args))
    values[cache_flag] = True
    configs = dataset_configs_from_values(values)  # dataset config errors before the heavy imports
    from library.data.dataset import build_dataset_group

    group = build_dataset_group(values, configs=configs)
    return args, group, Processes()


def compute_dtype(args, device):
    """The dtype to run an encoder in: --mixed_precision unless --no_half_vae (fp16 -> fp32 on CPU)."""
    import torch

    if args.mixed_precision == "no" or getattr(args, "no_half_vae", False):
        return torch.float32
    if args.mixed_precision == "fp16" and device.type == "cpu":
        logger.warning("fp16 is not supported on the CPU; encoding in float32")
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]


def load_vae_for(model: str, vae: str | None, dtype):
    """The VAE alone: from ``--vae``, else from the model file/folder (no U-Net is loaded)."""
    from library.models.checkpoint_io import load_sdxl, load_vae

    if vae:
        return load_vae(vae, dtype)
    if os.path.exists(model):
        return load_vae(model, dtype)
    return load_sdxl(model, dtype).vae


def main(argv=None) -> None:
    """Cache the latents of this process's share of the dataset."""
    args, group, procs = prepare(argv, __doc__, "cache_latents_to_disk")
    from library.data.cachers import LatentCacheOptions, VaeEncoder, module_fingerprint, vae_cache_dtype

    dtype = vae_cache_dtype(args.mixed_precision, args.no_half_vae)  # the trainers' rule: same provenance
    vae = load_vae_for(args.pretrained_model_name_or_path, args.vae, None)  # weights as stored
    vae_id = module_fingerprint(vae)  # the id trainers compute for the same weights
    encoder = VaeEncoder(vae, procs.device, dtype, seed=(args.seed or 0) + procs.index)
    options = LatentCacheOptions(
        vae_dtype=str(dtype).replace("torch.", ""), vae_batch_size=args.vae_batch_size, to_disk=True,
        skip_cache_check=args.skip_cache_check, num_workers=min(args.max_data_loader_n_workers, 4),
        show_progress=True)
    report = group.cache_latents(encoder, vae_id, options,
                                 process_index=procs.index, num_processes=procs.count)
    print(f"[process {procs.index + 1}/{procs.count}] latents: {report.computed} computed, "
          f"{report.reused} reused", flush=True)
    procs.wait()


if __name__ == "__main__":
    run_cli(main)
