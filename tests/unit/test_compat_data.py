"""sd-scripts compatibility of the data path: no-bucket resize + crop, and the caption warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from library.config.dataset_toml import build_dataset_configs
from library.data.cache import PROVENANCE_KEY
from library.data.cachers import LatentCacheOptions
from library.data.dataset import DataOptions, DatasetGroup, build_dataset_group


def _save(path: Path, w: int, h: int, seed: int, caption_ext: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    if caption_ext:
        path.with_suffix(caption_ext).write_text(f"caption of {path.stem}", encoding="utf-8")
    return path


def _no_bucket_group(folder: Path, **subset) -> DatasetGroup:
    document = {"general": {"resolution": [64, 64], "enable_bucket": False},
                "datasets": [{"subsets": [{"image_dir": str(folder), "class_tokens": "c", **subset}]}]}
    return DatasetGroup(build_dataset_configs(document, file="t.toml"), DataOptions(seed=1), source="t.toml")


# (width, height) -> (resized size covering 64x64, top, left of the centre crop), computed by hand
NO_BUCKET_CASES = {
    (48, 80): ((64, 107), 21, 0),    # smaller and tall: enlarged, cropped vertically
    (128, 96): ((85, 64), 0, 10),    # larger and wide: shrunk, cropped horizontally
    (64, 64): ((64, 64), 0, 0),      # the resolution itself: untouched
}


def test_no_bucket_images_of_other_sizes_are_resized_and_centre_cropped(tmp_path):
    folder = tmp_path / "img"
    for i, (w, h) in enumerate(NO_BUCKET_CASES):
        _save(folder / f"i{w}x{h}.png", w, h, i)
    group = _no_bucket_group(folder)
    seen = set()
    for index in range(len(group)):
        batch = group[index]
        for j, path in enumerate(batch["image_paths"]):
            w, h = Image.open(path).size
            (rw, rh), top, left = NO_BUCKET_CASES[(w, h)]
            assert batch["original_sizes_hw"][j].tolist() == [h, w]
            assert batch["target_sizes_hw"][j].tolist() == [64, 64]
            assert batch["crop_top_lefts"][j].tolist() == [top, left]
            resized = np.asarray(Image.open(path).convert("RGB").resize((rw, rh), Image.Resampling.LANCZOS
                                                                         if rw > w else Image.Resampling.BOX))
            expected = torch.tensor(resized[top:top + 64, left:left + 64].copy()).permute(2, 0, 1) / 127.5 - 1
            assert batch["images"][j].shape == (3, 64, 64)
            assert (batch["images"][j] - expected).abs().max() < 0.05  # same crop (filters may differ a bit)
            seen.add((w, h))
    assert seen == set(NO_BUCKET_CASES)


def test_no_bucket_random_crop_offsets_are_in_the_conditioning(tmp_path):
    _save(tmp_path / "img" / "wide.png", 160, 64, 0)
    group = _no_bucket_group(tmp_path / "img", random_crop=True, num_repeats=8)
    lefts = set()
    for epoch in (1, 2):
        group.set_epoch(epoch)
        for index in range(len(group)):
            batch = group[index]
            top, left = batch["crop_top_lefts"][0].tolist()
            assert top == 0 and 0 <= left <= 96
            lefts.add(left)
    assert len(lefts) > 3


def _fake_vae(pixels: torch.Tensor) -> torch.Tensor:
    pooled = F.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


def test_no_bucket_crop_is_part_of_the_latent_cache_provenance(tmp_path):
    path = _save(tmp_path / "img" / "tall.png", 48, 80, 0)
    opts = LatentCacheOptions(to_disk=True, show_progress=False)
    assert _no_bucket_group(tmp_path / "img").cache_latents(_fake_vae, "v", opts).computed == 1
    (npz,) = path.parent.glob("*.npz")
    with np.load(npz) as data:
        record = json.loads(str(data[PROVENANCE_KEY]))
        assert data["latents"].shape == (4, 8, 8)
        assert data["crop_ltrb"].tolist() == [0, 21, 64, 85]
    assert record["crop_ltrb"] == [0, 21, 64, 85] and record["bucket_reso"] == [64, 64]


def test_caption_extension_mismatch_warns_with_count_and_found_extension(tmp_path, caplog):
    folder = tmp_path / "train" / "5_sks dog"
    for i in range(3):
        _save(folder / f"t{i}.png", 64, 64, i, caption_ext=".txt")  # captions written as .txt
    _save(folder / "u.png", 64, 64, 9)  # no caption at all
    _save(folder / "c.png", 64, 64, 8, caption_ext=".caption")  # the expected extension
    (folder / "t0_0064x0064_sdxl.npz").write_bytes(b"")  # a cache file is not a caption
    with caplog.at_level(logging.WARNING, logger="library.data.caption_check"):
        group = build_dataset_group({"train_data_dir": str(tmp_path / "train"), "resolution": "64"})
    warnings = [r.getMessage() for r in caplog.records if r.name == "library.data.caption_check"]
    assert len(warnings) == 1
    msg = warnings[0]
    assert "4 of 5 images" in msg and str(folder) in msg and "'.caption'" in msg
    assert "class tokens 'sks dog'" in msg and "3 of them have a '.txt' file" in msg
    assert 'caption_extension = ".txt"' in msg
    captions = {Path(i.path).name: i.caption for i in group.items}
    assert captions["c.png"] == "caption of c" and captions["t1.png"] == "sks dog"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="library.data.caption_check"):
        build_dataset_group({"train_data_dir": str(tmp_path / "train"), "resolution": "64",
                             "caption_extension": ".txt"})
    msg = " ".join(r.getMessage() for r in caplog.records if r.name == "library.data.caption_check")
    assert "2 of 5 images" in msg and "'.caption' file next to them" in msg


def test_no_warning_when_every_image_has_its_caption(tmp_path, caplog):
    folder = tmp_path / "train" / "1_x"
    _save(folder / "a.png", 64, 64, 0, caption_ext=".caption")
    with caplog.at_level(logging.WARNING, logger="library.data.caption_check"):
        build_dataset_group({"train_data_dir": str(tmp_path / "train"), "resolution": "64"})
    assert not [r for r in caplog.records if r.name == "library.data.caption_check"]


def test_missing_caption_without_class_tokens_stays_an_error(tmp_path):
    # A subset without class tokens cannot fall back: a missing caption stays an error naming the file.
    from library.errors import UserError

    folder = tmp_path / "img"
    _save(folder / "a.png", 64, 64, 0, caption_ext=".txt")
    document = {"general": {"resolution": 64}, "datasets": [{"subsets": [{"image_dir": str(folder)}]}]}
    with pytest.raises(UserError, match="a.png"):
        DatasetGroup(build_dataset_configs(document, file="t.toml"), DataOptions(), source="t.toml")
