import numpy as np
import pytest

from lorafuse.train.buckets import BucketManager, BucketSpec, crop_offset, make_bucket_resolutions


def test_bucket_resolutions_kohya_512():
    resos = make_bucket_resolutions(512, 256, 1024, 64)
    # Hand-computed: for width w the height is min(1024, floor(512² / w / 64) * 64), and the transpose.
    for pair in [
        (512, 512),
        (448, 576),
        (384, 640),
        (320, 768),
        (256, 1024),
        (576, 448),
        (640, 384),
        (1024, 256),
    ]:
        assert pair in resos
    assert (512, 576) not in resos and (704, 384) not in resos  # 704 * 384 > 512²
    for w, h in resos:
        assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024


def test_assign_closest_aspect_ratio_then_cover_and_center_crop():
    manager = BucketManager(BucketSpec(512, enable=True))
    # 600x400 has aspect 1.5: 640x384 (1.667) is closer than 576x448 (1.286). Cover: scale 640/600 -> 640x427.
    a = manager.assign((600, 400))
    assert a.bucket == (640, 384) and a.resized == (640, 427)
    assert crop_offset(a.resized, a.bucket, None) == (0, 21)  # (427 - 384) // 2
    # 300x1000 has aspect 0.3: 256x832 (0.308) beats 256x896 (0.286); narrower than the bucket, so match widths:
    # scale 256/300 -> 256x853.
    tall = manager.assign((300, 1000))
    assert tall.bucket == (256, 832) and tall.resized == (256, 853)


def test_without_buckets_everything_is_covered_to_a_square():
    a = BucketManager(BucketSpec(64)).assign((100, 50))
    assert a.bucket == (64, 64) and a.resized == (128, 64)


def test_no_upscale_keeps_small_and_shrinks_large_to_the_max_area():
    manager = BucketManager(BucketSpec(512, enable=True, no_upscale=True))
    small = manager.assign((300, 200))
    assert small.resized == (300, 200) and small.bucket == (256, 192)
    # 2000x1000: sqrt(512² * 2) = 724 -> rounding the height (362 -> 320) keeps ratio 2 exactly: 640x320.
    large = manager.assign((2000, 1000))
    assert large.resized == (640, 320) and large.bucket == (640, 320)
    with pytest.raises(ValueError, match="smaller than bucket_reso_steps"):
        manager.assign((40, 300))


def test_random_crop_offsets_stay_inside():
    rng = np.random.default_rng(0)
    offsets = {crop_offset((640, 427), (640, 384), rng) for _ in range(200)}
    assert all(left == 0 and 0 <= top <= 43 for left, top in offsets) and len(offsets) > 20
