"""Validation loss and the sd-scripts start/save options, in-process on the tiny model (CPU, 64 px).

A training run is built exactly as the scripts build it (parse -> check -> TrainConfig -> dataset
-> method -> run_training's steps), with a Trainer subclass that records what each step consumes
(image paths and the learning rate) and a real accelerate tracker that keeps what is logged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from accelerate.tracking import GeneralTracker
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


class ListTracker(GeneralTracker):
    """An accelerate tracker that keeps every logged dict (what TensorBoard/wandb would receive)."""

    name = "list"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def tracker(self):
        return self.logged

    def store_init_configuration(self, values):
        pass

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))


def make_trainer(script: str, argv: list[str]):
    """The Trainer a script would run for ``argv`` (set up, not trained), recording each step's batch."""
    import importlib

    from library.config.args import build_trainer_parser, parse_args_with_config
    from library.config.schema import validate_training_args
    from library.training.cli import build_data
    from library.training.config import TrainConfig
    from library.training.methods import apply_fp8  # noqa: F401  (same imports as run_training)
    from library.training.setup import create_run, fill_caches, place_frozen_models
    from library.training.trainer import Trainer

    module = importlib.import_module({"train": "sdxl_train", "train_network": "sdxl_train_network"}[script])
    ns = parse_args_with_config(build_trainer_parser(script), argv)
    validate_training_args(ns, script)
    cfg = TrainConfig.from_namespace(ns)
    data = build_data(ns, cfg)
    method = module.make_method(ns, cfg)

    class Recording(Trainer):
        def step(self, batch):
            self.seen.append((list(batch["image_paths"]), self.lr_scheduler.get_last_lr()[0],
                              self.run.progress.global_step))
            return super().step(batch)

    run = create_run(cfg, data)
    fill_caches(run, run.encode_text)
    place_frozen_models(run, method.unet_weights_trained, method.text_encoder_weights_trained,
                        keep_originals=method.kind == "checkpoint")
    trainer = Recording(run, method)
    trainer.seen = []
    trainer.setup()
    tracker = ListTracker()
    run.accelerator.trackers.append(tracker)
    trainer.tracker = tracker
    return trainer


