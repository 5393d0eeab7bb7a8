"""Unit tests for library.data.cache: formats, provenance, staleness, cachers, sharding."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from library.data import cache as c
from library.data import cachers as cc
from library.data.images import load_image, resize_and_crop, to_tensor
from library.errors import UserError

PROJ = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])


def fake_vae(pixels: torch.Tensor) -> torch.Tensor:
    """Stand-in VAE: 8x average pooling, then a fixed 3 -> 4 channel projection."""
    pooled = F.avg_pool2d(pixels, 8)  # [B, 3, H/8, W/8]
    return torch.einsum("oc,bchw->bohw", PROJ, pooled)


class CountingEncoder:
    def __init__(self, fn=fake_vae) -> None:
        self.fn = fn
        self.calls: list = []

    def __call__(self, x):
        self.calls.append(x if isinstance(x, list) else tuple(x.shape))
        return self.fn(x)

    @property
    def images(self) -> int:
        return sum(s[0] if isinstance(s, tuple) else len(s) for s in self.calls)


def _save_image(path: Path, w: int, h: int, seed: int, mtime_s: float | None = None) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    if mtime_s is not None:
        os.utime(path, (mtime_s, mtime_s))
    return str(path)


def _item(path: str, size: tuple, bucket: tuple) -> cc.LatentCacheItem:
    """Cover the bucket, centre-crop (enough bucketing for these tests)."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return cc.LatentCacheItem(path, size, bucket, (rw, rh), (left, top),
                             (left, top, left + bw, top + bh))


def _prov(**kw) -> c.LatentProvenance:
    base = dict(image_fingerprint="stat:1:2", original_size=(80, 64), bucket_reso=(64, 48),
                crop_ltrb=(0, 0, 64, 48), vae_id="vae-a", dtype="float32")
    base.update(kw)
    return c.LatentProvenance(**base)


def _entry(h: int = 6, w: int = 8, flipped: bool = False, seed: int = 0) -> c.LatentCacheEntry:
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((4, h, w)).astype(np.float32)
    return c.LatentCacheEntry(lat, (80, 64), (0, 0, 64, 48),
                              latents_flipped=lat[..., ::-1].copy() if flipped else None)


# ---------------------------------------------------------------------------------------------
# paths


def test_cache_paths() -> None:
    assert c.latent_cache_path("/d/img.png", (832, 1216)) == "/d/img_0832x1216_sdxl.npz"
    assert c.latent_cache_path("/d/a.b.JPG", (64, 48)) == "/d/a.b_0064x0048_sdxl.npz"
    assert c.legacy_latent_cache_path("/d/img.webp") == "/d/img.npz"
    assert c.latent_cache_candidates("/d/i.png", (64, 48)) == [
        "/d/i.npz", "/d/i_0064x0048_sdxl.npz"]
    assert c.te_cache_path("/d/img.jpeg") == "/d/img_te_outputs.npz"
    assert [c.expected_token_count(m) for m in (None, 75, 150, 225)] == [77, 77, 152, 227]


# ---------------------------------------------------------------------------------------------
# latent files


def test_latent_round_trip_with_provenance(tmp_path: Path) -> None:
    path = str(tmp_path / "x_0080x0064_sdxl.npz")
    entry = _entry(flipped=True)
    entry.alpha_mask = np.ones((48, 64), dtype=np.float32)
    c.save_latents(path, entry, _prov())
    with np.load(path) as npz:
        assert set(npz.files) == {"latents", "original_size", "crop_ltrb", "latents_flipped",
                                  "alpha_mask", c.PROVENANCE_KEY}
        assert npz["latents"].dtype == np.float32
        assert npz["original_size"].tolist() == [80, 64]
        assert npz[c.PROVENANCE_KEY].dtype.kind == "U"
        record = json.loads(str(npz[c.PROVENANCE_KEY]))
    assert record["vae_id"] == "vae-a" and record["flipped"] is True
    got = c.load_latents(path, _prov(), require_flipped=True, require_alpha_mask=True)
    assert got is not None and got.provenance == _prov()
    assert np.array_equal(got.latents, entry.latents)
    assert np.array_equal(got.latents_flipped, entry.latents_flipped)
    assert got.original_size == (80, 64) and got.crop_ltrb == (0, 0, 64, 48)


