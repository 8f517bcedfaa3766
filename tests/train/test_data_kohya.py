"""Data features kohya users rely on: EXIF orientation before bucketing, "W,H" resolutions, alpha masks."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lorafuse.train.config import DatasetConfig
from lorafuse.train.data import image_tensor
from lorafuse.train.images import load_rgb
from lorafuse.train.scan import scan_dataset


def _sideways_jpeg(path, width=128, height=64):
    """A landscape JPEG as a phone stores a portrait photo: pixels sideways plus EXIF Orientation = 6
    ("rotate 90° clockwise to view"). Stored left half red, right half blue -> upright: red on top."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(arr).save(path, quality=95, exif=exif)


def test_exif_orientation_6_is_applied_before_bucketing(tmp_path):
    folder = tmp_path / "ds" / "1_sks photo"
    folder.mkdir(parents=True)
    _sideways_jpeg(folder / "phone.jpg")
    with Image.open(folder / "phone.jpg") as raw:
        assert raw.size == (128, 64)  # the file really is stored sideways
    upright = load_rgb(folder / "phone.jpg")
    assert upright.size == (64, 128)
    top, bottom = np.asarray(upright)[8, 32], np.asarray(upright)[-8, 32]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60

    cfg = DatasetConfig(
        train_data_dir=tmp_path / "ds",
        resolution=64,
        enable_bucket=True,
        min_bucket_reso=32,
        max_bucket_reso=128,
        bucket_reso_steps=32,
    )
    (item,) = scan_dataset(cfg).items
    assert item.size == (64, 128)
    w, h = item.assignment.bucket
    assert h > w  # a portrait bucket, as the photo is seen
    pixels, _ = image_tensor(item, flip=False, crop_rng=None)  # (3, H, W) in [-1, 1]
    assert pixels[0, 2, w // 2] > 0.6 and pixels[2, -3, w // 2] > 0.6  # red on top, blue at the bottom


def test_width_height_resolution_without_buckets(tmp_path):
    from lorafuse.train.config import load_train_config

    folder = tmp_path / "ds" / "2_sks thing"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((100, 100, 3), 128, np.uint8)).save(folder / "a.png")
    over = {
        "model.pretrained_model_name_or_path": "world-random",
        "dataset.train_data_dir": str(tmp_path / "ds"),
        "dataset.resolution": "64,32",  # kohya's "W,H" string, as --resolution 64,32 passes it
    }
    cfg = load_train_config(None, over).dataset
    assert cfg.resolution == (64, 32) and cfg.size == (64, 32)
    (item,) = scan_dataset(cfg).items
    assert item.assignment.bucket == (64, 32)
    pixels, _ = image_tensor(item, flip=False, crop_rng=None)
    assert tuple(pixels.shape) == (3, 32, 64)


def test_width_height_resolution_sets_the_bucket_area():
    from lorafuse.train.buckets import BucketManager, BucketSpec, make_bucket_resolutions

    wide = make_bucket_resolutions((768, 512), 256, 1024, 64)
    assert max(w * h for w, h in wide) <= 768 * 512 < max(w * h for w, h in make_bucket_resolutions(640))
    assert (576, 576) in wide and (
        640,
        640,
    ) not in wide  # the square bucket: sqrt(768*512) rounded down to 64
    manager = BucketManager(BucketSpec((768, 512), enable=True))
    assert manager.assign((1500, 1000)).bucket in wide


def test_width_height_resolution_errors():
    import pytest

    from lorafuse.errors import ConfigError

    with pytest.raises(ConfigError, match="resolution: must be a positive multiple of 8"):
        DatasetConfig(train_data_dir="d", resolution=(512, 500))
    with pytest.raises(ConfigError, match=r"must lie in \[min_bucket_reso, max_bucket_reso\]"):
        DatasetConfig(train_data_dir="d", resolution=(512, 2048), enable_bucket=True)


def _images(folder, n, size=(64, 64), caption=None):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        if caption is not None:
            (folder / f"{i}.txt").write_text(caption)


def test_subsets_have_their_own_repeats_tokens_and_settings(tmp_path):
    from lorafuse.train.config_subsets import SubsetConfig

    _images(tmp_path / "paint", 2)
    _images(tmp_path / "sketch", 1, size=(128, 64), caption="a sketch, lines")
    _images(tmp_path / "reg", 5)
    cfg = DatasetConfig(
        resolution=64,
        keep_tokens=1,
        trigger="zkz",
        subsets=(
            SubsetConfig(tmp_path / "paint", num_repeats=3, class_tokens="zkz painting"),
            SubsetConfig(
                tmp_path / "sketch", num_repeats=2, flip_aug=True, keep_tokens=2, resolution=(64, 32)
            ),
            SubsetConfig(tmp_path / "reg", class_tokens="painting", is_reg=True),
        ),
    )
    index = scan_dataset(cfg)
    paint = [it for it in index.items if it.path.parent.name == "paint"]
    (sketch,) = [it for it in index.items if it.path.parent.name == "sketch"]
    reg = [it for it in index.items if it.is_reg]
    assert [it.repeats for it in paint] == [3, 3] and {it.caption for it in paint} == {"zkz painting"}
    assert (
        sketch.repeats == 2 and sketch.caption == "zkz, a sketch, lines"
    )  # trigger injected, caption file read
    assert sketch.assignment.bucket == (64, 32)  # the subset's own resolution
    assert {it.caption for it in reg} == {"painting"}  # no trigger on reg images
    assert (
        index.num_train_samples == 8 and index.num_reg_samples == 8
    )  # kohya's balancing: 5 x 1, then +1 each
    assert index.augments[sketch.subset].flip_aug and index.augments[sketch.subset].keep_tokens == 2
    assert not index.augments[paint[0].subset].flip_aug and index.augments[paint[0].subset].keep_tokens == 1


def test_subset_errors(tmp_path):
    import pytest

    from lorafuse.errors import UserInputError
    from lorafuse.train.config_subsets import SubsetConfig

    with pytest.raises(UserInputError, match=r"subsets\[0\] .*image_dir does not exist"):
        scan_dataset(DatasetConfig(subsets=(SubsetConfig(tmp_path / "nope"),)))
    _images(tmp_path / "bare", 1)
    with pytest.raises(UserInputError, match="no .txt caption file, and its subset sets no class_tokens"):
        scan_dataset(DatasetConfig(subsets=(SubsetConfig(tmp_path / "bare"),)))
    from lorafuse.errors import ConfigError

    with pytest.raises(ConfigError, match="train_data_dir: is not set, and there are no"):
        DatasetConfig()


def test_save_rotation_keeps_kohyas_last_n(tmp_path):
    from lorafuse.train.saving import SaveRotation

    rot = SaveRotation(last_n_epochs=2, last_n_steps=25)
    files = []
    for epoch in range(1, 5):
        files.append(tmp_path / f"e{epoch}.safetensors")
        files[-1].write_bytes(b"x")
        rot.add_epoch(epoch, files[-1])
    assert [p.exists() for p in files] == [False, False, True, True]
    steps = []
    for step in (10, 20, 30, 40, 50):
        steps.append(tmp_path / f"s{step}")
        steps[-1].mkdir()  # a state folder
        removed = rot.add_step(step, steps[-1])
    assert removed == [tmp_path / "s20"]
    assert [p.exists() for p in steps] == [False, False, True, True, True]  # steps within the last 25 remain
