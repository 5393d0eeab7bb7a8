"""Unit tests of the option groups, --config_file / --output_config and the cross-option checks."""

from __future__ import annotations

import argparse
import logging
import tomllib
from pathlib import Path

import pytest

from library.config import args as A
from library.config import schema as S
from library.config.arg_types import int_or_float
from library.errors import UserError

SCRIPTS = ("train", "train_network", "train_textual_inversion", "train_control_net_lllite")

BRIEF_TOML = """\
optimizer_type = "adafactor"
optimizer_args = [ "scale_parameter=False", "relative_step=False", "warmup_init=False" ]
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 100
learning_rate = 4e-7 # SDXL original learning rate
"""


def parse(script: str, argv: list[str]) -> argparse.Namespace:
    return A.parse_args_with_config(A.build_trainer_parser(script), argv)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- defaults and help

@pytest.mark.parametrize("script", SCRIPTS)
def test_defaults_match_sd_scripts(script):
    ns = parse(script, [])
    expected = dict(
        learning_rate=2e-6, caption_extension=".caption", caption_extention=None, bucket_reso_steps=64,
        min_bucket_reso=256, max_bucket_reso=1024, min_timestep=0, max_timestep=1000, lr_scheduler="constant",
        max_grad_norm=1.0, save_precision=None, mixed_precision="no", max_train_steps=1600,
        max_data_loader_n_workers=8, prior_loss_weight=1.0, sample_sampler="ddim", optimizer_type="",
        optimizer_args=None, keep_tokens=0, caption_separator=",", keep_tokens_separator="", train_batch_size=1,
        gradient_accumulation_steps=1, noise_offset=None, multires_noise_discount=0.3, loss_type="l2",
        huber_schedule="snr", huber_c=0.1, huber_scale=1.0, dataset_repeats=1, vae_batch_size=1,
        token_warmup_min=1, token_warmup_step=0, caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0,
        caption_dropout_every_n_epochs=0, lr_warmup_steps=0, lr_scheduler_num_cycles=1, lr_scheduler_power=1,
        dynamo_backend="inductor", max_token_length=None, resolution=None, output_dir=None, seed=None,
        validation_split=0.0, config_file=None, output_config=False, enable_bucket=False, skip_bad_images=False,
        cache_text_encoder_outputs=False, fp8_base=False, no_half_vae=False, zero_stage=2,
    )
    for key, value in expected.items():
        assert getattr(ns, key) == value, key


def test_script_specific_defaults():
    assert parse("train", []).save_model_as is None
    assert parse("train", []).block_lr is None
    net = parse("train_network", [])
    assert (net.save_model_as, net.network_alpha, net.network_dim, net.network_module) == ("safetensors", 1, None, None)
    assert net.text_encoder_lr is None and net.network_args is None
    ti = parse("train_textual_inversion", [])
    assert (ti.save_model_as, ti.num_vectors_per_token) == ("pt", 1)
    assert parse("train_control_net_lllite", []).save_model_as == "safetensors"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_option_has_help(script):
    parser = A.build_trainer_parser(script)
    for action in parser._actions:
        if action.option_strings:
            assert action.help and action.help.strip(), action.option_strings
    parser.format_help()  # help strings must survive %-formatting


@pytest.mark.parametrize("fn", [A.add_model_args, A.add_dataset_args, A.add_caching_args, A.add_precision_args,
                                A.add_optimizer_args, A.add_noise_loss_args, A.add_training_args,
                                A.add_sampling_args, A.add_logging_args, A.add_sdxl_args, A.add_network_args,
                                A.add_finetune_args, A.add_textual_inversion_args, A.add_lllite_args,
                                A.add_distributed_args])
def test_groups_stand_alone_and_are_idempotent(fn):
    parser = argparse.ArgumentParser()
    fn(parser)
    fn(parser)  # adding twice must not conflict
    parser.parse_args([])
    assert all(a.help for a in parser._actions if a.option_strings)


