"""Train a LoRA (or any --network_module) on Stable Diffusion XL.

    accelerate launch sdxl_train_network.py --config_file config.toml
    python sdxl_train_network.py --pretrained_model_name_or_path sdxl.safetensors \\
        --train_data_dir data --output_dir out --network_module networks.lora --network_dim 16

Options are sd-scripts' (see docs/train_network.md); a TOML of them is read with --config_file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import run_cli  # noqa: E402


def main(argv=None) -> None:
    from library.config.args import build_trainer_parser, parse_args_with_config
    from library.config.schema import validate_training_args
    from library.training.cli import build_data, configure_logging, make_sampler_callback
    from library.training.config import TrainConfig
    from library.training.methods import NetworkMethod, NetworkOptions
    from library.training.setup import run_training

    parser = build_trainer_parser("train_network", description=__doc__)
    ns = parse_args_with_config(parser, argv)
    configure_logging(ns)
    validate_training_args(ns, "train_network")
    cfg = TrainConfig.from_namespace(ns)
    data = build_data(ns, cfg)  # scans every image before any model loads
    method = NetworkMethod(NetworkOptions.from_namespace(ns))
    path = run_training(cfg, data, method, make_sampler_callback(ns))
    if path is not None:
        print(f"saved {path}")


if __name__ == "__main__":
    run_cli(main)
