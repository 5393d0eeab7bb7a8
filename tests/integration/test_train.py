"""sdxl_train.py (full fine-tune) end to end on the tiny model, on the CPU, launched the way users launch it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import run_main, run_script

pytestmark = pytest.mark.slow

NAME = "ft"
UNET_PREFIX = "model.diffusion_model."
TE_PREFIXES = ("conditioner.embedders.0.", "conditioner.embedders.1.")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread per training process: on 2 shared CPU cores, OpenMP's spinning threads are ~20x slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def base_args(ckpt: Path, data: Path, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(data),
            "--output_dir", str(out), "--output_name", NAME,
            "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
            "--bucket_reso_steps", "32", "--max_data_loader_n_workers", "0", "--seed", "1"]


ADAFACTOR = ["--optimizer_type", "adafactor", "--optimizer_args", "scale_parameter=False", "relative_step=False",
             "warmup_init=False"]
CACHED = ["--cache_latents", "--cache_text_encoder_outputs"]


def train(ckpt: Path, data: Path, out: Path, *extra: str, launch: bool = False):
    """Train in this process (``run_main``); ``launch=True``: as a user launches it, ``python sdxl_train.py``."""
    argv = [*base_args(ckpt, data, out), *extra]
    r = run_script([sys.executable, "sdxl_train.py", *argv]) if launch else run_main("sdxl_train.py", argv)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: {sorted(set(a) ^ set(b))[:5]}"
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:5]}"


def changed_keys(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


# ---------------------------------------------------------------------------------------------
def test_unet_only_adafactor_saves_a_checkpoint_diffusers_reads(tiny_ckpt, tiny_diffusers, dataset, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from library.models.checkpoint_io import load_sdxl

    out = tmp_path / "out"
    train(tiny_ckpt, dataset, out, *CACHED, *ADAFACTOR, "--learning_rate", "1e-4", "--max_train_steps", "3",
          launch=True)
    path = out / f"{NAME}.safetensors"
    assert path.is_file()

    before, after = load_file(tiny_ckpt), load_file(path)
    assert before.keys() == after.keys()
    te_keys = [k for k in before if k.startswith(TE_PREFIXES)]
    assert te_keys
    assert_equal_states({k: before[k] for k in te_keys}, {k: after[k] for k in te_keys}, "text encoders (file)")
    assert changed_keys({k: v for k, v in before.items() if k.startswith(UNET_PREFIX)}, after), "U-Net did not change"

    original, trained = load_sdxl(tiny_ckpt), load_sdxl(path)
    assert_equal_states(state_of(original.text_encoder1), state_of(trained.text_encoder1), "TE1")
    assert_equal_states(state_of(original.text_encoder2), state_of(trained.text_encoder2), "TE2")
    assert changed_keys(state_of(original.unet), state_of(trained.unet))

    meta = metadata(path)
    assert meta["ss_steps"] == "3"
    assert meta["modelspec.architecture"].startswith("stable-diffusion-xl-v1-base")

    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_diffusers))
    for ours, theirs in ((trained.unet, pipe.unet), (trained.vae, pipe.vae),
                         (trained.text_encoder1, pipe.text_encoder), (trained.text_encoder2, pipe.text_encoder_2)):
        assert_equal_states(state_of(ours), state_of(theirs), type(ours).__name__)


def test_train_text_encoder_keeps_te1_last_layer_frozen(tiny_ckpt, dataset, tmp_path):
    from library.models.checkpoint_io import load_sdxl

    out = tmp_path / "out"
    train(tiny_ckpt, dataset, out, "--cache_latents", "--train_text_encoder", "--learning_rate", "1e-3",
          "--max_train_steps", "2")
    original, trained = load_sdxl(tiny_ckpt), load_sdxl(out / f"{NAME}.safetensors")

    te1_a, te1_b = state_of(original.text_encoder1), state_of(trained.text_encoder1)
    last = original.text_encoder1.config.num_hidden_layers - 1
    frozen = {k for k in te1_a if f"layers.{last}." in k or "final_layer_norm" in k}
    assert frozen and any("final_layer_norm" in k for k in frozen)
    assert_equal_states({k: te1_a[k] for k in frozen}, {k: te1_b[k] for k in frozen}, "TE1 last layer + final norm")
    te1_changed = changed_keys(te1_a, te1_b)
    assert te1_changed, "TE1 did not change"
    assert te1_changed == set(te1_a) - frozen, sorted(set(te1_a) - frozen - te1_changed)[:5]

    te2_a, te2_b = state_of(original.text_encoder2), state_of(trained.text_encoder2)
    assert changed_keys(te2_a, te2_b), "TE2 did not change"
    assert changed_keys(state_of(original.unet), state_of(trained.unet)), "U-Net did not change"
    assert_equal_states(state_of(original.vae), state_of(trained.vae), "VAE")


def test_dreambooth_with_regularisation_images(tiny_ckpt, dataset, tmp_path):
    from PIL import Image

    reg = tmp_path / "reg" / "1_shape"
    reg.mkdir(parents=True)
    for i in range(3):
        colour = (40 * i + 30, 200 - 50 * i, 90)
        Image.new("RGB", (64, 64), colour).save(reg / f"reg_{i}.png")
        (reg / f"reg_{i}.caption").write_text("shape")
    out = tmp_path / "out"
    train(tiny_ckpt, dataset, out, *CACHED, "--reg_data_dir", str(tmp_path / "reg"), "--prior_loss_weight", "0.5",
          "--caption_extension", ".caption", "--learning_rate", "1e-4", "--max_train_steps", "2")
    meta = metadata(out / f"{NAME}.safetensors")
    assert int(meta["ss_num_reg_images"]) > 0
    assert meta["ss_num_train_images"] == "80"
    assert meta["ss_steps"] == "2"


def test_adafactor_config_file_from_the_brief(tiny_ckpt, dataset, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "config.toml"
    config.write_text(
        f'pretrained_model_name_or_path = "{tiny_ckpt.as_posix()}"\n'
        f'train_data_dir = "{dataset.as_posix()}"\n'
        f'output_dir = "{out.as_posix()}"\n'
        f'output_name = "{NAME}"\n'
        'optimizer_type = "adafactor"\n'
        'optimizer_args = [ "scale_parameter=False", "relative_step=False", "warmup_init=False" ]\n'
        'lr_scheduler = "constant_with_warmup"\n'
        'lr_warmup_steps = 100\n'
        'learning_rate = 4e-7\n', encoding="utf-8")
    r = run_main("sdxl_train.py", ["--config_file", str(config),
                 "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
                 "--bucket_reso_steps", "32", "--max_data_loader_n_workers", "0", "--seed", "1", *CACHED,
                 "--max_train_steps", "2"])
    assert r.returncode == 0, r.stderr[-4000:]
    meta = metadata(out / f"{NAME}.safetensors")
    assert meta["ss_lr_scheduler"] == "constant_with_warmup"
    assert meta["ss_lr_warmup_steps"] == "100"
    assert float(meta["ss_learning_rate"]) == 4e-7
    assert "adafactor" in meta["ss_optimizer"].lower()


def test_resume_is_exact(tiny_ckpt, dataset, tmp_path):
    """4 steps straight == 2 steps + save_state + resume to 4 (the same U-Net, bit for bit, on the CPU)."""
    straight, first, resumed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = [*CACHED, "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--max_train_steps", "4"]
    train(tiny_ckpt, dataset, straight, *common)
    train(tiny_ckpt, dataset, first, *common, "--save_every_n_steps", "2", "--save_state")
    state_dir = first / f"{NAME}-step00000002-state"
    assert state_dir.is_dir() and (first / f"{NAME}-step00000002.safetensors").is_file()
    train(tiny_ckpt, dataset, resumed, *common, "--resume", str(state_dir))

    a, c = load_file(straight / f"{NAME}.safetensors"), load_file(resumed / f"{NAME}.safetensors")
    unet_a = {k: v for k, v in a.items() if k.startswith(UNET_PREFIX)}
    unet_c = {k: v for k, v in c.items() if k.startswith(UNET_PREFIX)}
    assert unet_a
    assert_equal_states(unet_a, unet_c, "U-Net after resume")
    assert changed_keys(unet_a, load_file(tiny_ckpt)), "U-Net did not change"
    assert metadata(resumed / f"{NAME}.safetensors")["ss_steps"] == "4"


def test_full_bf16_fused_backward_adafactor(tiny_ckpt, dataset, tmp_path):
    from library.models.checkpoint_io import load_sdxl

    out = tmp_path / "out"
    train(tiny_ckpt, dataset, out, *CACHED, "--full_bf16", "--mixed_precision", "bf16", "--fused_backward_pass",
          *ADAFACTOR, "--learning_rate", "1e-3", "--max_train_steps", "2")
    path = out / f"{NAME}.safetensors"
    assert path.is_file()
    original, trained = load_sdxl(tiny_ckpt), load_sdxl(path)
    a, b = state_of(original.unet), state_of(trained.unet)
    assert changed_keys({k: v.to(torch.bfloat16) for k, v in a.items()}, {k: v.to(torch.bfloat16) for k, v in b.items()})
    assert metadata(path)["ss_steps"] == "2"


def test_fused_backward_with_text_encoder_training_and_ema(tiny_ckpt, dataset, tmp_path):
    """Fused backward steps TE parameters inside backward too (TE2's q/k/v must not share storage)."""
    from library.models.checkpoint_io import load_sdxl

    out = tmp_path / "out"
    train(tiny_ckpt, dataset, out, "--cache_latents", "--train_text_encoder", "--fused_backward_pass",
          "--ema", "--ema_decay", "0.5", *ADAFACTOR, "--learning_rate", "1e-3", "--max_train_steps", "2")
    original, trained = load_sdxl(tiny_ckpt), load_sdxl(out / f"{NAME}.safetensors")
    for name in ("unet", "text_encoder1", "text_encoder2"):
        assert changed_keys(state_of(getattr(original, name)), state_of(getattr(trained, name))), name


def test_block_lr_needs_23_values(tiny_ckpt, dataset, tmp_path):
    out = tmp_path / "out"
    r = run_main("sdxl_train.py", [*base_args(tiny_ckpt, dataset, out), *CACHED,
                 "--max_train_steps", "2", "--block_lr", ",".join(["1e-5"] * 22)])
    assert r.returncode == 2, r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if "block_lr" in line]
    assert len(lines) == 1 and "23" in lines[0], r.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())