def test_group_contents():
    p = argparse.ArgumentParser()
    A.add_model_args(p)
    for name in ("pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "v_parameterization",
                 "disable_mmap_load_safetensors", "lowram", "highvram", "clip_skip"):
        assert hasattr(p.parse_args([]), name)
    p = argparse.ArgumentParser()
    A.add_caching_args(p)
    A.add_sdxl_args(p)  # both offer --cache_text_encoder_outputs
    assert p.parse_args(["--cache_text_encoder_outputs_to_disk"]).cache_text_encoder_outputs_to_disk
    p = argparse.ArgumentParser()
    A.add_saving_args(p, ("ckpt", "safetensors"), "safetensors")
    assert p.parse_args([]).save_model_as == "safetensors"
    with pytest.raises(SystemExit):
        p.parse_args(["--save_model_as", "pt"])


def test_cli_values_and_choices(capsys):
    ns = parse("train_network", ["--max_token_length", "225", "--text_encoder_lr", "1e-4", "2e-4",
                                 "--network_args", "conv_dim=4", "conv_alpha=1", "--lr_warmup_steps", "10%",
                                 "--sample_sampler", "euler_a", "--caption_extention", ".txt"])
    assert ns.max_token_length == 225 and ns.text_encoder_lr == [1e-4, 2e-4]
    assert ns.network_args == ["conv_dim=4", "conv_alpha=1"] and ns.lr_warmup_steps == pytest.approx(0.1)
    assert ns.caption_extention == ".txt"
    for bad in (["--max_token_length", "100"], ["--mixed_precision", "fp32"], ["--no_such_option"],
                ["--sample_sampler", "foo"], ["--save_precision", "fp8"]):
        with pytest.raises(SystemExit) as exc:
            parse("train", bad)
        assert exc.value.code == 2


def test_int_or_float():
    assert int_or_float("100") == 100 and isinstance(int_or_float("100"), int)
    assert int_or_float("0.05") == pytest.approx(0.05)
    assert int_or_float("10%") == pytest.approx(0.1)
    assert int_or_float("0") == 0
    for bad in ("1.5", "-3", "abc", "150%"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_or_float(bad)


# ----------------------------------------------------------------------------- --config_file

def test_config_sections_flattened_and_cli_overrides(tmp_path):
    cfg = write(tmp_path / "run.toml", """
[model]
pretrained_model_name_or_path = "base.safetensors"
[dataset]
caption_extension = ".txt"
shuffle_caption = true
resolution = [1024, 768]
[optimizer]
learning_rate = 1e-4
optimizer_type = "AdamW8bit"
[training]
max_train_steps = 100
seed = 42
""")
    ns = parse("train", ["--config_file", str(cfg), "--learning_rate", "5e-5"])
    assert ns.learning_rate == 5e-5                      # CLI wins
    assert ns.max_train_steps == 100 and ns.seed == 42   # file values kept
    assert ns.caption_extension == ".txt" and ns.shuffle_caption is True
    assert ns.resolution == "1024,768" and ns.optimizer_type == "AdamW8bit"
    assert ns.pretrained_model_name_or_path == "base.safetensors"
    assert ns.bucket_reso_steps == 64                    # untouched default
    ns2 = parse("train", ["--config_file", str(tmp_path / "run")])  # .toml suffix optional
    assert ns2.learning_rate == 1e-4


def test_brief_toml_list_options(tmp_path):
    cfg = write(tmp_path / "adafactor.toml", BRIEF_TOML)
    ns = parse("train", ["--config_file", str(cfg)])
    assert ns.optimizer_args == ["scale_parameter=False", "relative_step=False", "warmup_init=False"]
    assert (ns.optimizer_type, ns.lr_scheduler, ns.lr_warmup_steps) == ("adafactor", "constant_with_warmup", 100)
    assert ns.learning_rate == 4e-7
    ns = parse("train", ["--config_file", str(cfg), "--optimizer_args", "relative_step=True"])
    assert ns.optimizer_args == ["relative_step=True"]


def test_config_list_conversions(tmp_path):
    cfg = write(tmp_path / "c.toml", """
optimizer_args = "weight_decay=0.01 'betas=0.9, 0.99'"
text_encoder_lr = 1e-4
base_weights_multiplier = [1, 0.5]
network_alpha = 16
max_train_epochs = 10.0
resolution = 1024
lr_warmup_steps = 0.1
""")
    ns = parse("train_network", ["--config_file", str(cfg)])
    assert ns.optimizer_args == ["weight_decay=0.01", "betas=0.9, 0.99"]
    assert ns.text_encoder_lr == [1e-4] and ns.base_weights_multiplier == [1.0, 0.5]
    assert ns.network_alpha == 16.0 and isinstance(ns.network_alpha, float)
    assert ns.max_train_epochs == 10 and isinstance(ns.max_train_epochs, int)
    assert ns.resolution == "1024" and ns.lr_warmup_steps == pytest.approx(0.1)


def test_unknown_key_warns_with_suggestion_and_run_goes_on(tmp_path, caplog):
    cfg = write(tmp_path / "typo.toml", "[optimizer]\nlearnin_rate = 1e-4\nlearning_rate = 3e-4\n")
    with caplog.at_level(logging.INFO, logger="library.config.config_file"):
        ns = parse("train", ["--config_file", str(cfg)])
    assert ns.learning_rate == 3e-4  # the real option is still read
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0]
    assert "learnin_rate" in msg and str(cfg) in msg and "did you mean 'learning_rate'" in msg
    assert "[optimizer]" in msg and "\n" not in msg
    caplog.clear()
    cfg = write(tmp_path / "ds.toml", "batch_size = 4\n")
    with caplog.at_level(logging.WARNING, logger="library.config.config_file"):
        parse("train", ["--config_file", str(cfg)])
    assert "did you mean 'train_batch_size'" in caplog.text


