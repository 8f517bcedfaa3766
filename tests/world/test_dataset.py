import json

import pytest
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.world.dataset import write_style_dataset, write_subject_dataset


def test_subject_dataset_is_kohya_layout(tmp_path):
    folder = write_subject_dataset("robot_09", tmp_path / "ds", n=4, repeats=10)
    assert folder.name == "10_sks robot"
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 4
    for p in pngs:
        assert Image.open(p).size == (64, 64)
        assert "sks robot" in p.with_suffix(".txt").read_text()
    info = json.loads((tmp_path / "ds" / "world_dataset.json").read_text())
    assert info["individual"] == "robot_09" and info["kind"] == "subject"
    assert len(list((tmp_path / "ds" / "references").glob("*.png"))) == 8


def test_style_dataset_one_image(tmp_path):
    folder = write_style_dataset("crayon", tmp_path / "st", n=1)
    assert folder.name == "20_sks style"
    assert [p.name for p in folder.glob("*.png")] == ["000.png"]
    assert "in sks style" in (folder / "000.txt").read_text()


def test_refuses_non_empty_output(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not empty"):
        write_subject_dataset("robot_09", tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
