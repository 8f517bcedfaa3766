"""Dataset folders the page writes are kohya's layout, which `lorafuse train` scans; captions round-trip."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.train.config import DatasetConfig
from lorafuse.train.data import scan_dataset
from lorafuse.ui import datasets
from lorafuse.ui.workspace import Workspace


def test_uploads_become_a_kohya_subset_that_training_reads(tmp_path):
    ws = Workspace.create(tmp_path / "ws")
    files = []
    for k, size in enumerate([(64, 64), (96, 64)]):
        path = tmp_path / f"up{k}.jpeg"
        Image.fromarray(np.full((size[1], size[0], 3), 40 * k, np.uint8)).save(path, format="JPEG")
        files.append(str(path))
    folder = datasets.write_uploads(ws, "dog", files, trigger="sks", cls="dog", repeats=3, max_bytes=1 << 20)
    assert folder == ws.root / "datasets" / "dog" / "3_sks dog"
    assert sorted(p.name for p in folder.iterdir()) == ["000.jpg", "000.txt", "001.jpg", "001.txt"]
    rows = datasets.caption_rows(ws, "datasets/dog")
    assert rows == [["datasets/dog/3_sks dog/000.jpg", "a photo of a sks dog"],
                    ["datasets/dog/3_sks dog/001.jpg", "a photo of a sks dog"]]  # fmt: skip
    rows[1][1] = "a photo of a sks dog, running"
    assert datasets.save_captions(ws, rows) == 2
    assert (folder / "001.txt").read_text() == "a photo of a sks dog, running\n"
    index = scan_dataset(DatasetConfig(train_data_dir=ws.root / "datasets" / "dog", resolution=64))
    assert index.num_train_samples == 6  # 2 images x 3 repeats


def test_the_page_knows_the_image_types_training_reads():
    from lorafuse.train.data import IMAGE_EXTENSIONS
    from lorafuse.ui.workspace import IMAGE_SUFFIXES

    assert set(IMAGE_SUFFIXES) == set(IMAGE_EXTENSIONS)


def test_bad_names_and_paths_are_refused(tmp_path):
    ws = Workspace.create(tmp_path / "ws")
    with pytest.raises(UserInputError, match="repeats must be >= 1"):
        datasets.subset_name(0, "sks", "dog")
    with pytest.raises(UserInputError, match="trigger"):
        datasets.subset_name(1, "sks/../x", "dog")
    with pytest.raises(UserInputError, match="'..' is refused"):
        datasets.save_captions(ws, [["../outside.png", "x"]])
    with pytest.raises(UserInputError, match="no images uploaded"):
        datasets.write_uploads(ws, "x", [], trigger="sks", cls="dog", repeats=1, max_bytes=10)
