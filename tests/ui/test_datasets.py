"""The Dataset tab's calls: `lorafuse dataset` API on workspace paths; what it writes is what training reads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.train.dataset_folders import check_image, subset_name
from lorafuse.ui import datasets
from lorafuse.ui.workspace import Workspace


def test_uploads_become_a_kohya_subset_that_training_reads(tmp_path):
    from lorafuse.train.config import DatasetConfig
    from lorafuse.train.scan import scan_dataset

    ws = Workspace.create(tmp_path / "ws")
    files = []
    for k, size in enumerate([(64, 64), (96, 64)]):
        path = tmp_path / f"up{k}.jpeg"
        Image.fromarray(np.full((size[1], size[0], 3), 40 * k, np.uint8)).save(path, format="JPEG")
        files.append(str(path))
    folder, command = datasets.add_uploads(ws, "dog", files, trigger="sks", cls="dog", repeats=3, max_bytes=1 << 20)
    assert folder == ws.root / "datasets" / "dog" / "3_sks dog"
    assert command == "lorafuse dataset add datasets/dog up0.jpeg up1.jpeg --trigger sks --class dog --repeats 3 --max-mb 1"
    rows = datasets.caption_rows(ws, "datasets/dog")
    assert rows == [["datasets/dog/3_sks dog/up0.jpg", "a photo of a sks dog"],
                    ["datasets/dog/3_sks dog/up1.jpg", "a photo of a sks dog"]]  # fmt: skip
    rows[1][1] = "a photo of a sks dog, running"
    assert datasets.save_captions(ws, rows)[0] == 2
    assert (folder / "up1.txt").read_text() == "a photo of a sks dog, running\n"
    index = scan_dataset(DatasetConfig(train_data_dir=ws.root / "datasets" / "dog", resolution=64))
    assert index.num_train_samples == 6  # 2 images x 3 repeats
    photos = ws.resolve("photos")  # a folder already in the workspace, added beside the uploads
    photos.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(photos / "up0.png")
    folder, command = datasets.add_uploads(ws, "dog", [], trigger="sks", cls="dog", repeats=3, max_bytes=1 << 20,
                                           folder="photos")  # fmt: skip
    assert (folder / "up0-1.png").is_file() and command.startswith("lorafuse dataset add datasets/dog photos --trigger")
    with pytest.raises(UserInputError, match="'..' is refused"):
        datasets.add_uploads(ws, "dog", [], trigger="sks", cls="dog", repeats=3, max_bytes=1, folder="../x")
    new, command = datasets.set_subset(ws, "datasets/dog", "3_sks dog", trigger="ohwx", cls="", repeats=5)
    assert new == "5_ohwx dog" and command == "lorafuse dataset subset datasets/dog '3_sks dog' --trigger ohwx --repeats 5"
    assert datasets.subsets(ws, "datasets/dog") == ["5_ohwx dog"]


def test_the_dataset_api_knows_the_image_types_training_reads():
    from lorafuse.train.data import IMAGE_EXTENSIONS
    from lorafuse.train.dataset_folders import IMAGE_EXTENSIONS as ours

    assert IMAGE_EXTENSIONS is ours


def test_bad_names_and_paths_are_refused(tmp_path):
    ws = Workspace.create(tmp_path / "ws")
    with pytest.raises(UserInputError, match="repeats must be >= 1"):
        subset_name(0, "sks", "dog")
    with pytest.raises(UserInputError, match="trigger"):
        subset_name(1, "sks/../x", "dog")
    with pytest.raises(UserInputError, match="'..' is refused"):
        datasets.save_captions(ws, [["../outside.png", "x"]])
    with pytest.raises(UserInputError, match="'..' is refused"):
        datasets.add_uploads(ws, "../x", ["a.png"], trigger="sks", cls="dog", repeats=1, max_bytes=10)
    with pytest.raises(UserInputError, match="'..' is refused"):
        datasets.set_subset(ws, "datasets", "../x", trigger="a", cls="b", repeats=1)


def test_upload_checks(tmp_path):
    good = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    assert check_image(good) == "PNG"
    with pytest.raises(UserInputError, match="a.png: .* bytes is over the limit of 10 bytes"):
        check_image(good, max_bytes=10)
    fake = tmp_path / "b.png"
    fake.write_bytes(b"#!/bin/sh\necho not an image\n")
    with pytest.raises(UserInputError, match="b.png: not an image"):
        check_image(fake)
    gif = tmp_path / "c.gif"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(gif)
    with pytest.raises(UserInputError, match="image type GIF is not accepted"):
        check_image(gif)
