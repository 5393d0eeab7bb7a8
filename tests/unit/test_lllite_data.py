"""LLLite data: with cached latents the control image gets the crop and flip recorded with the cache."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from library.data.cachers import LatentCacheOptions
from tests.unit.test_dataset import (
    _epoch_batches,
    _group,
    _one_dataset,
    _save,
    fake_vae,
)


def test_control_image_matches_cached_latents_crop_and_flip(tmp_path: Path) -> None:
    (tmp_path / "cond").mkdir()
    for i, (w, h) in enumerate([(100, 64), (64, 120), (80, 80)]):  # each one is resized and cropped
        img = _save(tmp_path / "img" / f"p{i}.png", w, h, i)
        Image.open(img).save(tmp_path / "cond" / f"p{i}.png")  # control image = the image itself
    subset = {"image_dir": str(tmp_path / "img"), "conditioning_data_dir": str(tmp_path / "cond"),
              "flip_aug": True, "num_repeats": 3}
    group = _group(_one_dataset([subset]))
    group.cache_latents(fake_vae, "fake", LatentCacheOptions(show_progress=False))
    flips = set()
    for epoch in (1, 2):
        for batch in _epoch_batches(group, epoch):
            assert "latents" in batch and "images" not in batch
            cond = batch["conditioning_images"]
            assert cond.shape[-2:] == tuple(batch["target_sizes_hw"][0].tolist())
            # the control image, encoded like the image was, gives the cached latents: same crop, same flip
            assert torch.allclose(fake_vae(cond * 2 - 1), batch["latents"], atol=1e-5)
            flips |= set(batch["flipped"].tolist())
    assert flips == {True, False}


def test_control_images_without_a_training_image_are_counted_in_one_warning(tmp_path: Path, caplog) -> None:
    """sd-scripts stops on control images that pair with no training image; here they are left out with
    one warning per folder naming them and their count, shared by every subset using the folder."""
    import logging

    for sub in ("a", "b"):
        _save(tmp_path / sub / f"{sub}.png", 64, 64, 1)
        _save(tmp_path / "cond" / f"{sub}.png", 64, 64, 2)
    for extra in ("extra1.png", "extra2.webp"):
        _save(tmp_path / "cond" / extra, 64, 64, 3)
    subsets = [{"image_dir": str(tmp_path / sub), "conditioning_data_dir": str(tmp_path / "cond")}
               for sub in ("a", "b")]
    with caplog.at_level(logging.WARNING):
        group = _group(_one_dataset(subsets))
    assert sorted(Path(i.conditioning_path).name for i in group.items) == ["a.png", "b.png"]
    lines = [r.getMessage() for r in caplog.records if "no training image" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("2 conditioning image(s) in ")
    assert lines[0].endswith("are not used: extra1.png, extra2.webp")