@pytest.mark.parametrize("change", [
    dict(vae_id="vae-b"), dict(dtype="bfloat16"), dict(image_fingerprint="stat:1:3"),
    dict(crop_ltrb=(1, 0, 65, 48)), dict(original_size=(81, 64)), dict(interpolation="lanczos"),
])
def test_latent_provenance_mismatch_means_recompute(tmp_path: Path, change: dict) -> None:
    path = str(tmp_path / "x.npz")
    c.save_latents(path, _entry(), _prov())
    assert c.load_latents(path, _prov()) is not None
    assert c.load_latents(path, _prov(**change)) is None


def test_latent_shape_flip_and_finiteness_checks(tmp_path: Path) -> None:
    path = str(tmp_path / "x.npz")
    c.save_latents(path, _entry(), _prov())
    assert c.load_latents(path, _prov(bucket_reso=(64, 56))) is None  # bucket changed
    assert c.load_latents(path, _prov(), require_flipped=True) is None
    assert c.load_latents(path, _prov(), require_alpha_mask=True) is None
    bad = _entry()
    bad.latents[0, 0, 0] = np.nan
    c.save_latents(path, bad, _prov())
    assert c.load_latents(path, _prov()) is None


def test_missing_or_unreadable_latent_file(tmp_path: Path) -> None:
    assert c.load_latents(str(tmp_path / "none.npz"), _prov()) is None
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"PK\x03\x04 definitely not a zip")
    assert c.load_latents(str(garbage), _prov()) is None


def test_rewritten_arrays_under_our_provenance_are_rejected(tmp_path: Path) -> None:
    """sd-scripts merges keys into existing files: a latent rewritten by it keeps our record."""
    path = str(tmp_path / "x.npz")
    c.save_latents(path, _entry(), _prov())
    with np.load(path) as npz:
        data = {k: npz[k] for k in npz.files}
    data["latents"] = _entry(seed=1).latents
    np.savez(path, **data)
    assert c.load_latents(path, _prov()) is None


def test_sd_scripts_file_without_provenance(tmp_path: Path) -> None:
    img = _save_image(tmp_path / "img.png", 80, 64, 0, mtime_s=1_000_000)
    path = c.latent_cache_path(img, (80, 64))
    lat = _entry().latents
    np.savez(path, latents=lat, original_size=np.array([80, 64]),
             crop_ltrb=np.array([0, 2, 64, 46]))
    os.utime(path, (2_000_000, 2_000_000))
    got = c.load_latents(path, _prov(), image_path=img)
    assert got is not None and got.provenance is None
    assert np.array_equal(got.latents, lat)
    assert got.crop_ltrb == (0, 0, 64, 48)  # the crop this run applies, not sd-scripts' letterbox
    assert c.load_latents(path, _prov()) is None  # cannot check the image without its path
    assert c.load_latents(path, _prov(bucket_reso=(64, 56)), image_path=img) is None
    assert c.load_latents(path, _prov(original_size=(96, 64)), image_path=img) is None
    assert c.load_latents(path, _prov(), require_flipped=True, image_path=img) is None
    os.utime(img, (3_000_000, 3_000_000))  # image edited after the cache was written
    assert c.load_latents(path, _prov(), image_path=img) is None
    # --skip_cache_check trusts it anyway (shape still checked)
    assert c.load_latents(path, _prov(), image_path=img, check_provenance=False) is not None


def test_suffixed_multi_resolution_layout(tmp_path: Path) -> None:
    img = _save_image(tmp_path / "img.png", 80, 64, 0, mtime_s=1_000_000)
    path = c.latent_cache_path(img, (80, 64))
    lat = _entry().latents  # (4, 6, 8): bucket 64x48
    np.savez(path, latents_6x8=lat, original_size_6x8=np.array([80, 64]),
             crop_ltrb_6x8=np.array([0, 0, 64, 48]), latents_flipped_6x8=lat[..., ::-1],
             latents_16x16=np.zeros((4, 16, 16), np.float32),
             latents=np.zeros((4, 2, 2), np.float32))  # suffix-less, other size
    os.utime(path, (2_000_000, 2_000_000))
    got = c.load_latents(path, _prov(), require_flipped=True, image_path=img)
    assert got is not None and np.array_equal(got.latents, lat)
    assert np.array_equal(got.latents_flipped, lat[..., ::-1])
    assert c.load_latents(path, _prov(bucket_reso=(128, 128)), image_path=img) is not None
    assert c.load_latents(path, _prov(bucket_reso=(64, 64)), image_path=img) is None