def test_other_scripts_options_and_gui_keys_are_skipped_without_warning(tmp_path, caplog):
    # network_dim / text_encoder_lr are LoRA options (sd-scripts' sdxl_train.py ignores them);
    # epoch / noise_offset_type / sdxl are kohya_ss GUI fields.
    cfg = write(tmp_path / "net.toml", 'network_dim = 4\ntext_encoder_lr = 1e-5\nepoch = 3\n'
                'noise_offset_type = "Original"\nsdxl = true\n')
    with caplog.at_level(logging.INFO, logger="library.config.config_file"):
        ns = parse("train", ["--config_file", str(cfg)])
    assert not hasattr(ns, "network_dim") and not hasattr(ns, "epoch")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    info = " ".join(r.getMessage() for r in caplog.records)
    assert "network_dim, text_encoder_lr not used by" in info and "epoch, noise_offset_type, sdxl" in info


def test_dataset_toml_given_as_config_file_is_an_error(tmp_path):
    cfg = write(tmp_path / "ds.toml", '[general]\nenable_bucket = true\n[[datasets]]\nresolution = 1024\n')
    with pytest.raises(UserError, match="--dataset_config"):
        parse("train", ["--config_file", str(cfg)])


def test_sd_scripts_toml_values_keep_their_meaning(tmp_path):
    cfg = write(tmp_path / "gui.toml", """
max_token_length = 75
dynamo_backend = "no"
persistent_data_loader_workers = 1
gradient_checkpointing = 0
sample_prompts = ""
huggingface_repo_id = ""
vae = ""
text_encoder_lr = []
lr_scheduler_args = []
keep_tokens = "2"
max_train_epochs = "4.0"
learning_rate = "1e-4"
mixed_precision = "BF16"
sample_sampler = "Euler_a"
save_precision = "FP16"
cache_latents = "true"
loss_type = ""
base_weights = 'D:\\models\\a.safetensors'
""")
    ns = parse("train_network", ["--config_file", str(cfg)])
    S.normalize_legacy_args(ns)
    assert ns.max_token_length is None                          # 75 = the default length
    assert ns.dynamo_backend == "inductor" and ns.torch_compile is False
    assert ns.persistent_data_loader_workers is True and ns.gradient_checkpointing is False
    assert ns.sample_prompts is None and ns.huggingface_repo_id is None and ns.vae is None
    assert ns.text_encoder_lr is None and ns.lr_scheduler_args is None
    assert (ns.keep_tokens, ns.max_train_epochs, ns.learning_rate) == (2, 4, 1e-4)
    assert (ns.mixed_precision, ns.sample_sampler, ns.save_precision) == ("bf16", "euler_a", "fp16")
    assert ns.cache_latents is True and ns.loss_type == "l2"  # "" = not set: the default
    assert ns.base_weights == ["D:\\models\\a.safetensors"]  # a string for a list option; backslashes kept


