"""Bucket set, assignment, bucket_no_upscale, fixed resolution, crop plans and batching."""

from __future__ import annotations

import random

import pytest

from library.data.buckets import (
    BucketManager,
    bucket_batches,
    bucket_summary,
    check_bucket_reso_steps,
    closest_bucket,
    crop_for,
    make_bucket_resolutions,
    max_bucket_warning,
    resized_size,
)
from library.errors import UserError


def test_sdxl_bucket_set_with_max_2048():
    buckets = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert len(buckets) == 41
    assert buckets == sorted(buckets)
    for expected in [(1024, 1024), (1088, 960), (1152, 896), (1216, 832), (1344, 768),
                     (832, 1216), (2048, 256), (256, 2048)]:
        assert expected in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert 256 <= width <= 2048 and 256 <= height <= 2048
        assert width * height <= 1024 * 1024


def test_default_max_1024_clips_every_non_square_bucket():
    buckets = make_bucket_resolutions((1024, 1024), 256, 1024, 64)
    assert len(buckets) == 25
    assert all(max(b) == 1024 for b in buckets)
    assert (1024, 576) in buckets and (1216, 832) not in buckets


def test_square_bucket_is_largest_step_multiple_of_area():
    # sqrt(1000*1000) = 1000 -> 960 with step 64; 992 with step 32.
    assert (960, 960) in make_bucket_resolutions((1000, 1000), 256, 2048, 64)
    assert (992, 992) in make_bucket_resolutions((1000, 1000), 256, 2048, 32)


@pytest.mark.parametrize("step", [32, 64, 96, 128])
def test_step_multiple_of_32_accepted(step):
    check_bucket_reso_steps(step)


@pytest.mark.parametrize("step", [16, 48, 8, 0, -32])
def test_step_not_multiple_of_32_rejected(step):
    with pytest.raises(UserError, match="bucket_reso_steps"):
        check_bucket_reso_steps(step)
    with pytest.raises(UserError):
        BucketManager((1024, 1024), step=step)


def test_exact_size_match_keeps_image_size():
    manager = BucketManager((1024, 1024), max_size=2048)
    got = manager.assign((1216, 832))
    assert got.bucket == (1216, 832) and got.resized_size == (1216, 832) and got.ar_error == 0


def test_assignment_closest_aspect_ratio_and_cover_resize():
    manager = BucketManager((1024, 1024), max_size=2048)
    got = manager.assign((1920, 1080))  # 16:9 = 1.778; 1344x768 = 1.75 is closest
    assert got.bucket == (1344, 768)
    assert got.resized_size == (1365, 768)  # wider than the bucket: match height
    assert got.ar_error == pytest.approx(abs(1344 / 768 - 1920 / 1080))
    tall = manager.assign((500, 700))  # AR 0.714 -> 832x1216 (0.684)
    assert tall.bucket == (832, 1216)
    # 500/700 > 832/1216: the image is relatively wider, so the height is matched (868.6 -> 869)
    assert tall.resized_size == (869, 1216)
    buckets = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    best, err = closest_bucket((500, 700), buckets)
    assert all(abs(b[0] / b[1] - 500 / 700) >= err for b in buckets) and best == (832, 1216)


def test_resized_size_covers_bucket():
    for image in [(3000, 2000), (640, 480), (1023, 1025), (4000, 999), (999, 4000)]:
        for bucket in [(1024, 1024), (1216, 832), (832, 1216), (2048, 512)]:
            width, height = resized_size(image, bucket)
            assert width >= bucket[0] and height >= bucket[1]
            assert width == bucket[0] or height == bucket[1]


def test_small_image_is_upscaled_by_default():
    got = BucketManager((1024, 1024), max_size=2048).assign((512, 512))
    assert got.bucket == (1024, 1024) and got.resized_size == (1024, 1024)


def test_bucket_no_upscale_keeps_small_images_and_floors_to_step():
    manager = BucketManager((1024, 1024), no_upscale=True)
    got = manager.assign((500, 700))
    assert got.resized_size == (500, 700)
    assert got.bucket == (448, 640)
    assert manager.buckets == [(448, 640)]


def test_bucket_no_upscale_shrinks_large_images_to_max_area():
    manager = BucketManager((1024, 1024), no_upscale=True, step=64)
    got = manager.assign((3000, 2000))
    width, height = got.resized_size
    assert abs(width * height - 1024 * 1024) < 0.03 * 1024 * 1024
    assert width % 64 == 0 or height % 64 == 0
    assert got.bucket[0] <= width and got.bucket[1] <= height
    assert got.bucket[0] % 64 == 0 and got.bucket[1] % 64 == 0
    assert got.bucket == (1216, 832)


