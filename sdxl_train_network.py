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


def make_method(ns, cfg):
    """The training method for the parsed options (the script boundary: the namespace stops here)."""
    from library.training.methods import NetworkMethod, NetworkOptions

    return NetworkMethod(NetworkOptions.from_namespace(ns))


def main(argv=None) -> None:
    from library.training.cli import train_main

    train_main("train_network", __doc__, make_method, argv)


if __name__ == "__main__":
    run_cli(main)