def test_dynamo_backend_no_turns_torch_compile_off(tmp_path, caplog):
    cfg = write(tmp_path / "c.toml", 'dynamo_backend = "no"\ntorch_compile = true\n')
    ns = parse("train_network", ["--config_file", str(cfg)])
    with caplog.at_level(logging.WARNING):
        S.normalize_legacy_args(ns)
    assert ns.torch_compile is False and "turns torch.compile off" in caplog.text
    with pytest.raises(SystemExit):  # on the command line argparse's choices still apply, as in sd-scripts
        parse("train_network", ["--dynamo_backend", "no"])


@pytest.mark.parametrize("text, fragment", [
    ('learning_rate = "fast"', "learning_rate"),
    ("max_train_steps = 1.5", "whole number"),
    ('shuffle_caption = "yes"', "true or false"),
    ('mixed_precision = "fp32"', "one of"),
    ("max_token_length = 100", "one of"),
    ('lr_warmup_steps = "2.5"', "lr_warmup_steps"),
    ("optimizer_args = \"'unclosed\"", "optimizer_args"),
    ("learning_rate = [1e-4]", "learning_rate"),
    ("learning_rate = ", "not valid TOML"),
])
def test_config_value_errors(tmp_path, text, fragment):
    cfg = write(tmp_path / "bad.toml", text + "\n")
    with pytest.raises(UserError) as exc:
        parse("train", ["--config_file", str(cfg)])
    assert fragment in str(exc.value) and str(cfg) in str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        parse("train", ["--config_file", str(tmp_path / "nope")])


# ----------------------------------------------------------------------------- --output_config

def _comparable(ns: argparse.Namespace) -> dict:
    d = dict(vars(ns))
    for key in ("config_file", "output_config"):
        d.pop(key)
    return d


@pytest.mark.parametrize("script", SCRIPTS)
def test_output_config_round_trip(tmp_path, script):
    out = tmp_path / "out"
    cfg = write(tmp_path / "in.toml", BRIEF_TOML + '[dataset]\nresolution = "1024,1024"\n')
    argv = ["--config_file", str(cfg), "--output_dir", str(out), "--output_name", "run1", "--shuffle_caption",
            "--max_token_length", "225", "--caption_prefix", 'a "quoted" \\ prefix', "--seed", "7"]
    if script == "train_network":
        argv += ["--text_encoder_lr", "1e-4", "2e-5", "--network_args", "conv_dim=4"]
    expected = parse(script, argv)
    with pytest.raises(SystemExit) as exc:
        parse(script, argv + ["--output_config"])
    assert exc.value.code == 0
    written = out / "run1.toml"
    assert written.is_file()
    assert not [p for p in out.iterdir() if p.name != "run1.toml"]  # no temp file left behind
    tomllib.loads(written.read_text(encoding="utf-8"))
    back = parse(script, ["--config_file", str(written)])
    assert _comparable(back) == _comparable(expected)


def test_output_config_paths_and_secrets(tmp_path):
    with pytest.raises(SystemExit):
        parse("train", ["--output_dir", str(tmp_path), "--wandb_api_key", "SECRET", "--output_config"])
    text = (tmp_path / "config.toml").read_text(encoding="utf-8")
    flat = {k: v for section in tomllib.loads(text).values() for k, v in section.items()}
    assert "SECRET" not in text and "wandb_api_key" not in flat and "output_config" not in flat
    assert flat["output_dir"] == str(tmp_path) and flat["learning_rate"] == 2e-6
    with pytest.raises(UserError, match="--output_dir"):
        parse("train", ["--output_config"])
    # sd-scripts style: a --config_file that does not exist yet is where the config goes
    new = tmp_path / "new_config"
    with pytest.raises(SystemExit):
        parse("train", ["--config_file", str(new), "--learning_rate", "1e-5", "--output_config"])
    assert tomllib.loads((tmp_path / "new_config.toml").read_text())["optimizer"]["learning_rate"] == 1e-5
    # never overwrite the file being read
    with pytest.raises(UserError, match="overwrite"):
        parse("train", ["--config_file", str(tmp_path / "config.toml"), "--output_dir", str(tmp_path),
                        "--output_config"])


# ----------------------------------------------------------------------------- cross-option checks