def test_bucket_no_upscale_tiny_image_rejected():
    with pytest.raises(UserError, match="tiny.png"):
        BucketManager((1024, 1024), no_upscale=True).assign((20, 500), path="tiny.png")


def test_fixed_resolution_mode_resizes_to_cover_then_crops():
    # Without buckets every image is resized to cover the resolution, as sd-scripts' cache does.
    manager = BucketManager((1024, 1024), enable_bucket=False)
    assert manager.assign((1024, 1024)).resized_size == (1024, 1024)
    big = manager.assign((1500, 1200), path="big.png")
    assert big.bucket == (1024, 1024) and big.resized_size == (1280, 1024)
    small = manager.assign((800, 1200), path="small.png")  # smaller images are enlarged
    assert small.bucket == (1024, 1024) and small.resized_size == (1024, 1536)
    wide = BucketManager((1024, 768), enable_bucket=False).assign((640, 640))
    assert wide.bucket == (1024, 768) and wide.resized_size == (1024, 1024)
    plan = crop_for((800, 1200), small.bucket, random_crop=False, rng=None, resized=small.resized_size)
    assert (plan.left, plan.top) == (0, 256)


def test_center_crop_offsets_are_the_real_crop():
    # A tall image in a wide bucket is cropped vertically: left 0, top > 0 (sd-scripts'
    # letterbox offset would report the opposite, issue #1443).
    plan = crop_for((800, 1000), (1216, 832), random_crop=False, rng=None)
    assert plan.resized_size == (1216, 1520)
    assert (plan.left, plan.top) == (0, (1520 - 832) // 2)
    assert plan.crop_top_left == (344, 0)
    assert plan.crop_ltrb == (0, 344, 1216, 1176)


def test_random_crop_offsets_reproducible_and_in_range():
    plans = [crop_for((3000, 1000), (1024, 1024), True, random.Random(7)) for _ in range(2)]
    assert plans[0] == plans[1]
    lefts = {crop_for((3000, 1000), (1024, 1024), True, random.Random(s)).left for s in range(50)}
    assert len(lefts) > 10
    assert all(0 <= left <= 3072 - 1024 for left in lefts)
    assert crop_for((3000, 1000), (1024, 1024), True, random.Random(1)).top == 0


def test_flip_mirrors_left_offset():
    plan = crop_for((1500, 1000), (1024, 1024), True, random.Random(3), resized=(1536, 1024))
    flipped = crop_for((1500, 1000), (1024, 1024), True, random.Random(3), flip=True,
                       resized=(1536, 1024))
    assert flipped.flipped and flipped.top == plan.top
    assert flipped.left == 1536 - plan.left - 1024
    assert plan.flip().flip() == plan
    centre = crop_for((1500, 1000), (1024, 1024), False, None, resized=(1537, 1024))
    assert centre.left == 256 and centre.flip().left == 257


def test_crop_uses_assignment_resize():
    manager = BucketManager((1024, 1024), no_upscale=True)
    got = manager.assign((500, 700))
    plan = crop_for((500, 700), got.bucket, False, None, resized=got.resized_size)
    assert plan.resized_size == (500, 700) and (plan.left, plan.top) == (26, 30)


def test_max_bucket_warning():
    message = max_bucket_warning(1024, 1024, 64)
    assert message is not None and "2048" in message and "1024x576" in message
    assert max_bucket_warning((1024, 1024), 2048, 64) is None
    assert max_bucket_warning((1024, 768), 1024, 64) is not None


def test_bucket_batches_never_mix_buckets_and_are_reproducible():
    assignments = [(1024, 1024)] * 7 + [(1216, 832)] * 3 + [(832, 1216)] * 1
    batches = bucket_batches(assignments, 2, seed=42, epoch=1)
    assert sorted(i for batch in batches for i in batch) == list(range(11))
    for batch in batches:
        assert len({assignments[i] for i in batch}) == 1
        assert 1 <= len(batch) <= 2
    assert len(batches) == 4 + 2 + 1
    assert bucket_batches(assignments, 2, seed=42, epoch=1) == batches
    other_epochs = [bucket_batches(assignments, 2, seed=42, epoch=e) for e in range(2, 6)]
    assert any(b != batches for b in other_epochs)
    ordered = bucket_batches(assignments, 4, seed=0, epoch=0, shuffle=False)
    assert ordered == [[10], [0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # buckets in sorted order


def test_bucket_summary():
    manager = BucketManager((1024, 1024), max_size=2048)
    info = bucket_summary([manager.assign(s) for s in [(1024, 1024), (1024, 1024), (1920, 1080)]])
    counts = {tuple(v["resolution"]): v["count"] for v in info["buckets"].values()}
    assert counts == {(1024, 1024): 2, (1344, 768): 1}
    assert info["mean_img_ar_error"] > 0
