"""Dataset TOML/JSON schema, inheritance, errors, and DreamBooth folders from the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from library.config.dataset_cli import dataset_config_from_cli
from library.config.dataset_toml import (
    DatasetConfig,
    SubsetConfig,
    load_dataset_config,
)
from library.errors import UserError


def write(tmp_path: Path, text: str, name: str = "dataset.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def dirs(tmp_path):
    for name in ("train", "reg", "cond"):
        (tmp_path / name).mkdir()
    (tmp_path / "meta.json").write_text("{}", encoding="utf-8")
    return tmp_path


def one_subset_toml(root: Path, dataset_extra: str = "", subset_extra: str = "") -> str:
    return (f'[[datasets]]\nresolution = 1024\n{dataset_extra}\n'
            f'[[datasets.subsets]]\nimage_dir = "{(root / "train").as_posix()}"\n{subset_extra}\n')


def test_inheritance_general_dataset_subset(dirs):
    path = write(dirs, f"""
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
flip_aug = true

[[datasets]]
resolution = [1024, 768]
batch_size = 4
enable_bucket = true
max_bucket_reso = 2048
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = "{(dirs / 'train').as_posix()}"
  num_repeats = 10
  class_tokens = "sks dog"
  keep_tokens = 3

  [[datasets.subsets]]
  image_dir = "{(dirs / 'reg').as_posix()}"
  is_reg = true
  flip_aug = false
