"""Unit tests for library.data.dataset: listing, scanning, buckets, batches, captions, caches."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from library.config.dataset_toml import build_dataset_configs
from library.data.cachers import LatentCacheOptions, TextEncoderCacheOptions
from library.data.dataset import (
    DataOptions,
    DatasetGroup,
    build_dataset_group,
    collate_single,
    make_dataloader,
)
from library.data.dataset_items import balance_reg_repeats, resolve_metadata_key
from library.errors import UserError

BUCKETS = {"enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32}
TAGS = "sks dog, red, green, blue, yellow, big, small, fluffy, happy, sad"


def _save(path: Path, w: int, h: int, seed: int = 0, caption: str | None = None,
          mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 4 if mode == "RGBA" else 3
    Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode).save(path)
    if caption is not None:
        path.with_suffix(".caption").write_text(caption, encoding="utf-8")
    return path


def _group(document: dict, **options) -> DatasetGroup:
    configs = build_dataset_configs(document, file="test.toml")
    return DatasetGroup(configs, DataOptions(**{"seed": 3, **options}), source="test.toml")


def _one_dataset(subsets: list, **dataset) -> dict:
    return {"general": {"resolution": 64, **BUCKETS}, "datasets": [{**dataset, "subsets": subsets}]}


def fake_vae(pixels: torch.Tensor) -> torch.Tensor:
    """Stand-in VAE: 8x average pooling and a fixed 3 -> 4 channel map (flip-equivariant)."""
    pooled = F.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


def fake_te(captions: list) -> tuple:
    """Stand-in text encoders: values derived from each caption's length."""
    n = torch.tensor([float(len(c)) for c in captions])
    return (n[:, None, None].expand(-1, 77, 8).clone(), n[:, None, None].expand(-1, 77, 16).clone(),
            n[:, None].expand(-1, 16).clone())


def _epoch_batches(group: DatasetGroup, epoch: int) -> list:
    group.set_epoch(epoch)
    return [group[i] for i in range(len(group))]


@pytest.fixture
def dreambooth(tmp_path: Path) -> Path:
    train = tmp_path / "train" / "3_sks dog"
    _save(train / "a.png", 64, 64, 1, caption="sks dog, red")
    _save(train / "b.jpg", 96, 64, 2)  # no caption file: class tokens
    reg = tmp_path / "reg" / "1_dog"
    for i in range(4):
        _save(reg / f"r{i}.png", 64, 64, 10 + i)
    return tmp_path


# --- listing, balancing, metadata ------------------------------------------------------------------


def test_dreambooth_with_balanced_reg_images(dreambooth: Path) -> None:
    group = build_dataset_group({"train_data_dir": str(dreambooth / "train"),
                                 "reg_data_dir": str(dreambooth / "reg"), "resolution": "64",
                                 "train_batch_size": 2, "prior_loss_weight": 0.25, **BUCKETS})
    assert group.num_train_images == 6 and group.num_reg_images == 4
    batches = _epoch_batches(group, 1)
    assert len(group) == len(batches) == 6  # 12 samples (6 train + 6 reg), buckets of 2
    paths = [p for b in batches for p in b["image_paths"]]
    weights = torch.cat([b["loss_weights"] for b in batches])
    is_reg = torch.tensor(["reg" in p for p in paths])
    assert is_reg.sum() == 6 and (weights[is_reg] == 0.25).all() and (weights[~is_reg] == 1).all()
    assert sorted(p.rsplit("/", 1)[1] for p in paths if "reg" in p) == ["r0.png", "r0.png", "r1.png",
                                                                       "r1.png", "r2.png", "r3.png"]
    captions = {p.rsplit("/", 1)[1]: c for b in batches for p, c in zip(b["image_paths"], b["captions"])}
    assert captions["a.png"] == "sks dog, red" and captions["b.jpg"] == "sks dog"
    assert captions["r0.png"] == "dog"
    assert group.dataset_dirs() == {"3_sks dog": {"n_repeats": 3, "img_count": 2}}
    assert group.dataset_dirs(reg=True) == {"1_dog": {"n_repeats": 1, "img_count": 4}}


