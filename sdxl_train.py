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


def main(argv=None) -> None:
    from library.config.args import build_trainer_parser, parse_args_with_config
    from library.config.schema import block_lr_or_none, validate_training_args
    from library.training.cli import build_data, configure_logging, make_sampler_callback
    from library.training.config import TrainConfig
    from library.training.finetune import FineTuneMethod, FineTuneOptions
    from library.training.setup import run_training

    parser = build_trainer_parser("train", description=__doc__)
    ns = parse_args_with_config(parser, argv)
    configure_logging(ns)
    validate_training_args(ns, "train")
    cfg = TrainConfig.from_namespace(ns)
    data = build_data(ns, cfg)  # scans every image before any model loads
    method = FineTuneMethod(FineTuneOptions.from_namespace(ns, block_lr_or_none(ns)), cfg.learning_rate)
    path = run_training(cfg, data, method, make_sampler_callback(ns))
    if path is not None:
        print(f"saved {path}")


if __name__ == "__main__":
    run_cli(main)
