import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.train.config import DatasetConfig, TrainingConfig
from lorafuse.train.data import (
    BucketBatchSampler,
    SampleKey,
    TrainDataset,
    collate_batch,
    describe,
    epoch_batches,
    steps_per_epoch,
)
from lorafuse.train.dataset_folders import parse_subset_folder
from lorafuse.train.scan import scan_dataset
from lorafuse.world.dataset import write_subject_dataset


@pytest.fixture
def subject(tmp_path) -> Path:
    """tmp/ds/10_sks robot/ with 3 captioned 64x64 images, plus the world's references/ folder."""
    write_subject_dataset("robot_09", tmp_path / "ds", n=3, repeats=10)
    return tmp_path / "ds"


def _cfg(root: Path, **kw) -> DatasetConfig:
    return DatasetConfig(train_data_dir=root, resolution=64, **kw)


def _image(path: Path, size: tuple[int, int], seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_steps_per_epoch_matches_the_formula(subject):
    # A second folder with other repeats: 3 x 10 + 2 x 5 = 40 samples.
    extra = subject / "5_sks robot"
    extra.mkdir()
    for name in ("000", "001"):
        shutil.copy(subject / "10_sks robot" / f"{name}.png", extra / f"{name}.png")
    index = scan_dataset(_cfg(subject))
    images_x_repeats = sum(
        len(list(folder.glob("*.png"))) * int(folder.name.split("_")[0])
        for folder in subject.glob("[0-9]*_*")
    )
    assert index.num_train_samples == images_x_repeats == 40
    for batch in (1, 3, 4, 7):
        assert index.steps_per_epoch(batch) == math.ceil(images_x_repeats / batch)
        assert len(epoch_batches(index, batch, seed=0, epoch=0)) == index.steps_per_epoch(batch)
    # Seed 002: 20 images x 100 repeats, batch 2 -> 1000 steps per epoch.
    assert steps_per_epoch(20 * 100, 2) == 1000
    text = describe(index, TrainingConfig(train_batch_size=4, max_train_epochs=3))
    assert "num train images * repeats: 40" in text and "num batches per epoch: 10" in text
    assert "total optimization steps: 30" in text


def test_buckets_never_mix_and_steps_sum_per_bucket(tmp_path):
    for k in range(3):
        _image(tmp_path / "d" / "2_sks cat" / f"w{k}.png", (96, 64), k)  # wide
    for k in range(2):
        _image(tmp_path / "d" / "2_sks cat" / f"t{k}.png", (64, 96), k)  # tall
    index = scan_dataset(
        _cfg(
            tmp_path / "d", enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16
        )
    )
    # Hand-computed from area 64² and step 16: 96x64 (1.5) -> 80x48 (1.67), 64x96 (0.67) -> 48x80 (0.6).
    assert index.bucket_counts() == {(48, 80): 4, (80, 48): 6}
    assert (
        index.steps_per_epoch(4) == 1 + 2 == steps_per_epoch([4, 6], 4)
    )  # ceil(4/4) + ceil(6/4), not ceil(10/4)
    ds = TrainDataset(index, seed=0)
    for batch in epoch_batches(index, 4, seed=0, epoch=0):
        shapes = {ds[SampleKey(0, sid)]["pixel_values"].shape for sid in batch}
        assert len(shapes) == 1


def test_order_is_a_function_of_seed_and_epoch(subject):
    index = scan_dataset(_cfg(subject))
    e0 = epoch_batches(index, 4, seed=1, epoch=0)
    assert e0 == epoch_batches(index, 4, seed=1, epoch=0)
    assert e0 != epoch_batches(index, 4, seed=1, epoch=1) and e0 != epoch_batches(index, 4, seed=2, epoch=0)
    assert sorted(s for b in e0 for s in b) == list(range(30))  # every sample exactly once
    sampler = BucketBatchSampler(index, 4, seed=1)
    sampler.set_epoch(0, skip_batches=3)  # resume after 3 batches: the rest, unchanged
    assert [[k.sample for k in b] for b in sampler] == e0[3:] and len(sampler) == len(e0) - 3


def test_dataset_items_are_deterministic_and_flip_is_a_mirror(subject):
    index = scan_dataset(_cfg(subject, flip_aug=True, shuffle_caption=True, keep_tokens=1))
    ds, plain = TrainDataset(index, seed=3), TrainDataset(scan_dataset(_cfg(subject)), seed=3)
    flipped = 0
    for sid in range(len(ds)):
        a, b = ds[SampleKey(2, sid)], ds[SampleKey(2, sid)]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
        base = plain[SampleKey(2, sid)]["pixel_values"]
        if torch.equal(a["pixel_values"], base.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(a["pixel_values"], base)
        assert (
            a["caption"].split(", ")[0] == index.items[index.samples[sid]].caption.split(", ")[0]
        )  # keep_tokens=1
    assert 0 < flipped < len(ds)


def test_dataloader_batches(subject):
    index = scan_dataset(_cfg(subject, trigger="zzz"))
    sampler = BucketBatchSampler(index, 4, seed=0)
    loader = torch.utils.data.DataLoader(
        TrainDataset(index, seed=0), batch_sampler=sampler, collate_fn=collate_batch
    )
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["pixel_values"].abs().max() <= 1.0
    assert all(c.startswith("zzz, ") for c in batch["caption"]) and batch["loss_weight"].tolist() == [1.0] * 4
    assert len(loader) == 8


def test_missing_caption_falls_back_to_folder_tokens(subject, caplog):
    (subject / "10_sks robot" / "001.txt").unlink()
    with caplog.at_level(logging.WARNING):
        index = scan_dataset(_cfg(subject))
    assert index.items[1].caption == "sks robot"
    assert "1 of 3 images have no .txt caption, using 'sks robot'" in caplog.text
    assert "references" not in caplog.text  # the world dataset's own references/ (see the test below)


def test_reg_images_are_balanced_and_weighted(subject, tmp_path):
    for k in range(4):
        _image(tmp_path / "reg" / "1_robot" / f"{k}.png", (64, 64), k)
    index = scan_dataset(_cfg(subject, reg_data_dir=tmp_path / "reg", trigger="sks", prior_loss_weight=0.5))
    reg = [it for it in index.items if it.is_reg]
    assert [it.repeats for it in reg] == [8, 8, 7, 7]  # kohya: cycle until they match the 30 train samples
    assert index.num_reg_samples == index.num_train_samples == 30
    assert all(it.caption == "robot" for it in reg)  # no trigger injected into the class prior
    ds = TrainDataset(index, seed=0)
    weights = {ds[SampleKey(0, s)]["loss_weight"] for s in range(len(ds))}
    assert weights == {1.0, 0.5}


def test_folder_and_dataset_errors(tmp_path):
    with pytest.raises(UserInputError, match=r"10sks dog: folder name must be '<repeats>_<trigger> <class>'"):
        parse_subset_folder(Path("data/10sks dog"))
    with pytest.raises(UserInputError, match="repeats >= 1"):
        parse_subset_folder(Path("0_sks dog"))
    _image(tmp_path / "d" / "10sks dog" / "a.png", (64, 64))
    with pytest.raises(UserInputError, match="10sks dog"):
        scan_dataset(_cfg(tmp_path / "d"))
    with pytest.raises(UserInputError, match="does not exist"):
        scan_dataset(_cfg(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no usable training images"):
        scan_dataset(_cfg(tmp_path / "empty"))
    _image(tmp_path / "flat" / "a.png", (64, 64))
    with pytest.raises(UserInputError, match="holds images directly"):
        scan_dataset(_cfg(tmp_path / "flat"))


def test_bad_image_fails_or_is_skipped(subject, caplog):
    bad = subject / "10_sks robot" / "bad.png"
    good = (subject / "10_sks robot" / "000.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated: the header reads, decoding fails
    with pytest.raises(UserInputError, match=r"bad\.png: cannot use this image"):
        scan_dataset(_cfg(subject))
    with caplog.at_level(logging.WARNING):
        index = scan_dataset(_cfg(subject, on_bad_image="skip"))
    assert len(index.items) == 3 and index.skipped[0][0] == bad and "bad.png: skipped" in caplog.text


def test_a_world_datasets_references_are_skipped_quietly_any_other_folder_is_named(tmp_path, caplog):
    """references/ beside a `lorafuse world dataset` folder holds clean renders for the oracle, not data: no
    warning for it (the demo's own datasets printed two). A user's folder without a repeats prefix is named."""
    write_subject_dataset("robot_09", tmp_path / "ds", n=2, repeats=1)
    with caplog.at_level(logging.WARNING, logger="lorafuse"):
        index = scan_dataset(_cfg(tmp_path / "ds"))
    assert index.num_train_samples == 2 and caplog.records == []
    shutil.copytree(tmp_path / "ds", tmp_path / "mine")
    (tmp_path / "mine" / "world_dataset.json").unlink()  # a user's own folder that happens to be called references
    with caplog.at_level(logging.WARNING, logger="lorafuse"):
        scan_dataset(_cfg(tmp_path / "mine"))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [str(tmp_path / "mine" / "references")]