@pytest.fixture()
def images(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model's 8 mixed-size images with captions."""
    dst = tmp_path / "img"
    shutil.copytree(tiny_model_dir / "train" / "10_sks shape", dst)
    return dst


def dataset_toml(path: Path, images: Path, batch_size: int = 2, **dataset) -> Path:
    lines = ["[general]", "resolution = 64", "enable_bucket = true", "min_bucket_reso = 32",
             "max_bucket_reso = 128", "bucket_reso_steps = 32", "caption_extension = '.caption'", "",
             "[[datasets]]", f"batch_size = {batch_size}"]
    lines += [f"{k} = {v!r}" for k, v in dataset.items()]
    lines += ["", "[[datasets.subsets]]", f"image_dir = '{images.as_posix()}'", "num_repeats = 1"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def lora_args(ckpt: Path, config: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(ckpt), "--dataset_config", str(config),
            "--output_dir", str(out), "--output_name", "lora", "--network_module", "networks.lora",
            "--network_dim", "4", "--network_alpha", "4", "--network_train_unet_only", "--cache_latents",
            "--cache_text_encoder_outputs", "--learning_rate", "1e-3", "--seed", "1",
            "--max_data_loader_n_workers", "0", "--log_every_n_steps", "1", *extra]


# ---------------------------------------------------------------------------------------------
def test_lora_validation_loss(tiny_ckpt, images, tmp_path, capsys):
    """Held-out images never train; the loss is reproducible, logged, shown; training is unchanged by it."""
    config = dataset_toml(tmp_path / "data.toml", images, validation_split=0.25, validation_seed=3)
    out = tmp_path / "out"
    trainer = make_trainer("train_network", lora_args(tiny_ckpt, config, out, "--max_train_steps", "4",
                                                      "--validate_every_n_steps", "2"))
    v = trainer.validation
    held_out = {p for i in range(len(v.data)) for p in v.data[i]["image_paths"]}
    assert len(held_out) == 2 == trainer.run.data.num_validation_images
    assert "latents" in v.data[0] and "te_outputs" in v.data[0]  # served from the caches

    noise_state = trainer.rng.generator.get_state().clone()
    global_state = torch.get_rng_state().clone()
    first, second = v.evaluate(), v.evaluate()
    assert first == second and first > 0  # the same weights give exactly the same loss
    assert torch.equal(trainer.rng.generator.get_state(), noise_state)  # training's noise stream untouched
    assert torch.equal(torch.get_rng_state(), global_state)

    trainer.train()
    consumed = {p for paths, _, _ in trainer.seen for p in paths}
    assert len(trainer.seen) == 4 and len(consumed) >= 4
    assert not consumed & held_out  # held-out images never reach a training step
    logged = {k: step for step, values in trainer.tracker.logged for k in values}
    for key in ("loss/validation/step_average", "loss/validation/step_divergence",
                "loss/validation/epoch_average", "loss/validation/epoch_divergence"):
        assert key in logged, key
    steps = [h["step"] for h in v.history if h["kind"] == "step"]
    assert steps == [2, 4]
    assert "val_loss=" in capsys.readouterr().err  # the progress bar shows it
    from safetensors import safe_open
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_validation_images"], meta["ss_validation_split"], meta["ss_num_train_images"]) == \
        ("2", "0.25", "6")

    # the same run without validation trains to bit-identical weights
    plain = make_trainer("train_network", lora_args(tiny_ckpt, config, tmp_path / "plain", "--max_train_steps", "4"))
    plain.train()
    a, b = load_file(out / "lora.safetensors"), load_file(tmp_path / "plain" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s[0] for s in plain.seen] == [s[0] for s in trainer.seen]


def test_initial_step_skips_exactly_and_save_n_epoch_ratio(tiny_ckpt, images, tmp_path):
    """--initial_step 3 --skip_until_initial_step trains steps 3.. of the straight run: same batches, same
    lrs; the straight run's 4 epochs with --save_n_epoch_ratio 2 save every floor(4 / 2) = 2 epochs."""
    from safetensors import safe_open

    config = dataset_toml(tmp_path / "data.toml", images, batch_size=8)  # 2 bucket batches per epoch
    sched = ["--lr_scheduler", "linear", "--max_train_epochs", "4"]
    straight = make_trainer("train_network", lora_args(tiny_ckpt, config, tmp_path / "a", *sched,
                                                       "--save_n_epoch_ratio", "2", "--save_every_n_epochs", "1"))
    assert straight.cfg.save_every_n_epochs == 2 and straight.max_steps == 8
    straight.train()
    assert sorted(p.name for p in (tmp_path / "a").glob("*.safetensors")) == ["lora-000002.safetensors",
                                                                               "lora.safetensors"]
    skipped = make_trainer("train_network", lora_args(tiny_ckpt, config, tmp_path / "b", *sched,
                                                      "--initial_step", "3", "--skip_until_initial_step"))
    assert (skipped.run.progress.global_step, skipped.run.progress.epoch) == (3, 1)
    skipped.train()
    assert [s[2] for s in skipped.seen] == [3, 4, 5, 6, 7]
    assert [s[0] for s in skipped.seen] == [s[0] for s in straight.seen[3:]]  # exactly 3 batches skipped
    assert [s[1] for s in skipped.seen] == [s[1] for s in straight.seen[3:]]  # the schedule starts at step 3
    assert skipped.seen[0][1] < straight.seen[0][1]
    with safe_open(str(tmp_path / "b" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "8"


def test_fused_optimizer_groups_and_cpu_offload_checkpointing_match_the_plain_run(tiny_ckpt, images, tmp_path):
    """sdxl_train with AdamW: 3 fused groups + offloaded checkpointing == the plain optimizer, within float
    tolerance; validation runs on uncached latents (VAE sampled with the validation generator)."""
    from library.training.offload_checkpointing import offloaded_checkpoint

    config = dataset_toml(tmp_path / "data.toml", images, validation_split=0.25)
    base = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--dataset_config", str(config),
            "--output_name", "ft", "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--max_grad_norm", "0",
            "--max_train_steps", "3", "--seed", "1", "--max_data_loader_n_workers", "0",
            "--cache_text_encoder_outputs"]
    plain = make_trainer("train", [*base, "--output_dir", str(tmp_path / "a")])
    before = {k: v.clone() for k, v in plain.run.accelerator.unwrap_model(plain.run.models.unet).state_dict().items()}
    plain.train()
    fused = make_trainer("train", [*base, "--output_dir", str(tmp_path / "b"), "--fused_optimizer_groups", "3",
                                   "--cpu_offload_checkpointing"])
    assert len(fused.fused) == 3
    unet = fused.run.accelerator.unwrap_model(fused.run.models.unet)
    assert unet.down_blocks[1].gradient_checkpointing
    assert unet.down_blocks[1]._gradient_checkpointing_func is offloaded_checkpoint
    first = fused.validation.evaluate()
    assert first == fused.validation.evaluate()  # VAE sampling is seeded too
    fused.train()
    a = plain.run.accelerator.unwrap_model(plain.run.models.unet).state_dict()
    b = unet.state_dict()
    assert sum(not torch.equal(before[k], a[k]) for k in a) > len(a) // 2  # the run trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    pv = [h["loss"] for h in plain.validation.history]
    fv = [h["loss"] for h in fused.validation.history][-len(pv):]
    assert pv and fv == pytest.approx(pv, rel=1e-5)