""")
    (ds,) = load_dataset_config(path)
    assert isinstance(ds, DatasetConfig)
    assert ds.resolution == (1024, 768) and ds.batch_size == 4 and ds.enable_bucket
    assert ds.max_bucket_reso == 2048 and ds.bucket_reso_steps == 64 and ds.kind == "dreambooth"
    train, reg = ds.subsets
    assert isinstance(train, SubsetConfig)
    assert (train.num_repeats, train.class_tokens, train.keep_tokens) == (10, "sks dog", 3)
    assert train.shuffle_caption and train.caption_extension == ".txt" and train.flip_aug
    assert reg.is_reg and reg.keep_tokens == 2 and not reg.flip_aug and reg.num_repeats == 1
    assert reg.caption_separator == "," and reg.token_warmup_min == 1


def test_cli_defaults_sit_below_general_and_are_renamed(dirs):
    path = write(dirs, "[general]\nbatch_size = 2\n" + one_subset_toml(dirs))
    cli = {"train_batch_size": 8, "dataset_repeats": 5, "color_aug": True, "learning_rate": 1e-4,
           "resolution": "512,512", "train_data_dir": None}
    (ds,) = load_dataset_config(path, cli)
    assert ds.batch_size == 2  # [general] wins over the command line
    assert ds.resolution == (1024, 1024)  # [[datasets]] wins
    assert ds.subsets[0].num_repeats == 5 and ds.subsets[0].color_aug


def test_json_accepted(dirs):
    doc = {"general": {"resolution": 1024},
           "datasets": [{"subsets": [{"image_dir": str(dirs / "train"), "num_repeats": 3}]}]}
    path = write(dirs, json.dumps(doc), "dataset.json")
    (ds,) = load_dataset_config(path)
    assert ds.subsets[0].num_repeats == 3


def test_finetune_and_controlnet_kinds(dirs):
    meta = (dirs / "meta.json").as_posix()
    path = write(dirs, one_subset_toml(dirs).replace(
        f'image_dir = "{(dirs / "train").as_posix()}"', f'metadata_file = "{meta}"'))
    (ds,) = load_dataset_config(path)
    assert ds.kind == "finetune" and ds.subsets[0].image_dir is None
    path = write(dirs, one_subset_toml(dirs, subset_extra=f'conditioning_data_dir = '
                                                           f'"{(dirs / "cond").as_posix()}"'))
    (ds,) = load_dataset_config(path)
    assert ds.kind == "controlnet"
    with pytest.raises(UserError, match="does not train on"):
        load_dataset_config(path, allowed_kinds=["dreambooth", "finetune"])


def test_mixing_metadata_and_folders_is_an_error(dirs):
    meta = (dirs / "meta.json").as_posix()
    text = one_subset_toml(dirs) + f'[[datasets.subsets]]\nmetadata_file = "{meta}"\n'
    with pytest.raises(UserError, match="mixes"):
        load_dataset_config(write(dirs, text))


def test_unknown_key_did_you_mean(dirs):
    path = write(dirs, one_subset_toml(dirs, subset_extra="num_repaets = 10"))
    with pytest.raises(UserError) as info:
        load_dataset_config(path)
    message = str(info.value)
    assert "num_repaets" in message and "did you mean 'num_repeats'?" in message
    assert str(path) in message and "[[datasets.subsets]] #1" in message


def test_unknown_key_in_general_and_cli_names(dirs):
    with pytest.raises(UserError, match=r"\[general\].*did you mean 'shuffle_caption'"):
        load_dataset_config(write(dirs, "[general]\nshufle_caption = true\n" + one_subset_toml(dirs)))
    with pytest.raises(UserError, match="write 'batch_size'"):
        load_dataset_config(write(dirs, one_subset_toml(dirs, dataset_extra="train_batch_size = 2")))
    with pytest.raises(UserError, match="command-line option"):
        load_dataset_config(write(dirs, "[general]\nprior_loss_weight = 1.0\n" + one_subset_toml(dirs)))
    with pytest.raises(UserError, match="dataset option"):
        load_dataset_config(write(dirs, one_subset_toml(dirs, subset_extra="batch_size = 2")))
    with pytest.raises(UserError, match="belongs in a \\[\\[datasets.subsets\\]\\]"):
        load_dataset_config(write(dirs, "[general]\nimage_dir = 'x'\n" + one_subset_toml(dirs)))
    with pytest.raises(UserError, match="unknown key 'dataset'"):
        load_dataset_config(write(dirs, "[[dataset]]\nresolution = 1024\n"))


@pytest.mark.parametrize("extra, key", [
    ('num_repeats = "ten"', "num_repeats"),
    ("shuffle_caption = 1", "shuffle_caption"),
    ("caption_dropout_rate = 1.5", "caption_dropout_rate"),
    ("keep_tokens = -1", "keep_tokens"),
    ("face_crop_aug_range = [4.0]", "face_crop_aug_range"),
    ('resize_interpolation = "fancy"', "resize_interpolation"),
])
def test_type_errors_name_key_and_file(dirs, extra, key):
    path = write(dirs, one_subset_toml(dirs, subset_extra=extra))
    with pytest.raises(UserError) as info:
        load_dataset_config(path)
    assert key in str(info.value) and str(path) in str(info.value)


def test_kind_specific_key_in_wrong_subset(dirs):
    meta = (dirs / "meta.json").as_posix()
    text = f'[[datasets]]\nresolution = 1024\n[[datasets.subsets]]\nmetadata_file = "{meta}"\nis_reg = true\n'
    with pytest.raises(UserError, match="is_reg.*fine-tuning"):
        load_dataset_config(write(dirs, text))


def test_bucket_reso_steps_16_rejected_32_accepted(dirs):
    bad = write(dirs, one_subset_toml(dirs, dataset_extra="enable_bucket = true\nbucket_reso_steps = 16"))
    with pytest.raises(UserError, match="bucket_reso_steps.*16.*multiple of 32"):
        load_dataset_config(bad)
    bad48 = write(dirs, one_subset_toml(dirs, dataset_extra="bucket_reso_steps = 48"))
    with pytest.raises(UserError, match="multiple of 32"):
        load_dataset_config(bad48)
    good = write(dirs, one_subset_toml(dirs, dataset_extra="enable_bucket = true\n"
                                                           "bucket_reso_steps = 32\nmax_bucket_reso = 2048"))
    assert load_dataset_config(good)[0].bucket_reso_steps == 32
    with pytest.raises(UserError, match="--bucket_reso_steps"):
        dataset_config_from_cli(None, None, str(dirs / "meta.json"),
                                {"resolution": "1024", "bucket_reso_steps": 16})


def test_bucket_range_snapped_and_must_bracket_resolution(dirs, caplog):
    text = one_subset_toml(dirs, dataset_extra="enable_bucket = true\nmin_bucket_reso = 300\n"
                                               "max_bucket_reso = 2000")
    with caplog.at_level(logging.WARNING):
        (ds,) = load_dataset_config(write(dirs, text))
    assert (ds.min_bucket_reso, ds.max_bucket_reso) == (256, 2048)
    with pytest.raises(UserError, match="max_bucket_reso = 960"):
        load_dataset_config(write(dirs, one_subset_toml(
            dirs, dataset_extra="enable_bucket = true\nmax_bucket_reso = 960")))
    with pytest.raises(UserError, match="min_bucket_reso = 1088"):
        load_dataset_config(write(dirs, one_subset_toml(
            dirs, dataset_extra="enable_bucket = true\nmin_bucket_reso = 1088\nmax_bucket_reso = 2048")))


def test_default_max_bucket_reso_warns(dirs, caplog):
    with caplog.at_level(logging.WARNING):
        load_dataset_config(write(dirs, one_subset_toml(dirs, dataset_extra="enable_bucket = true")))
    assert "max_bucket_reso = 2048" in caplog.text


def test_missing_resolution_and_paths(dirs):
    text = f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{(dirs / "train").as_posix()}"\n'
    with pytest.raises(UserError, match="no resolution"):
        load_dataset_config(write(dirs, text))
    assert load_dataset_config(write(dirs, text), {"resolution": "768,1024"})[0].resolution == (768, 1024)
    missing = one_subset_toml(dirs).replace("train", "nope")
    with pytest.raises(UserError, match="nope.*does not exist"):
        load_dataset_config(write(dirs, missing))
    with pytest.raises(UserError, match="does not exist"):
        load_dataset_config(dirs / "absent.toml")
    with pytest.raises(UserError, match="not valid TOML"):
        load_dataset_config(write(dirs, "[[datasets]\n"))


def test_duplicates_and_zero_repeats_dropped(dirs):
    train = (dirs / "train").as_posix()
    text = (one_subset_toml(dirs) + f'[[datasets.subsets]]\nimage_dir = "{train}/"\n'
            f'[[datasets.subsets]]\nimage_dir = "{(dirs / "reg").as_posix()}"\nnum_repeats = 0\n')
    (ds,) = load_dataset_config(write(dirs, text))
    assert len(ds.subsets) == 1


# ---- no TOML: folders from the command line -------------------------------------------------

def make_folders(root: Path, names: list[str]) -> Path:
    root.mkdir(exist_ok=True)
    for name in names:
        (root / name).mkdir()
    return root


def test_dreambooth_folders(tmp_path, caplog):
    train = make_folders(tmp_path / "img", ["10_sks dog", "3_two_words", "notes", "5", ".hidden"])
    reg = make_folders(tmp_path / "reg", ["1_dog"])
    with caplog.at_level(logging.WARNING):
        (ds,) = dataset_config_from_cli(str(train), str(reg), None,
                                        {"resolution": "1024", "train_batch_size": 2,
                                         "caption_extension": ".txt", "shuffle_caption": True})
    assert "notes" in caplog.text
    by_dir = {Path(s.image_dir).name: s for s in ds.subsets}
    assert set(by_dir) == {"10_sks dog", "3_two_words", "5", "1_dog"}
    assert (by_dir["10_sks dog"].num_repeats, by_dir["10_sks dog"].class_tokens) == (10, "sks dog")
    assert by_dir["3_two_words"].class_tokens == "two_words"
    assert by_dir["5"].class_tokens is None
    assert by_dir["1_dog"].is_reg and not by_dir["10_sks dog"].is_reg
    assert all(s.caption_extension == ".txt" and s.shuffle_caption for s in ds.subsets)
    assert ds.batch_size == 2 and ds.resolution == (1024, 1024)


def test_cli_errors(tmp_path):
    with pytest.raises(UserError, match="--train_data_dir"):
        dataset_config_from_cli(None, None, None, {"resolution": "1024"})
    empty = make_folders(tmp_path / "flat", ["images"])
    with pytest.raises(UserError, match="10_sks dog"):
        dataset_config_from_cli(str(empty), None, None, {"resolution": "1024"})
    with pytest.raises(UserError, match="does not exist"):
        dataset_config_from_cli(str(tmp_path / "nothing"), None, None, {"resolution": "1024"})
    train = make_folders(tmp_path / "ok", ["2_cat"])
    with pytest.raises(UserError, match="--train_batch_size"):
        dataset_config_from_cli(str(train), None, None, {"resolution": "1024", "train_batch_size": 0})


def test_in_json_gives_one_finetune_subset(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text("{}", encoding="utf-8")
    (ds,) = dataset_config_from_cli(str(tmp_path), None, str(meta),
                                    {"resolution": "1024", "dataset_repeats": 4})
    (subset,) = ds.subsets
    assert subset.kind == "finetune" and subset.num_repeats == 4
    assert subset.metadata_file == str(meta) and subset.image_dir == str(tmp_path)


def test_conditioning_dir_from_cli_gives_controlnet_subsets(tmp_path):
    train = make_folders(tmp_path / "img", ["1_a", "2_b"])
    cond = make_folders(tmp_path / "cond", [])
    (ds,) = dataset_config_from_cli(str(train), None, None,
                                    {"resolution": "1024", "conditioning_data_dir": str(cond)})
    assert ds.kind == "controlnet" and len(ds.subsets) == 2


def _touch_images(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")  # the layout is decided from names only; nothing is decoded
    return folder


def test_conditioning_dir_with_images_in_train_data_dir_is_one_subset(tmp_path):
    """sd-scripts' ControlNet layout: --train_data_dir itself is the one subset, num_repeats 1, and
    --caption_extension applies; a sub-folder next to the images is not a subset."""
    train = _touch_images(tmp_path / "img", ["a.png", "b.JPG"])
    (train / "10_ignored").mkdir()
    cond = make_folders(tmp_path / "cond", [])
    (ds,) = dataset_config_from_cli(str(train), None, None,
                                    {"resolution": "1024", "conditioning_data_dir": str(cond),
                                     "caption_extension": ".txt"})
    (subset,) = ds.subsets
    assert subset.kind == "controlnet" and subset.image_dir == str(train) and subset.num_repeats == 1
    assert subset.conditioning_data_dir == str(cond) and subset.caption_extension == ".txt"
    assert subset.class_tokens is None


def test_conditioning_dir_with_repeat_folders_keeps_repeats_and_class_tokens(tmp_path):
    """Our extension: no images in --train_data_dir but '<repeats>_<name>' folders: one subset each."""
    train = make_folders(tmp_path / "img", ["10_red square", "2_blue"])
    cond = make_folders(tmp_path / "cond", [])
    (ds,) = dataset_config_from_cli(str(train), None, None,
                                    {"resolution": "1024", "conditioning_data_dir": str(cond)})
    got = {Path(s.image_dir).name: (s.num_repeats, s.class_tokens, s.conditioning_data_dir) for s in ds.subsets}
    assert got == {"10_red square": (10, "red square", str(cond)), "2_blue": (2, "blue", str(cond))}


def test_conditioning_dir_with_neither_images_nor_folders_is_one_line(tmp_path):
    train = make_folders(tmp_path / "img", ["notes"])
    with pytest.raises(UserError) as info:
        dataset_config_from_cli(str(train), None, None,
                                {"resolution": "1024", "conditioning_data_dir": str(tmp_path)})
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"--train_data_dir {train} has no images")
    assert "--conditioning_data_dir" in text
    with pytest.raises(UserError, match="--train_data_dir: folder .* does not exist"):
        dataset_config_from_cli(str(tmp_path / "nope"), None, None,
                                {"resolution": "1024", "conditioning_data_dir": str(tmp_path)})
