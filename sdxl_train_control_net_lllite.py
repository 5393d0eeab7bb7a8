"""Train a ControlNet-LLLite on Stable Diffusion XL.

    accelerate launch sdxl_train_control_net_lllite.py --pretrained_model_name_or_path sdxl.safetensors \\
        --train_data_dir data --conditioning_data_dir data_canny --output_dir out \\
        --cond_emb_dim 32 --network_dim 64 --cache_latents --cache_text_encoder_outputs

Control images pair with training images by file stem and get exactly the same resize, crop and flip.
Options are sd-scripts' (see docs/train_lllite.md); a TOML of them is read with --config_file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import run_cli  # noqa: E402


def make_method(ns, cfg):
    """The training method for the parsed options (the script boundary: the namespace stops here)."""
    import networks.control_net_lllite as factory
    from library.training.lllite import LLLiteMethod, LLLiteOptions, check_sample_guides

    check_sample_guides(getattr(ns, "sample_prompts", None))
    return LLLiteMethod(LLLiteOptions.from_namespace(ns), factory)


def main(argv=None) -> None:
    from library.config.dataset_toml import CONTROLNET
    from library.training.cli import train_main

    train_main("train_control_net_lllite", __doc__, make_method, argv, allowed_kinds=(CONTROLNET,))


if __name__ == "__main__":
    run_cli(main)
