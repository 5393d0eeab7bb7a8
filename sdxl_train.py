"""Fine-tune Stable Diffusion XL: the U-Net, optionally both text encoders, with per-block learning rates.

    accelerate launch sdxl_train.py --config_file config.toml
    python sdxl_train.py --pretrained_model_name_or_path sdxl.safetensors --in_json meta.json \\
        --train_data_dir images --output_dir out --learning_rate 4e-7 --optimizer_type adafactor

Options are sd-scripts' (see docs/train.md); a TOML of them is read with --config_file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import run_cli  # noqa: E402


def make_method(ns, cfg):
    """The training method for the parsed options (the script boundary: the namespace stops here)."""
    from library.config.schema import block_lr_or_none
    from library.training.finetune import FineTuneMethod, FineTuneOptions

    return FineTuneMethod(FineTuneOptions.from_namespace(ns, block_lr_or_none(ns)), cfg.learning_rate)


def main(argv=None) -> None:
    from library.training.cli import train_main

    train_main("train", __doc__, make_method, argv)


if __name__ == "__main__":
    run_cli(main)