@pytest.fixture
def env(tmp_path):
    model = tmp_path / "sdxl.safetensors"
    model.write_bytes(b"x")
    for d in ("data", "cond"):
        (tmp_path / d).mkdir()
    return tmp_path


def base_argv(env: Path, script: str) -> list[str]:
    argv = ["--pretrained_model_name_or_path", str(env / "sdxl.safetensors"), "--output_dir", str(env / "out"),
            "--train_data_dir", str(env / "data")]
    extra = {"train_network": ["--network_module", "networks.lora"],
             "train_textual_inversion": ["--token_string", "sks"],
             "train_control_net_lllite": ["--conditioning_data_dir", str(env / "cond")]}
    return argv + extra.get(script, [])


def check(env: Path, script: str, extra: list[str]) -> argparse.Namespace:
    ns = parse(script, base_argv(env, script) + extra)
    S.validate_training_args(ns, script)
    return ns


@pytest.mark.parametrize("script", SCRIPTS)
def test_valid_combination_passes(env, script):
    extra = ["--mixed_precision", "bf16", "--full_bf16", "--cache_latents", "--flip_aug", "--bucket_reso_steps",
             "32", "--min_timestep", "500", "--max_timestep", "500", "--gradient_checkpointing"]
    if script != "train_textual_inversion":
        extra += ["--cache_text_encoder_outputs"]
    if script == "train_network":
        extra += ["--network_train_unet_only"]
    if script == "train":
        extra += ["--block_lr", ",".join(["1e-6"] * 23), "--fused_backward_pass", "--optimizer_type", "adafactor"]
    check(env, script, extra)


ERRORS = [
    ("train", ["--cache_text_encoder_outputs", "--shuffle_caption"], "shuffle_caption"),
    ("train", ["--cache_text_encoder_outputs_to_disk", "--caption_dropout_rate", "0.1"], "caption_dropout_rate"),
    ("train", ["--cache_text_encoder_outputs", "--caption_tag_dropout_rate", "0.2"], "caption_tag_dropout_rate"),
    ("train", ["--cache_text_encoder_outputs", "--token_warmup_step", "10"], "token_warmup_step"),
    ("train", ["--cache_text_encoder_outputs", "--train_text_encoder"], "--train_text_encoder"),
    ("train_network", ["--cache_text_encoder_outputs"], "--network_train_unet_only"),
    ("train_textual_inversion", ["--cache_text_encoder_outputs"], "textual inversion"),
    ("train", ["--cache_latents", "--color_aug"], "color_aug"),
    ("train", ["--cache_latents_to_disk", "--random_crop"], "random_crop"),
    ("train", ["--full_bf16"], "--full_bf16 needs --mixed_precision bf16"),
    ("train", ["--full_fp16", "--mixed_precision", "bf16"], "--full_fp16 needs --mixed_precision fp16"),
    ("train_network", ["--fp8_base"], "--mixed_precision fp16 or bf16"),
    ("train", ["--bucket_reso_steps", "48"], "multiple of 32"),
    ("train", ["--bucket_reso_steps", "16"], "multiple of 32"),
    ("train", ["--block_lr", "1e-6,1e-6"], "--block_lr needs exactly 23 values (0: time/label embed, 1-9: input "
     "blocks 0-8, 10-12: mid blocks 0-2, 13-21: output blocks 0-8, 22: out); got 2"),
    ("train", ["--min_timestep", "600", "--max_timestep", "500"], "--min_timestep (600)"),
    ("train", ["--min_timestep", "-1"], "0..1000"),
    ("train", ["--max_timestep", "1001"], "0..1000"),
    ("train", ["--v2"], "--v2"),
    ("train", ["--fused_backward_pass", "--gradient_accumulation_steps", "4"], "--gradient_accumulation_steps 1"),
    ("train", ["--fused_backward_pass", "--fused_optimizer_groups", "4"], "cannot be used together"),
    ("train_network", ["--network_train_unet_only", "--network_train_text_encoder_only"], "cannot be used together"),
    ("train", ["--lr_scheduler", "cosine_with_restart"], "did you mean 'cosine_with_restarts'"),
    ("train", ["--optimizer_args", "weight_decay"], "key=value"),
    ("train", ["--use_8bit_adam", "--optimizer_type", "Lion"], "--use_8bit_adam"),
    ("train", ["--resolution", "big"], "--resolution"),
    ("train", ["--caption_dropout_rate", "1.5"], "between 0 and 1"),
    ("train", ["--sample_prompts", "/no/such/prompts.txt"], "--sample_prompts: file not found"),
    ("train_control_net_lllite", ["--masked_loss"], "--masked_loss is not an option of "
     "sdxl_train_control_net_lllite.py"),
]