def test_balance_reg_repeats() -> None:
    assert balance_reg_repeats(6, [1, 1, 1, 1]) == [2, 2, 1, 1]
    assert balance_reg_repeats(5, [3, 3, 3]) == [3, 2, 0]
    assert balance_reg_repeats(0, [2]) == [0]
    assert sum(balance_reg_repeats(101, [2, 5, 1])) == 101


def test_finetune_json_keys_and_jsonl(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    _save(images / "stem.png", 64, 64, 1)
    _save(images / "named.jpg", 64, 64, 2)
    _save(images / "sub" / "deep.png", 64, 96, 3)
    absolute = _save(tmp_path / "elsewhere" / "abs.webp", 96, 64, 4)
    meta = {"stem": {"caption": "a cat", "tags": "tag1, tag2"}, "named.jpg": {"tags": "only tags"},
            "sub/deep": {"caption": "deep one", "image_size": [64, 96]}, str(absolute): {"caption": "abs"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    group = _group(_one_dataset([{"metadata_file": str(tmp_path / "meta.json"), "image_dir": str(images)}]))
    captions = {os.path.basename(i.path): i.caption for i in group.items}
    assert captions == {"stem.png": "a cat, tag1, tag2", "named.jpg": "only tags",
                        "deep.png": "deep one", "abs.webp": "abs"}
    assert group.tag_frequency()["meta.json"]["tag1"] == 1
    assert group.datasets_metadata()[0]["subsets"][0]["metadata_file"] == "meta.json"
    lines = [{"image_path": "stem.png", "caption": "line one"}, {"image_path": str(absolute), "tags": "x"}]
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    group = _group(_one_dataset([{"metadata_file": str(tmp_path / "meta.jsonl"), "image_dir": str(images)}]))
    assert sorted(i.caption for i in group.items) == ["line one", "x"]
    assert resolve_metadata_key("missing", str(images)) is None


def test_controlnet_pairs_by_stem_and_crops_identically(tmp_path: Path) -> None:
    (tmp_path / "cond").mkdir()
    for i, (w, h) in enumerate([(96, 64), (64, 128)]):
        img = _save(tmp_path / "img" / f"p{i}.png", w, h, i)
        Image.open(img).save(tmp_path / "cond" / f"p{i}.webp", lossless=True)  # pairs by stem
    _save(tmp_path / "img" / "lonely.png", 64, 64, 9)
    subset = {"image_dir": str(tmp_path / "img"), "conditioning_data_dir": str(tmp_path / "cond"),
              "random_crop": True, "flip_aug": True}
    with pytest.raises(UserError, match="lonely.png.*no conditioning image"):
        _group(_one_dataset([subset]))
    (tmp_path / "img" / "lonely.png").unlink()
    group = _group(_one_dataset([subset]))
    for epoch in (1, 2, 3):
        for batch in _epoch_batches(group, epoch):
            cond = batch["conditioning_images"]
            assert cond.dtype == torch.float32 and cond.shape == batch["images"].shape
            assert 0 <= cond.min() and cond.max() <= 1
            assert torch.allclose(cond * 2 - 1, batch["images"], atol=1e-5)
            assert batch["captions"] == [""]


# --- bad data --------------------------------------------------------------------------------------


def test_every_bad_file_reported_before_anything_else(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "img"
    _save(folder / "good.png", 64, 64, caption="fine")
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
    _save(folder / "nocaption.png", 64, 64)
    document = _one_dataset([{"image_dir": str(folder)}])
    with pytest.raises(UserError) as info:
        _group(document)
    message = str(info.value)
    for name in ("empty.png", "garbage.jpg", "nocaption.png"):
        assert name in message
    assert "good.png" not in message and "--skip_bad_images" in message
    with caplog.at_level(logging.WARNING):
        group = _group(document, skip_bad_images=True)
    assert [os.path.basename(i.path) for i in group.items] == ["good.png"]
    assert {os.path.basename(p) for p, _ in group.bad_images} == {"empty.png", "garbage.jpg",
                                                                  "nocaption.png"}
    assert "garbage.jpg" in caplog.text


def test_te_cache_with_shuffle_caption_in_toml_fails_before_scanning(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "broken.png").write_bytes(b"")  # never reached: the config check comes first
    toml = tmp_path / "data.toml"
    toml.write_text(f'[general]\nresolution = 64\nshuffle_caption = true\n[[datasets]]\n'
                    f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\nclass_tokens = "x"\n')
    with pytest.raises(UserError, match=r"shuffle_caption.*data\.toml"):
        build_dataset_group({"dataset_config": str(toml), "cache_text_encoder_outputs": True})
    with pytest.raises(UserError, match="random_crop"):
        build_dataset_group({"dataset_config": str(toml), "random_crop": True, "cache_latents": True})


# --- batches ---------------------------------------------------------------------------------------


def test_batch_dict_shapes_and_dtypes(dreambooth: Path) -> None:
    group = _group(_one_dataset([{"image_dir": str(dreambooth / "train" / "3_sks dog"),
                                  "class_tokens": "sks dog", "num_repeats": 3,
                                  "custom_attributes": {"k": 1}}], batch_size=4, network_multiplier=0.5))
    batch = group[0]
    n = len(batch["captions"])
    assert batch["images"].dtype == torch.float32 and batch["images"].shape[:2] == (n, 3)
    assert -1 <= batch["images"].min() and batch["images"].max() <= 1
    for key in ("original_sizes_hw", "crop_top_lefts", "target_sizes_hw"):
        assert batch[key].dtype == torch.long and batch[key].shape == (n, 2)
    assert (batch["target_sizes_hw"] == torch.tensor(batch["images"].shape[2:])).all()
    assert batch["loss_weights"].dtype == torch.float32 and batch["loss_weights"].shape == (n,)
    assert (batch["network_multipliers"] == 0.5).all()
    assert batch["custom_attributes"] == [{"k": 1}] * n
    assert "latents" not in batch and "te_outputs" not in batch
    assert collate_single([batch]) is batch
    with pytest.raises(IndexError):
        group[len(group)]


@pytest.mark.parametrize("random_crop", [False, True])
def test_crop_conditioning_is_the_real_crop(tmp_path: Path, random_crop: bool) -> None:
    folder = tmp_path / "img"
    _save(folder / "wide.png", 128, 72, 1, caption="w")
    _save(folder / "tall.png", 72, 128, 2, caption="t")
    group = _group(_one_dataset([{"image_dir": str(folder), "flip_aug": True, "random_crop": random_crop,
                                  "num_repeats": 4}]))
    seen_flip, offsets = set(), set()
    for epoch in (1, 2):
        for batch in _epoch_batches(group, epoch):
            for j, path in enumerate(batch["image_paths"]):
                item = next(i for i in group.items if i.path == path)
                rw, rh = item.resized_size
                resized = np.asarray(Image.open(path).convert("RGB").resize((rw, rh), Image.Resampling.BOX))
                flipped = bool(batch["flipped"][j])
                view = resized[:, ::-1] if flipped else resized
                top, left = batch["crop_top_lefts"][j].tolist()
                bh, bw = batch["target_sizes_hw"][j].tolist()
                expected = torch.tensor(view[top:top + bh, left:left + bw].copy()).permute(2, 0, 1) / 127.5 - 1
                assert torch.allclose(batch["images"][j], expected, atol=1e-5)
                assert batch["original_sizes_hw"][j].tolist() == [item.original_size[1], item.original_size[0]]
                seen_flip.add(flipped)
                offsets.add((path, top, left))
    assert seen_flip == {False, True}
    if random_crop:
        assert len(offsets) > 4  # random offsets, not only the centre and its mirror


def test_captions_and_order_reproducible_per_epoch(dreambooth: Path) -> None:
    subset = {"image_dir": str(dreambooth / "train" / "3_sks dog"), "class_tokens": TAGS,
              "shuffle_caption": True, "keep_tokens": 1, "caption_tag_dropout_rate": 0.2}
    one, two = (_group(_one_dataset([subset])) for _ in range(2))
    e1 = [(b["image_paths"], b["captions"]) for b in _epoch_batches(one, 1)]
    assert e1 == [(b["image_paths"], b["captions"]) for b in _epoch_batches(two, 1)]
    e2 = [(b["image_paths"], b["captions"]) for b in _epoch_batches(one, 2)]
    assert e2 != e1
    assert all(c.startswith("sks dog") for _, caps in e1 + e2 for c in caps)
    assert e1 == [(b["image_paths"], b["captions"]) for b in _epoch_batches(one, 1)]
    other_seed = _group(_one_dataset([subset]), seed=99)
    assert [b["captions"] for b in _epoch_batches(other_seed, 1)] != [c for _, c in e1]
    loader = make_dataloader(two, num_workers=2, persistent_workers=True)
    for epoch, expected in ((1, e1), (2, e2)):
        two.set_epoch(epoch)
        assert [(b["image_paths"], b["captions"]) for b in loader] == expected


def test_epochs_count_from_zero_and_dropout_every_n_from_one(dreambooth: Path) -> None:
    group = _group(_one_dataset([{"image_dir": str(dreambooth / "train" / "3_sks dog"), "class_tokens": "x",
                                  "caption_dropout_every_n_epochs": 2}]))
    assert group.epoch == 0
    assert all(c for b in _epoch_batches(group, 0) for c in b["captions"])  # first epoch
    assert not any(c for b in _epoch_batches(group, 1) for c in b["captions"])  # second: dropped
    assert all(c for b in _epoch_batches(group, 2) for c in b["captions"])


def test_token_warmup_follows_the_current_step(dreambooth: Path) -> None:
    subset = {"image_dir": str(dreambooth / "train" / "3_sks dog"), "class_tokens": TAGS,
              "token_warmup_min": 1, "token_warmup_step": 0.5}
    with pytest.raises(UserError, match="max_train_steps"):
        _group(_one_dataset([subset]))
    group = _group(_one_dataset([subset]), max_train_steps=20)
    item = next(i for i in range(len(group)) if "b.jpg" in group[i]["image_paths"][0])
    group.set_current_step(0)
    assert group[item]["captions"][0] == "sks dog"
    group.set_current_step(10)
    assert group[item]["captions"][0] == TAGS


# --- caches ----------------------------------------------------------------------------------------


def test_cached_latents_in_memory_with_flips_and_alpha(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    _save(folder / "rgba.png", 96, 64, 1, caption="x", mode="RGBA")
    _save(folder / "plain.png", 64, 64, 2, caption="y")
    document = _one_dataset([{"image_dir": str(folder), "flip_aug": True, "alpha_mask": True,
                              "num_repeats": 4}])
    plain = _group(document)
    cached = _group(document)
    report = cached.cache_latents(fake_vae, "fake", LatentCacheOptions(show_progress=False))
    assert report.computed == 2
    for epoch in (1, 2):
        for a, b in zip(_epoch_batches(plain, epoch), _epoch_batches(cached, epoch)):
            assert "images" in a and "latents" in b and b["latents"].dtype == torch.float32
            assert torch.allclose(fake_vae(a["images"]), b["latents"], atol=1e-5)
            assert torch.equal(a["flipped"], b["flipped"]) and torch.equal(a["crop_top_lefts"], b["crop_top_lefts"])
            assert torch.allclose(a["alpha_masks"], b["alpha_masks"])
            assert b["alpha_masks"].shape == (1, *b["target_sizes_hw"][0].tolist())


def test_disk_latent_cache_reuse_edit_and_multires(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 96)]):
        _save(folder / f"i{i}.png", w, h, i, caption="c")
    subset = {"image_dir": str(folder)}
    document = {"general": BUCKETS, "datasets": [{"resolution": 64, "subsets": [subset]},
                                                 {"resolution": 96, "subsets": [subset]}]}
    opts = LatentCacheOptions(to_disk=True, show_progress=False)
    first = _group(document)
    assert first.cache_latents(fake_vae, "fake", opts).computed == 6
    names = sorted(p.name for p in folder.glob("*.npz"))
    assert "i1_0096x0064_sdxl.npz" in names and len(names) == 6  # the 96 px dataset got own files
    assert _group(document).cache_latents(fake_vae, "fake", opts).computed == 0
    _save(folder / "i1.png", 96, 64, 42, caption="c")  # edited, same size
    again = _group(document)
    assert again.cache_latents(fake_vae, "fake", opts).computed == 2  # i1 in both datasets
    assert again.cache_latents(fake_vae, "other-vae", opts).computed == 6
    for batch in _epoch_batches(again, 1):
        assert batch["latents"].shape[2:] == tuple(batch["target_sizes_hw"][0] // 8)


def test_sharded_disk_caching_and_lazy_resolution(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    for i in range(5):
        _save(folder / f"s{i}.png", 64, 64, i, caption="c")
    document = _one_dataset([{"image_dir": str(folder)}])
    opts = LatentCacheOptions(to_disk=True, show_progress=False)
    computed = [_group(document).cache_latents(fake_vae, "v", opts, process_index=k, num_processes=2).computed
                for k in (0, 1)]
    assert computed == [3, 2]
    group = _group(document)
    assert group.cache_latents(fake_vae, "v", opts, process_index=1, num_processes=2).computed == 0
    assert all(b["latents"].shape == (1, 4, 8, 8) for b in _epoch_batches(group, 1))  # other shard: checked lazily
    (folder / "s0_0064x0064_sdxl.npz").unlink()
    group = _group(document)
    group.cache_latents(fake_vae, "v", opts, process_index=1, num_processes=2)
    with pytest.raises(UserError, match="s0.png: no valid latents cache file"):
        _epoch_batches(group, 1)


def test_text_encoder_outputs_cached(dreambooth: Path) -> None:
    folder = dreambooth / "train" / "3_sks dog"
    document = _one_dataset([{"image_dir": str(folder), "class_tokens": "sks dog", "caption_prefix": "photo of"}])
    group = _group(document)
    report = group.cache_text_encoder_outputs(fake_te, "te", TextEncoderCacheOptions(to_disk=True,
                                                                                     show_progress=False))
    assert report.computed == 2 and sorted(p.name for p in folder.glob("*_te_outputs.npz")) == [
        "a_te_outputs.npz", "b_te_outputs.npz"]
    for batch in _epoch_batches(group, 1):
        h1, h2, pool = batch["te_outputs"]
        assert h1.shape == (1, 77, 8) and h2.shape == (1, 77, 16) and pool.shape == (1, 16)
        assert pool[0, 0] == len(batch["captions"][0]) and batch["captions"][0].startswith("photo of ")
    (folder / "a.caption").write_text("sks dog, edited", encoding="utf-8")
    again = _group(document)
    assert again.cache_text_encoder_outputs(fake_te, "te", TextEncoderCacheOptions(
        to_disk=True, show_progress=False)).computed == 1
    shuffled = _group(_one_dataset([{"image_dir": str(folder), "class_tokens": "x", "shuffle_caption": True}]))
    with pytest.raises(UserError, match="shuffle_caption"):
        shuffled.cache_text_encoder_outputs(fake_te, "te", TextEncoderCacheOptions(show_progress=False))


def test_metadata_helpers(dreambooth: Path) -> None:
    group = build_dataset_group({"train_data_dir": str(dreambooth / "train"),
                                 "reg_data_dir": str(dreambooth / "reg"), "resolution": "64", **BUCKETS})
    info = group.bucket_info()
    assert sum(b["count"] for b in info["buckets"].values()) == 12
    meta = group.datasets_metadata()
    assert len(meta) == 1 and meta[0]["num_train_images"] == 6 and meta[0]["num_reg_images"] == 4
    assert meta[0]["is_dreambooth"] and [s["image_dir"] for s in meta[0]["subsets"]] == ["3_sks dog", "1_dog"]
    assert group.tag_frequency()["3_sks dog"] == {"sks dog": 2, "red": 1}
    json.dumps(meta)


def test_no_bucketing_fixed_resolution(tmp_path: Path) -> None:
    _save(tmp_path / "img" / "big.png", 96, 64, caption="c")
    document = {"general": {"resolution": 64}, "datasets": [{"subsets": [
        {"image_dir": str(tmp_path / "img"), "random_crop": True}]}]}
    batch = _group(document)[0]
    assert batch["images"].shape == (1, 3, 64, 64)
    assert batch["target_sizes_hw"].tolist() == [[64, 64]] and batch["original_sizes_hw"].tolist() == [[64, 96]]
    centred = _group({"general": {"resolution": 64}, "datasets": [{"subsets": [
        {"image_dir": str(tmp_path / "img"), "class_tokens": "c"}]}]})[0]
    assert centred["images"].shape == (1, 3, 64, 64) and centred["crop_top_lefts"].tolist() == [[0, 16]]


def test_validation_split_holds_images_out(tmp_path: Path) -> None:
    folder = tmp_path / "img"
    for i in range(10):
        _save(folder / f"v{i}.png", 64, 64, i, caption="c")
    group = _group(_one_dataset([{"image_dir": str(folder), "num_repeats": 2}], validation_split=0.3))
    validation = group.validation_group()
    assert group.num_validation_images == 3 and group.num_train_images == 14
    train_paths = {p for b in _epoch_batches(group, 1) for p in b["image_paths"]}
    val_paths = [p for b in _epoch_batches(validation, 1) for p in b["image_paths"]]
    assert len(train_paths) == 7 and len(val_paths) == 3 and not train_paths & set(val_paths)
    again = _group(_one_dataset([{"image_dir": str(folder), "num_repeats": 2}], validation_split=0.3))
    assert sorted(val_paths) == sorted(p for b in _epoch_batches(again.validation_group(), 1)
                                       for p in b["image_paths"])
    assert _group(_one_dataset([{"image_dir": str(folder)}])).validation_group() is None


def test_validation_split_follows_validation_seed(tmp_path: Path) -> None:
    """The split is a function of the seed only: the same seed gives the same images, another seed others;
    the command line's --validation_seed reaches the datasets."""
    from library.config.dataset_cli import dataset_config_from_cli

    folder = tmp_path / "img"
    for i in range(10):
        _save(folder / f"v{i}.png", 64, 64, i, caption="c")

    def held_out(seed: int) -> frozenset:
        group = _group(_one_dataset([{"image_dir": str(folder)}], validation_split=0.3, validation_seed=seed))
        val = group.validation_group()
        return frozenset(p for i in range(len(val)) for p in val[i]["image_paths"])

    splits = {seed: held_out(seed) for seed in range(4)}
    assert all(len(s) == 3 for s in splits.values()) and held_out(2) == splits[2]
    assert len(set(splits.values())) > 1
    values = {"validation_split": 0.3, "validation_seed": 2, "resolution": "64", "enable_bucket": True,
              "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32}
    (tmp_path / "dreambooth" / "1_c").mkdir(parents=True)
    for i in range(10):
        shutil.copy(folder / f"v{i}.png", tmp_path / "dreambooth" / "1_c" / f"v{i}.png")
    configs = dataset_config_from_cli(str(tmp_path / "dreambooth"), None, None, values)
    assert configs[0].validation_seed == 2 and configs[0].validation_split == 0.3
