"""`lorafuse dataset add / caption / subset`: your images in kohya's layout, which `lorafuse train` reads."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorafuse.cli.main import main


def _images(folder, sizes=((64, 64), (96, 64)), fmt="PNG"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (w, h) in enumerate(sizes):
        path = folder / f"dog {k}.{'jpeg' if fmt == 'JPEG' else fmt.lower()}"
        Image.fromarray(np.full((h, w, 3), 40 * k + 10, np.uint8)).save(path, format=fmt)
        paths.append(str(path))
    return paths


def test_add_writes_the_kohya_layout_that_training_scans(tmp_path, capsys):
    from lorafuse.train.config import DatasetConfig
    from lorafuse.train.scan import scan_dataset

    files = _images(tmp_path / "in", fmt="JPEG")
    (tmp_path / "in" / "dog 1.txt").write_text("a sks dog on the grass\n")  # a caption beside the source is kept
    assert main(["dataset", "add", str(tmp_path / "ds"), *files, "--class", "dog", "--repeats", "3"]) == 0
    folder = tmp_path / "ds" / "3_sks dog"
    assert capsys.readouterr().out.split("\n")[:2] == [str(folder / "dog_0.jpg"), str(folder / "dog_1.jpg")]
    assert sorted(p.name for p in folder.iterdir()) == ["dog_0.jpg", "dog_0.txt", "dog_1.jpg", "dog_1.txt"]
    assert (folder / "dog_0.txt").read_text() == "a photo of a sks dog\n"
    assert (folder / "dog_1.txt").read_text() == "a sks dog on the grass\n"
    index = scan_dataset(DatasetConfig(train_data_dir=tmp_path / "ds", resolution=64))
    assert index.num_train_samples == 6  # 2 images x 3 repeats
    assert sorted(item.caption for item in index.items) == ["a photo of a sks dog", "a sks dog on the grass"]
    # adding the same files again keeps the first copies and names the new ones apart
    assert main(["dataset", "add", str(tmp_path / "ds"), files[0], "--class", "dog", "--repeats", "3",
                 "--caption", "second"]) == 0  # fmt: skip
    assert (folder / "dog_0-1.txt").read_text() == "second\n" and (folder / "dog_0.txt").exists()


def test_add_takes_a_folder_of_images(tmp_path, capsys):
    files = _images(tmp_path / "in")
    (tmp_path / "in" / "notes.md").write_text("not an image, not in the folder's image list")
    assert main(["dataset", "add", str(tmp_path / "ds"), str(tmp_path / "in"), "--class", "dog", "--repeats", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "ds" / "1_sks dog").iterdir()) == [
        "dog_0.png", "dog_0.txt", "dog_1.png", "dog_1.txt"]  # fmt: skip
    (tmp_path / "empty").mkdir()
    assert main(["dataset", "add", str(tmp_path / "ds2"), str(tmp_path / "empty"), files[0], "--class", "dog"]) == 2
    assert "empty: no images in this folder" in capsys.readouterr().err
    assert not (tmp_path / "ds2").exists()


def test_caption_prints_and_reads_back_the_same_table(tmp_path, capsys):
    files = _images(tmp_path / "in")
    main(["dataset", "add", str(tmp_path / "ds"), *files, "--class", "dog", "--trigger", "zxq", "--repeats", "2"])
    capsys.readouterr()
    assert main(["dataset", "caption", str(tmp_path / "ds")]) == 0
    table = capsys.readouterr().out
    assert table == "2_zxq dog/dog_0.png\ta photo of a zxq dog\n2_zxq dog/dog_1.png\ta photo of a zxq dog\n"
    (tmp_path / "edit.tsv").write_text(table.replace("dog_1.png\ta photo of", "dog_1.png\ta drawing of"))
    assert main(["dataset", "caption", str(tmp_path / "ds"), "--from", str(tmp_path / "edit.tsv"),
                 "--set", "2_zxq dog/dog_0.png=zxq dog,  sitting"]) == 0  # fmt: skip
    assert capsys.readouterr().out == "2 captions written\n"
    assert (tmp_path / "ds" / "2_zxq dog" / "dog_1.txt").read_text() == "a drawing of a zxq dog\n"
    assert (tmp_path / "ds" / "2_zxq dog" / "dog_0.txt").read_text() == "zxq dog, sitting\n"


def test_subset_renames_trigger_class_and_repeats(tmp_path, capsys):
    main(["dataset", "add", str(tmp_path / "ds"), *_images(tmp_path / "in"), "--class", "dog"])
    capsys.readouterr()
    assert main(["dataset", "subset", str(tmp_path / "ds"), "10_sks dog", "--trigger", "ohwx", "--repeats", "4"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ds" / "4_ohwx dog")
    assert main(["dataset", "subset", str(tmp_path / "ds"), "4_ohwx dog", "--class", "puppy"]) == 0
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["4_ohwx puppy"]
    assert len(list((tmp_path / "ds" / "4_ohwx puppy").glob("*.png"))) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "{ds}", "{fake}", "--class", "dog"], "fake.png: not an image"),
        (["add", "{ds}", "{big}", "--class", "dog", "--max-mb", "0.00001"], "bytes is over the limit of 10 bytes"),
        (["add", "{ds}", "{good}", "--class", "dog", "--repeats", "0"], "repeats must be >= 1, got 0"),
        (["add", "{ds}", "{good}", "--class", "a/../b"], "class 'a/../b': use letters"),
        (["add", "{ds}", "{tmp}/missing.png", "--class", "dog"], "missing.png: no such image file"),
        (["caption", "{ds}", "--set", "no equals sign"], "--set: 'no equals sign' is not IMAGE=CAPTION"),
        (["caption", "{ds}", "--set", "1_x y/none.png=a"], "none.png: no such image"),
        (["caption", "{tmp}/nope"], "nope: no such dataset folder"),
        (["subset", "{ds}", "7_a b", "--repeats", "2"], "7_a b: no such subset folder"),
    ],
)
def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, argv, message):
    good = _images(tmp_path / "in", sizes=((64, 64),))[0]
    (tmp_path / "fake.png").write_text("not a png")
    names = {"ds": str(tmp_path / "ds"), "fake": str(tmp_path / "fake.png"), "good": good, "big": good,
             "tmp": str(tmp_path)}  # fmt: skip
    (tmp_path / "ds").mkdir()
    assert main(["dataset", *[a.format(**names) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorafuse dataset: error: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not any((tmp_path / "ds").iterdir())  # nothing written before the check failed