@pytest.mark.parametrize("script, extra, fragment", ERRORS)
def test_cross_option_errors(env, script, extra, fragment):
    with pytest.raises(UserError) as exc:
        check(env, script, extra)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_required_and_paths(env):
    def run(argv, script="train"):
        S.validate_training_args(parse(script, argv), script)

    with pytest.raises(UserError, match="--pretrained_model_name_or_path is required"):
        run(["--output_dir", "o", "--train_data_dir", str(env / "data")])
    with pytest.raises(UserError, match="--output_dir is required"):
        run(["--pretrained_model_name_or_path", str(env / "sdxl.safetensors"), "--train_data_dir", str(env)])
    with pytest.raises(UserError, match="file or folder not found"):
        run(base_argv(env, "train")[2:] + ["--pretrained_model_name_or_path", str(env / "missing.safetensors")])
    with pytest.raises(UserError, match="no training data"):
        run(base_argv(env, "train")[:4])
    with pytest.raises(UserError, match="--network_module is required"):
        run(base_argv(env, "train"), "train_network")
    with pytest.raises(UserError, match="--token_string is required"):
        run(base_argv(env, "train"), "train_textual_inversion")
    # a Hugging Face id that is not a local path is left to the model loader
    run(base_argv(env, "train")[2:] + ["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0"])


def test_fp8_needs_cuda(env, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        check(env, "train_network", ["--fp8_base", "--mixed_precision", "bf16"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ns = check(env, "train_network", ["--fp8_base_unet", "--mixed_precision", "bf16"])
    assert ns.fp8_base is True  # fp8_base_unet implies fp8_base


def test_legacy_aliases_and_warnings(env, caplog):
    ns = check(env, "train", ["--caption_extention", ".txt", "--use_8bit_adam", "--cache_latents_to_disk"])
    assert (ns.caption_extension, ns.caption_extention) == (".txt", None)
    assert ns.optimizer_type == "AdamW8bit" and ns.cache_latents is True
    S.validate_training_args(ns, "train")  # idempotent
    with caplog.at_level(logging.WARNING, logger="library.config.schema"):
        check(env, "train", ["--sample_every_n_steps", "100"])
    assert "--sample_prompts" in caplog.text


def test_item_checks_and_block_lr():
    S.check_te_cache_compat(False, 0.0, 0.0, 0, "subset 1")
    with pytest.raises(UserError, match="dataset.toml, dataset 1 subset 2"):
        S.check_te_cache_compat(True, 0.0, 0.0, 0, "dataset.toml, dataset 1 subset 2")
    with pytest.raises(UserError, match="caption_dropout_every_n_epochs"):
        S.check_te_cache_compat(False, 0.0, 0.0, 0, "x", dropout_every_n_epochs=2)
    S.check_latent_cache_compat(False, False, "x")
    with pytest.raises(UserError, match="random_crop"):
        S.check_latent_cache_compat(False, True, "x")
    S.check_bucket_reso_steps(32, "x")
    with pytest.raises(UserError, match="multiple of 32"):
        S.check_bucket_reso_steps(40, "x")
    values = S.parse_block_lr(",".join(str(i * 1e-6) for i in range(23)))
    assert len(values) == 23 and values[22] == pytest.approx(22e-6)
    with pytest.raises(UserError, match=r"got 24$"):
        S.parse_block_lr(",".join(["1"] * 24))
    with pytest.raises(UserError, match="not a number"):
        S.parse_block_lr(",".join(["1"] * 22 + ["x"]))
    assert S.parse_resolution("1024") == (1024, 1024) and S.parse_resolution("1024,768") == (1024, 768)
    with pytest.raises(ValueError):
        S.validate_training_args(argparse.Namespace(), "train_dreambooth")