def test_legacy_prepare_buckets_file_is_preferred(tmp_path: Path) -> None:
    img = _save_image(tmp_path / "img.png", 80, 64, 0, mtime_s=1_000_000)
    item = _item(img, (80, 64), (64, 48))
    legacy = c.legacy_latent_cache_path(img)
    lat = _entry().latents
    np.savez(legacy, latents=lat, original_size=np.array([80, 64]),
             crop_ltrb=np.array([0, 0, 64, 48]))
    os.utime(legacy, (2_000_000, 2_000_000))
    got = cc.load_cached_latents(item, "vae-a", cc.LatentCacheOptions())
    assert got is not None and np.array_equal(got.latents, lat)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path, monkeypatch) -> None:
    path = str(tmp_path / "x.npz")
    c.save_latents(path, _entry(), _prov())
    assert os.listdir(tmp_path) == ["x.npz"]
    before = Path(path).read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(c.np, "savez", broken_savez)
    with pytest.raises(UserError, match="x.npz"):
        c.save_latents(path, _entry(seed=3), _prov())
    assert os.listdir(tmp_path) == ["x.npz"]
    assert Path(path).read_bytes() == before


# ---------------------------------------------------------------------------------------------
# text-encoder files


def _te_prov(caption: str = "a dog", **kw) -> c.TextEncoderProvenance:
    base = dict(caption_sha256=c.caption_sha256(caption), te_id="te-a", max_token_length=None,
                weighted_captions=False)
    base.update(kw)
    return c.TextEncoderProvenance(**base)


def _te_entry(t: int = 77, seed: int = 0) -> c.TextEncoderCacheEntry:
    rng = np.random.default_rng(seed)
    return c.TextEncoderCacheEntry(rng.standard_normal((t, 32)).astype(np.float32),
                                   rng.standard_normal((t, 48)).astype(np.float32),
                                   rng.standard_normal(48).astype(np.float32))


def test_te_round_trip_and_staleness(tmp_path: Path) -> None:
    path = str(tmp_path / "img_te_outputs.npz")
    entry = _te_entry()
    c.save_te_outputs(path, entry, _te_prov())
    got = c.load_te_outputs(path, _te_prov())
    assert got is not None and got.provenance == _te_prov()
    assert all(np.array_equal(getattr(got, k), getattr(entry, k))
               for k in ("hidden_state1", "hidden_state2", "pool2"))
    assert c.load_te_outputs(path, _te_prov("a cat")) is None  # caption edited
    assert c.load_te_outputs(path, _te_prov(te_id="te-b")) is None
    assert c.load_te_outputs(path, _te_prov(max_token_length=150)) is None
    assert c.load_te_outputs(path, _te_prov(weighted_captions=True)) is None
    assert c.caption_sha256("a dog") == hashlib.sha256(b"a dog").hexdigest()


def test_te_file_without_provenance(tmp_path: Path) -> None:
    caption_file = tmp_path / "img.caption"
    caption_file.write_text("a dog")
    os.utime(caption_file, (1_000_000, 1_000_000))
    path = str(tmp_path / "img_te_outputs.npz")
    e = _te_entry()
    np.savez(path, hidden_state1=e.hidden_state1, hidden_state2=e.hidden_state2, pool2=e.pool2)
    os.utime(path, (2_000_000, 2_000_000))
    got = c.load_te_outputs(path, _te_prov(), source_path=str(caption_file))
    assert got is not None and got.provenance is None
    assert c.load_te_outputs(path, _te_prov()) is None  # unknown caption source
    assert c.load_te_outputs(path, _te_prov(max_token_length=225),
                             source_path=str(caption_file)) is None
    os.utime(caption_file, (3_000_000, 3_000_000))  # caption edited later
    assert c.load_te_outputs(path, _te_prov(), source_path=str(caption_file)) is None


# ---------------------------------------------------------------------------------------------
# sharding


def test_shards_disjoint_complete_deterministic() -> None:
    items = [f"img{i}" for i in range(13)]
    for n in range(1, 6):
        shards = [c.shard_for_process(items, i, n) for i in range(n)]
        flat = [x for s in shards for x in s]
        assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))
        assert shards == [c.shard_for_process(items, i, n) for i in range(n)]
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for bad in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            c.shard_for_process(items, *bad)


# ---------------------------------------------------------------------------------------------
# LatentCacher


def _data_set(d: Path) -> list:
    specs = [(80, 64, (64, 48)), (64, 80, (48, 64)), (96, 72, (64, 48)), (70, 70, (64, 64)),
             (128, 96, (64, 48))]
    items = []
    for i, (w, h, bucket) in enumerate(specs):
        path = _save_image(d / f"img{i}.png", w, h, i)
        items.append(_item(path, (w, h), bucket))
    return items


