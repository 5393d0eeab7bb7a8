"""Real sd-scripts SDXL TOMLs (tests/data/sd_scripts_tomls/) run here with only paths and sizes changed.

Every file is parsed, validated and its dataset scanned (cheap, no model); the kohya_ss-GUI-style
LoRA TOML and one collected full fine-tune TOML also train for one step on the tiny model.
Each collected file names its source URL in its first comment line.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.config.args import build_trainer_parser, parse_args_with_config
from library.config.dataset_cli import dataset_configs_from_values
from library.config.schema import validate_training_args
from library.data.dataset import DataOptions, DatasetGroup
from library.errors import UserError

TOMLS = Path(__file__).resolve().parent.parent / "data" / "sd_scripts_tomls"
SIZES = {"resolution": '"64,64"', "min_bucket_reso": "32", "max_bucket_reso": "128", "bucket_reso_steps": "32",
         "train_batch_size": "1", "max_data_loader_n_workers": "0", "max_train_steps": "1"}
IMAGE_SIZES = [(64, 64), (96, 64), (64, 96), (80, 80)]


def _images(folder: Path, exts: tuple[str, ...], seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(IMAGE_SIZES):
        path = folder / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        for ext in exts:
            path.with_suffix(ext).write_text(f"a shape, number {i}", encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture()
def place(tmp_path) -> dict:
    """Where the adapted TOMLs point: DreamBooth folders, a regularisation folder, a metadata file."""
    db = tmp_path / "db" / "10_sks shape"
    _images(db, (".caption", ".txt"), 0)
    reg = tmp_path / "reg"
    _images(reg, (".txt",), 1)
    ft = tmp_path / "ft"
    meta = {p.stem: {"caption": f"shape {p.stem}", "tags": "red, round"} for p in _images(ft, (), 2)}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    (tmp_path / "prompts.txt").write_text("a shape --w 64 --h 64 --s 2\n", encoding="utf-8")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"placeholder: these tests do not load the model")
    return {"root": tmp_path, "db": db.parent, "db_subset": db, "reg": reg, "ft": ft, "model": model}


def adapt(name: str, place: dict, model: Path | None = None) -> Path:
    """Copy ``name`` with its paths and sizes replaced (every other line stays as written)."""
    root = place["root"]
    text = (TOMLS / name).read_text(encoding="utf-8")
    in_json = re.search(r"^\s*in_json\s*=", text, re.M) is not None
    paths = {"pretrained_model_name_or_path": model or place["model"], "output_dir": root / "out",
             "logging_dir": root / "logs", "in_json": root / "meta.json", "sample_prompts": root / "prompts.txt",
             "train_data_dir": place["ft"] if in_json else place["db"]}
    image_dirs = iter([place["db_subset"], place["reg"]])
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\s*)([A-Za-z0-9_]+)\s*=\s*(.*)$", line)
        if m:
            indent, key, value = m.groups()
            keep_unset = value.strip() == '""' and key != "train_data_dir"  # "" means "not set": leave it
            if key in paths and not keep_unset:
                line = f"{indent}{key} = {json.dumps(str(paths[key]))}"
            elif key == "image_dir":
                line = f"{indent}{key} = {json.dumps(str(next(image_dirs)))}"
            elif key in SIZES:
                line = f"{indent}{key} = {SIZES[key]}"
        out.append(line)
    target = root / name
    target.write_text("\n".join(out) + "\n", encoding="utf-8")
    return target


# file, script, extra command line (as the file's own launch script gives it), expected values
CASES = [
    ("god_base_diffusion_sdxl.toml", "train_network", [],
     {"network_dim": 16, "text_encoder_lr": [1e-5], "unet_lr": 1e-5, "optimizer_type": "AdamW8Bit",
      "max_token_length": None, "torch_compile": False, "sample_prompts": None, "huggingface_repo_id": None,
      "scale_weight_norms": 5.0, "bucket_no_upscale": True, "xformers": True}),
    ("motimalu_prodigy_01_eps.toml", "train_network", [],
     {"max_token_length": 225, "multires_noise_iterations": 6, "full_bf16": True, "text_encoder_lr": [1.0],
      "optimizer_type": "Prodigy", "max_train_epochs": 30, "clip_skip": 2}),
    ("motimalu_train_full_sdxl_vpred.toml", "train", ["--dataset_config", "motimalu_train_dataset_sdxl.toml"],
     {"v_parameterization": True, "train_text_encoder": True, "max_grad_norm": 0.0, "mixed_precision": "no",
      "optimizer_args": ["scale_parameter=False", "relative_step=False", "warmup_init=False"],
      "save_n_epoch_ratio": None, "noise_offset": 0.0357, "persistent_data_loader_workers": True}),
    ("coder_gx_xl_lora_config.toml", "train_network", [],
     {"cache_text_encoder_outputs": True, "network_train_unet_only": True, "dataset_repeats": 10,
      "network_args": ["conv_dim=32", "conv_alpha=16"], "optimizer_type": "AdaFactor", "log_with": "tensorboard",
      "max_token_length": None, "mixed_precision": "fp16"}),
    ("coder_gx_xl_finetune_config.toml", "train", [],
     {"max_timestep": 100, "gradient_accumulation_steps": 4, "train_text_encoder": False, "learning_rate": 1e-7,
      "cache_text_encoder_outputs": True}),
    ("kohya_gui_style_lora.toml", "train_network", [],
     {"enable_bucket": False, "persistent_data_loader_workers": False, "keep_tokens": 0, "text_encoder_lr": None,
      "lr_scheduler_args": None, "vae": None, "max_token_length": None, "network_train_unet_only": True}),
]
WARNINGS = {"kohya_gui_style_lora.toml": ["unknown option 'learning_rte'", "did you mean 'learning_rate'?"]}


def _argv(case, place) -> list[str]:
    name, _, extra, _ = case
    argv = ["--config_file", str(adapt(name, place))]
    for i, item in enumerate(extra):
        argv.append(str(adapt(item, place)) if item.endswith(".toml") and extra[i - 1] == "--dataset_config" else item)
    return argv


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sd_scripts_toml_parses_validates_and_scans(case, place, caplog):
    name, script, _, expected = case
    argv = _argv(case, place)
    with caplog.at_level(logging.WARNING, logger="library.config.config_file"):
        ns = parse_args_with_config(build_trainer_parser(script), argv)
    warnings = [r.getMessage() for r in caplog.records if r.name == "library.config.config_file"]
    want = WARNINGS.get(name, [])
    assert all(any(w in msg for msg in warnings) for w in want) and len(warnings) == (1 if want else 0), warnings
    precision = ns.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():  # on this CPU-only machine
        with pytest.raises(UserError, match="--mixed_precision fp16 needs a GPU"):
            validate_training_args(argparse.Namespace(**vars(ns)), script)
        ns.mixed_precision = "no"  # the rest of the check as it runs on a GPU machine
    validate_training_args(ns, script)
    for key, value in expected.items():
        assert (precision if key == "mixed_precision" else getattr(ns, key)) == value, key
    values = dict(vars(ns))
    configs, source = dataset_configs_from_values(values)
    group = DatasetGroup(configs, DataOptions.from_values(values), source=source)
    assert group.num_train_images == 4 * (10 if values.get("in_json") else 1 if values.get("dataset_config") else 10)
    # the caching tools take the same training TOML, ignoring what they do not use
    from tools.cache_latents import build_parser

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="library.config.config_file"):
        cached = parse_args_with_config(build_parser("cache"), argv)
    assert cached.pretrained_model_name_or_path == str(place["model"])
    assert len([r for r in caplog.records if r.name == "library.config.config_file"]) == len(warnings)


def _train_in_process(script_module, argv):
    from accelerate.state import AcceleratorState

    try:
        script_module.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.slow
def test_gui_style_lora_toml_trains_without_buckets(place, tiny_ckpt, monkeypatch):
    """The GUI-style TOML (no buckets, images of four sizes) trains a step; the file's hash is sd-scripts'."""
    import hashlib

    from safetensors import safe_open

    import sdxl_train_network

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    case = next(c for c in CASES if c[0] == "kohya_gui_style_lora.toml")
    argv = ["--config_file", str(adapt(case[0], place, model=tiny_ckpt))]
    _train_in_process(sdxl_train_network, argv)
    out = place["root"] / "out" / "gui_lora.safetensors"
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    datasets = json.loads(meta["ss_datasets"])
    assert datasets[0]["enable_bucket"] is False and datasets[0]["resolution"] == [64, 64]
    assert meta["ss_max_token_length"] == "None"  # max_token_length = 75 is the default length


@pytest.mark.slow
def test_collected_full_finetune_toml_trains_one_step(place, tiny_ckpt, monkeypatch):
    import sdxl_train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--config_file", str(adapt("motimalu_train_full_sdxl_vpred.toml", place, model=tiny_ckpt)),
            "--dataset_config", str(adapt("motimalu_train_dataset_sdxl.toml", place)), "--max_train_steps", "1"]
    _train_in_process(sdxl_train, argv)
    saved = sorted((place["root"] / "out").glob("noobai-vpred-1.0-name-fp32-b4lr6e-6*.safetensors"))
    assert saved, sorted(p.name for p in (place["root"] / "out").iterdir())
