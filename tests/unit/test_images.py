"""Unit tests for library.data.images: loading, validation, resizing, fingerprints."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data import images as im
from library.errors import UserError

# The bomb fixtures make PIL warn before our own check refuses them; that warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


# ---------------------------------------------------------------------------------------------
# helpers that write test files


def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def _png_bytes(w: int, h: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A minimal valid PNG with the given IHDR and (filter-byte-prefixed) scanlines."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def _write_bad_data_set(d: Path) -> tuple:
    """Write a mixed folder; return (expected good paths -> size, expected bad path -> keyword)."""
    good, bad = {}, {}

    p = d / "normal.jpg"
    _rgb(80, 64).save(p, quality=95)
    good[str(p)] = (80, 64)

    p = d / "UPPER.PNG"
    _rgb(70, 70, 1).save(p)
    good[str(p)] = (70, 70)

    p = d / "cmyk.jpg"
    Image.new("CMYK", (72, 66), (0, 255, 255, 0)).save(p)
    good[str(p)] = (72, 66)

    p = d / "gray16.png"
    Image.fromarray(np.full((64, 96), 32896, dtype=np.uint16)).save(p)
    good[str(p)] = (96, 64)

    p = d / "palette.png"
    _rgb(64, 64, 2).convert("P").save(p)
    good[str(p)] = (64, 64)

    p = d / "alpha.png"
    Image.new("RGBA", (64, 80), (10, 20, 30, 0)).save(p)
    good[str(p)] = (64, 80)

    p = d / "rotated.jpg"
    _rgb(96, 64, 3).save(p, exif=_exif_orientation(6))
    good[str(p)] = (64, 96)  # orientation 6: width and height swap

    p = d / "truncated.png"
    _rgb(128, 128, 4).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    bad[str(p)] = "truncated or corrupt"

    p = d / "empty.png"
    p.write_bytes(b"")
    bad[str(p)] = "empty file"

    p = d / "notes.jpg"
    p.write_text("this is a caption, not a picture\n")
    bad[str(p)] = "not an image"

    p = d / "tiny.png"
    _rgb(16, 16).save(p)
    bad[str(p)] = "too small"

    p = d / "bomb.png"  # header declares 20000 x 20000 (400 Mpx > 268 Mpx limit)
    p.write_bytes(_png_bytes(20000, 20000, 1, 0, b"\0" * 16))
    bad[str(p)] = "decompression bomb"

    p = d / "bigger_bomb.png"  # beyond twice the limit: PIL itself raises
    p.write_bytes(_png_bytes(40000, 40000, 1, 0, b"\0" * 16))
    bad[str(p)] = "decompression bomb"
    return good, bad


# ---------------------------------------------------------------------------------------------
# scanning


def test_scan_reports_every_bad_file_and_keeps_every_good_one(tmp_path: Path) -> None:
    good, bad = _write_bad_data_set(tmp_path)
    paths = sorted(list(good) + list(bad))
    report = im.scan_images(paths, min_size=32)

    assert sorted(report.good) == sorted(good)
    assert report.sizes == good
    got = dict(report.bad)
    assert set(got) == set(bad)
    for path, keyword in bad.items():
        assert keyword in got[path], (path, got[path])
    # input order is kept for the good paths
    assert report.good == [p for p in paths if p in good]


def test_raise_if_bad_lists_every_file_and_names_the_option(tmp_path: Path) -> None:
    good, bad = _write_bad_data_set(tmp_path)
    report = im.scan_images(list(good) + list(bad), min_size=32)
    with pytest.raises(UserError) as info:
        report.raise_if_bad(skip_bad=False)
    message = str(info.value)
    assert "--skip_bad_images" in message
    for path, reason in report.bad:
        assert f"{path}: {reason}" in message.splitlines()[1 + report.bad.index((path, reason))]


def test_raise_if_bad_with_skip_logs_and_returns(tmp_path: Path, caplog) -> None:
    good, bad = _write_bad_data_set(tmp_path)
    report = im.scan_images(list(good) + list(bad), min_size=32)
    with caplog.at_level(logging.WARNING, logger=im.__name__):
        report.raise_if_bad(skip_bad=True)
    for path in bad:
        assert path in caplog.text


def test_threaded_scan_gives_the_same_report(tmp_path: Path) -> None:
    good, bad = _write_bad_data_set(tmp_path)
    paths = sorted(list(good) + list(bad))
    serial = im.scan_images(paths, min_size=32)
    threaded = im.scan_images(paths, min_size=32, num_workers=4)
    assert threaded == serial


def test_clean_report_does_not_raise(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    _rgb(40, 40).save(p)
    report = im.scan_images([p], min_size=None)
    report.raise_if_bad(skip_bad=False)
    assert report.good == [str(p)] and report.bad == []


def test_lowered_pixel_limit_turns_a_normal_image_into_a_bomb(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    _rgb(64, 64).save(p)
    report = im.scan_images([p], max_pixels=1000)
    assert report.good == []
    assert "decompression bomb" in report.bad[0][1]
    with pytest.raises(im.ImageLoadError, match="decompression bomb"):
        im.load_image(p, max_pixels=1000)
    with pytest.raises(im.ImageLoadError, match="decompression bomb"):
        im.image_size(p, max_pixels=1000)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    report = im.scan_images([tmp_path / "gone.png"])
    assert report.bad and "cannot read file" in report.bad[0][1]


# ---------------------------------------------------------------------------------------------
# loading and colour conversion


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "x.jpg"
    p.write_text("hello")
    with pytest.raises(UserError) as info:
        im.load_image(p)
    assert str(p) in str(info.value)


def test_exif_orientation_swaps_size(tmp_path: Path) -> None:
    p = tmp_path / "r.jpg"
    src = _rgb(96, 64)
    src.save(p, exif=_exif_orientation(6), quality=100)
    img = im.load_image(p)
    assert img.mode == "RGB" and img.size == (64, 96)
    assert im.image_size(p) == (64, 96)


def test_image_size_finds_png_exif_after_pixel_data_without_decoding(tmp_path: Path) -> None:
    # The IDAT payload is not zlib data: decoding would fail, so a right answer proves that
    # only chunk headers were read.
    sig = b"\x89PNG\r\n\x1a\n"
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30, 20, 8, 2, 0, 0, 0))
    data = (sig + ihdr + _png_chunk(b"IDAT", b"garbage!")
            + _png_chunk(b"eXIf", _exif_orientation(8)) + _png_chunk(b"IEND", b""))
    p = tmp_path / "late_exif.png"
    p.write_bytes(data)
    assert im.image_size(p) == (20, 30)
    assert "truncated or corrupt" in im.scan_images([p]).bad[0][1]


def test_png_exif_orientation_is_applied_on_load(tmp_path: Path) -> None:
    p = tmp_path / "o.png"
    _rgb(30, 20).save(p, exif=_exif_orientation(6))
    assert im.image_size(p) == (20, 30)
    assert im.load_image(p).size == (20, 30)


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    p = tmp_path / "c.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=100)  # red
    r, g, b = np.asarray(im.load_image(p))[8, 8].tolist()
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    p = tmp_path / "g16.png"
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(p)
    assert Image.open(p).mode.startswith("I")
    arr = np.asarray(im.load_image(p))
    assert arr.shape == (1, 4, 3)
    assert arr[0, :, 0].tolist() == [0, 64, 128, 255]


def test_sixteen_bit_rgb_png(tmp_path: Path) -> None:
    pix = np.array([[[65535, 0, 257 * 100], [0, 65535, 0]]], dtype=">u2")
    raw = b"\0" + pix[0].tobytes()
    p = tmp_path / "rgb16.png"
    p.write_bytes(_png_bytes(2, 1, 16, 2, raw))
    arr = np.asarray(im.load_image(p))
    assert arr.tolist() == [[[255, 0, 100], [0, 255, 0]]]


def test_palette_with_transparency_is_composited(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    p = tmp_path / "pal.png"
    img.save(p, transparency=0)
    arr = np.asarray(im.load_image(p))
    assert arr[0, 0].tolist() == [255, 255, 255]  # transparent index -> white
    assert arr[1, 1].tolist() == [200, 0, 0]


def test_rgba_composited_on_white_or_kept(tmp_path: Path) -> None:
    a = np.zeros((2, 2, 4), dtype=np.uint8)
    a[0, 0] = [0, 0, 0, 0]  # fully transparent black
    a[0, 1] = [0, 0, 0, 255]  # opaque black
    a[1, 0] = [0, 0, 0, 128]  # half transparent black
    p = tmp_path / "a.png"
    Image.fromarray(a, "RGBA").save(p)
    rgb = np.asarray(im.load_image(p))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [0, 0, 0]
    assert 120 <= rgb[1, 0, 0] <= 130
    rgba = im.load_image(p, keep_alpha=True)
    assert rgba.mode == "RGBA"
    assert np.asarray(rgba)[:, :, 3].tolist() == [[0, 255], [128, 0]]
    rgb_arr, mask = im.split_alpha(np.asarray(rgba))
    assert rgb_arr.shape == (2, 2, 3) and mask.dtype == np.float32 and mask[0, 1] == 1.0


def test_keep_alpha_on_opaque_image_gives_full_alpha(tmp_path: Path) -> None:
    p = tmp_path / "o.jpg"
    _rgb(8, 8).save(p)
    rgba = im.load_image(p, keep_alpha=True)
    assert rgba.mode == "RGBA" and np.asarray(rgba)[:, :, 3].min() == 255


def test_grayscale_and_la(tmp_path: Path) -> None:
    p = tmp_path / "l.png"
    Image.new("L", (3, 3), 77).save(p)
    assert np.asarray(im.load_image(p))[0, 0].tolist() == [77, 77, 77]
    p = tmp_path / "la.png"
    Image.new("LA", (3, 3), (0, 0)).save(p)
    assert np.asarray(im.load_image(p))[0, 0].tolist() == [255, 255, 255]


# ---------------------------------------------------------------------------------------------
# extensions, resizing, tensors, fingerprints


def test_image_extensions_any_case() -> None:
    for ext in (".png", ".JPG", ".Jpeg", ".webp", ".BMP"):
        assert ext in im.IMAGE_EXTENSIONS
    assert ".gif" not in im.IMAGE_EXTENSIONS and ".txt" not in im.IMAGE_EXTENSIONS
    assert im.is_image_path("/x/y/Z.PnG") and not im.is_image_path("a.caption")


def test_resize_and_crop_shapes_flip_and_filters() -> None:
    img = _rgb(100, 60)
    out = im.resize_and_crop(img, (80, 48), 8, 0, (64, 48))
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3) and out.flags["C_CONTIGUOUS"]
    ref = np.asarray(img.resize((80, 48), Image.Resampling.BOX))[:, 8:72]
    assert np.array_equal(out, ref)  # default downscale = area (box)
    flipped = im.resize_and_crop(img, (80, 48), 8, 0, (64, 48), flip=True)
    assert np.array_equal(flipped, out[:, ::-1])
    up = im.resize_and_crop(img, (200, 120), 0, 4, (200, 112))
    ref = np.asarray(img.resize((200, 120), Image.Resampling.LANCZOS))[4:116]
    assert np.array_equal(up, ref)  # default upscale = lanczos
    near = im.resize_and_crop(img, (50, 30), 0, 0, (50, 30), interpolation="nearest")
    assert np.array_equal(near, np.asarray(img.resize((50, 30), Image.Resampling.NEAREST)))
    same = im.resize_and_crop(img, (100, 60), 0, 0, (100, 60))
    assert np.array_equal(same, np.asarray(img))


def test_resize_and_crop_keeps_mask_aligned() -> None:
    rgba = Image.new("RGBA", (40, 40), (1, 2, 3, 255))
    mask = rgba.getchannel("A")
    args = ((32, 32), 0, 0, (32, 32), True, None)
    assert im.resize_and_crop(rgba, *args).shape == (32, 32, 4)
    assert im.resize_and_crop(mask, *args).shape == (32, 32)


def test_resize_and_crop_rejects_bad_arguments() -> None:
    img = _rgb(10, 10)
    with pytest.raises(ValueError):
        im.resize_and_crop(img, (10, 10), 4, 0, (8, 8))
    with pytest.raises(UserError, match="resize_interpolation"):
        im.resize_and_crop(img, (5, 5), 0, 0, (5, 5), interpolation="sinc")
    for name in ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "AREA"):
        assert im.validate_interpolation(name) == name.lower()


def test_to_tensor_range_and_layout() -> None:
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[0, 1] = [255, 0, 255, 7]
    t = im.to_tensor(arr)
    assert t.dtype == torch.float32 and t.shape == (3, 2, 3)
    assert t[:, 0, 1].tolist() == [1.0, -1.0, 1.0]
    assert float(t.min()) == -1.0
    with pytest.raises(ValueError):
        im.to_tensor(np.zeros((2, 2), dtype=np.uint8))


def test_file_fingerprint_tracks_edits(tmp_path: Path) -> None:
    p = tmp_path / "f.png"
    p.write_bytes(b"abc")
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    cheap = im.file_fingerprint(p)
    strong = im.file_fingerprint(p, content_hash=True)
    assert cheap.startswith("stat:") and strong.startswith("sha256:")
    os.utime(p, ns=(2_000_000_000, 2_000_000_000))  # touched, same bytes
    assert im.file_fingerprint(p) != cheap
    assert im.file_fingerprint(p, content_hash=True) == strong
    p.write_bytes(b"abd")
    assert im.file_fingerprint(p, content_hash=True) != strong