def test_save_model_as_diffusers(tiny_ckpt, dataset, tmp_path):
    from library.models.checkpoint_io import load_sdxl

    out = tmp_path / "out"
    train(tiny_ckpt, dataset, out, *CACHED, "--save_model_as", "diffusers", "--learning_rate", "1e-4",
          "--max_train_steps", "2")
    folder = out / NAME
    assert folder.is_dir() and (folder / "model_index.json").is_file()
    original, trained = load_sdxl(tiny_ckpt), load_sdxl(folder)
    assert changed_keys(state_of(original.unet), state_of(trained.unet)), "U-Net did not change"
    assert_equal_states(state_of(original.text_encoder1), state_of(trained.text_encoder1), "TE1")
    assert_equal_states(state_of(original.text_encoder2), state_of(trained.text_encoder2), "TE2")


def test_bf16_run_keeps_frozen_text_encoders_and_vae_bit_identical(tiny_ckpt, dataset, tmp_path):
    """U-Net only in bf16 with cached latents and TE outputs: the saved file carries the frozen VAE and
    text encoders exactly as they were (caching uses cast working copies, never the originals)."""
    out = tmp_path / "out"
    train(tiny_ckpt, dataset, out, *CACHED, "--mixed_precision", "bf16", "--learning_rate", "1e-4",
          "--max_train_steps", "1")
    before, after = load_file(tiny_ckpt), load_file(out / f"{NAME}.safetensors")
    frozen = [k for k in before if k.startswith(TE_PREFIXES) or k.startswith("first_stage_model.")]
    assert_equal_states({k: before[k] for k in frozen}, {k: after[k] for k in frozen}, "frozen text encoders and VAE")
