"""Train a textual-inversion embedding for both SDXL text encoders.

    accelerate launch sdxl_train_textual_inversion.py --config_file ti.toml
    python sdxl_train_textual_inversion.py --pretrained_model_name_or_path sdxl.safetensors \\
        --train_data_dir data --output_dir out --output_name mytoken \\
        --token_string mytoken --init_word dog --num_vectors_per_token 4

Every training caption must contain --token_string (or use --use_object_template /
--use_style_template). The output is {"clip_l": [N, 768], "clip_g": [N, 1280]} (pt by default,
or safetensors); generate with ``sdxl_gen_img.py --textual_inversion_embeddings out/mytoken.pt``
and say the file stem in the prompt. Options are sd-scripts' (see docs/train_textual_inversion.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import run_cli  # noqa: E402


def make_method(ns, cfg):
    """The training method for the parsed options (the script boundary: the namespace stops here).

    Checks the token string against both tokenizers here, before any model loads.
    """
    from library.models.tokenizers import load_tokenizers
    from library.training.textual_inversion import (
        TextualInversionMethod,
        TextualInversionOptions,
    )

    return TextualInversionMethod(TextualInversionOptions.from_namespace(ns), load_tokenizers(cfg.tokenizer_cache_dir))


def main(argv=None) -> None:
    from library.training.cli import train_main

    train_main("train_textual_inversion", __doc__, make_method, argv)


if __name__ == "__main__":
    run_cli(main)
