"""The example TOMLs of README.md parse and pass the option checks (with their paths made real)."""

from __future__ import annotations

import re

import pytest

from library.config.args import build_trainer_parser, parse_args_with_config
from library.config.schema import validate_training_args
from tests.conftest import ROOT

BLOCKS = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("index, script", [(0, "train_network"), (1, "train")])
def test_readme_example_toml_is_valid(tmp_path, index, script):
    model = tmp_path / "sd_xl_base_1.0.safetensors"
    model.write_bytes(b"placeholder")
    (tmp_path / "train").mkdir()
    (tmp_path / "prompts.txt").write_text("a dog\n", encoding="utf-8")
    text = (BLOCKS[index].replace("/models/sd_xl_base_1.0.safetensors", str(model))
            .replace("/data/train", str(tmp_path / "train")).replace("/data/prompts.txt", str(tmp_path / "prompts.txt"))
            .replace('"/out/', f'"{tmp_path}/out/'))
    cfg = tmp_path / "example.toml"
    cfg.write_text(text, encoding="utf-8")
    ns = parse_args_with_config(build_trainer_parser(script), ["--config_file", str(cfg)])
    validate_training_args(ns, script)
    assert ns.pretrained_model_name_or_path == str(model) and ns.mixed_precision == "bf16"
    assert (ns.network_module == "networks.lora") if script == "train_network" else ns.train_text_encoder