def _expected_latents(item: cc.LatentCacheItem) -> np.ndarray:
    arr = resize_and_crop(load_image(item.image_path), item.resized_size, *item.crop_left_top,
                          item.bucket_reso)
    return fake_vae(to_tensor(arr)[None])[0].numpy()


@pytest.mark.parametrize("workers", [0, 2])
def test_latent_cacher_computes_only_missing_entries(tmp_path: Path, workers: int) -> None:
    items = _data_set(tmp_path)
    opts = cc.LatentCacheOptions(to_disk=True, vae_batch_size=2, num_workers=workers,
                                show_progress=False)
    first = CountingEncoder()
    report = cc.LatentCacher(first, "vae-a", opts).cache(items[:2])
    assert (report.computed, report.reused, first.images) == (2, 0, 2)

    enc = CountingEncoder()
    report = cc.LatentCacher(enc, "vae-a", opts).cache(items)
    assert (report.computed, report.reused, enc.images) == (3, 2, 3)
    assert report.entries == {}
    for shape in enc.calls:
        assert shape[0] <= 2
    for item in items:
        path = c.latent_cache_path(item.image_path, item.original_size)
        entry = cc.load_cached_latents(item, "vae-a", opts)
        assert os.path.isfile(path) and entry is not None
        assert entry.latents.shape == (4, item.bucket_reso[1] // 8, item.bucket_reso[0] // 8)
        assert np.allclose(entry.latents, _expected_latents(item), atol=1e-6)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    again = CountingEncoder()
    assert cc.LatentCacher(again, "vae-a", opts).cache(items).computed == 0 and not again.calls


def test_latent_cacher_batches_within_one_bucket(tmp_path: Path) -> None:
    items = _data_set(tmp_path)
    enc = CountingEncoder()
    opts = cc.LatentCacheOptions(vae_batch_size=4, show_progress=False)
    cc.LatentCacher(enc, "v", opts).cache(items)
    # buckets: 48x64 (1), 64x48 (3), 64x64 (1) -> three calls, one bucket each
    assert sorted(enc.calls) == sorted([(1, 3, 64, 48), (3, 3, 48, 64), (1, 3, 64, 64)])


def test_latent_cacher_recomputes_edited_image_and_new_vae(tmp_path: Path) -> None:
    items = _data_set(tmp_path)
    opts = cc.LatentCacheOptions(to_disk=True, show_progress=False)
    cc.LatentCacher(fake_vae, "vae-a", opts).cache(items)

    target = items[2]
    _save_image(Path(target.image_path), *target.original_size, seed=99)  # same size, new pixels
    st = os.stat(target.image_path)
    os.utime(target.image_path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    enc = CountingEncoder()
    report = cc.LatentCacher(enc, "vae-a", opts).cache(items)
    assert (report.computed, report.reused) == (1, 4)
    entry = cc.load_cached_latents(target, "vae-a", opts)
    assert np.allclose(entry.latents, _expected_latents(target), atol=1e-6)

    report = cc.LatentCacher(CountingEncoder(), "vae-b", opts).cache(items)
    assert (report.computed, report.reused) == (5, 0)
    fp32 = replace(opts, vae_dtype="bfloat16")
    assert cc.LatentCacher(fake_vae, "vae-b", fp32).cache(items).computed == 5


def test_latent_cacher_flip_and_memory_mode(tmp_path: Path) -> None:
    items = _data_set(tmp_path)
    opts = cc.LatentCacheOptions(flip_aug=True, show_progress=False)
    cacher = cc.LatentCacher(fake_vae, "vae-a", opts)
    report = cacher.cache(items)
    assert report.computed == 5 and set(report.entries) == {i.image_path for i in items}
    for entry in report.entries.values():
        # average pooling commutes with a mirror when the width is a multiple of 8
        assert np.allclose(entry.latents_flipped, entry.latents[..., ::-1], atol=1e-6)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".npz")]  # memory only
    enc = CountingEncoder()
    cacher.encode_fn = enc
    assert cacher.cache(items).reused == 5 and not enc.calls

    # an on-disk entry without flipped latents is recomputed when flip_aug is on
    disk = cc.LatentCacheOptions(to_disk=True, show_progress=False)
    cc.LatentCacher(fake_vae, "vae-a", disk).cache(items)
    report = cc.LatentCacher(fake_vae, "vae-a", replace(disk, flip_aug=True)).cache(items)
    assert report.computed == 5


def test_latent_cacher_alpha_mask(tmp_path: Path) -> None:
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, 32:, 3] = 255
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    item = _item(str(path), (64, 64), (64, 64))
    opts = cc.LatentCacheOptions(alpha_mask=True, to_disk=True, show_progress=False)
    cc.LatentCacher(fake_vae, "v", opts).cache([item])
    entry = cc.load_cached_latents(item, "v", opts)
    assert entry.alpha_mask.shape == (64, 64)
    assert entry.alpha_mask[:, :32].max() == 0.0 and entry.alpha_mask[:, 32:].min() == 1.0
    # pixels are composited on white exactly as without alpha_mask
    no_alpha = cc.LatentCacher(fake_vae, "v", cc.LatentCacheOptions(show_progress=False))
    plain = no_alpha.cache([item]).entries[str(path)]
    assert np.allclose(plain.latents, entry.latents)


def test_latent_cacher_nan_and_bad_shapes(tmp_path: Path) -> None:
    items = _data_set(tmp_path)[:1]
    opts = cc.LatentCacheOptions(show_progress=False, num_workers=0)
    with pytest.raises(UserError, match="no_half_vae"):
        cc.LatentCacher(lambda x: fake_vae(x) * float("nan"), "v", opts).cache(items)
    with pytest.raises(ValueError, match="encode_fn"):
        cc.LatentCacher(lambda x: F.avg_pool2d(x, 4), "v", opts).cache(items)


def test_latent_cacher_skip_cache_check_trusts_existing_files(tmp_path: Path) -> None:
    items = _data_set(tmp_path)[:2]
    opts = cc.LatentCacheOptions(to_disk=True, show_progress=False)
    cc.LatentCacher(fake_vae, "vae-a", opts).cache(items)
    trusting = replace(opts, skip_cache_check=True)
    assert cc.LatentCacher(fake_vae, "vae-b", trusting).cache(items).computed == 0


# ---------------------------------------------------------------------------------------------
# TextEncoderOutputCacher


def fake_te(captions: list) -> tuple:
    seeds = [int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) for s in captions]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    h1 = torch.stack([torch.randn(77, 16, generator=g) for g in gens])
    h2 = torch.stack([torch.randn(77, 24, generator=g) for g in gens])
    pool = torch.stack([torch.randn(24, generator=g) for g in gens])
    return h1, h2, pool


def test_te_cacher_dedups_and_recomputes_edited_captions(tmp_path: Path) -> None:
    items = [cc.TextEncoderCacheItem(str(tmp_path / f"img{i}.png"), cap)
             for i, cap in enumerate(["a dog", "a cat", "a dog"])]
    opts = cc.TextEncoderCacheOptions(to_disk=True, batch_size=8, show_progress=False)
    enc = CountingEncoder(fake_te)
    report = cc.TextEncoderOutputCacher(enc, "te-a", opts).cache(items)
    assert (report.computed, report.reused) == (3, 0)
    assert enc.calls == [["a dog", "a cat"]]  # identical captions encoded once
    for item in items:
        got = cc.load_cached_te_outputs(item, "te-a", opts)
        ref = fake_te([item.caption])
        assert np.allclose(got.hidden_state1, ref[0][0].numpy())
        assert got.hidden_state2.shape == (77, 24) and got.pool2.shape == (24,)

    items[1] = cc.TextEncoderCacheItem(items[1].key, "a black cat")
    enc = CountingEncoder(fake_te)
    report = cc.TextEncoderOutputCacher(enc, "te-a", opts).cache(items)
    assert (report.computed, report.reused) == (1, 2) and enc.calls == [["a black cat"]]

    report = cc.TextEncoderOutputCacher(fake_te, "te-b", opts).cache(items)
    assert report.computed == 3


def test_te_cacher_in_memory(tmp_path: Path) -> None:
    items = [cc.TextEncoderCacheItem(f"k{i}", f"caption {i % 2}") for i in range(5)]
    opts = cc.TextEncoderCacheOptions(batch_size=1, show_progress=False)
    enc = CountingEncoder(fake_te)
    cacher = cc.TextEncoderOutputCacher(enc, "te", opts)
    report = cacher.cache(items)
    assert set(report.entries) == {f"k{i}" for i in range(5)} and len(enc.calls) == 2
    assert cacher.cache(items).reused == 5 and len(enc.calls) == 2
    assert not os.listdir(tmp_path)
