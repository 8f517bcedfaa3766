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
    with pytest.raises(UserInputError, match="dataset name '../x': give one folder name, not a path"):
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


def _png(path, size=(8, 8)):
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path)
    return path


def test_what_rides_along_in_an_upload_is_refused_or_dropped(tmp_path):
    """A decompression bomb (a small file claiming 400 million pixels) is refused before decoding; a PNG with a
    zip appended (a polyglot) is stored as a fresh encoding of its pixels, without the zip; a truncated image and
    a zip named .png are refused; each with one line naming the file."""
    import struct
    import zipfile
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 20001))
                     + chunk(b"IEND", b""))  # fmt: skip
    with pytest.raises(UserInputError, match=r"^bomb.png: more pixels than the limit"):
        check_image(bomb)
    ihdr = struct.pack(">IIBBBBB", 9000, 9000, 8, 0, 0, 0, 0)  # under PIL's own limit, over ours
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    with pytest.raises(UserInputError, match=r"^bomb.png: more pixels than the limit .* 9000 x 9000"):
        check_image(bomb)
    good = _png(tmp_path / "good.png")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(UserInputError, match=r"^cut.png: not an image"):
        check_image(truncated)
    archive = tmp_path / "zip.png"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "hello")
    with pytest.raises(UserInputError, match=r"^zip.png: not an image"):
        check_image(archive)
    poly = tmp_path / "poly.png"
    poly.write_bytes(good.read_bytes() + archive.read_bytes())
    assert zipfile.is_zipfile(poly)
    ws = Workspace.create(tmp_path / "ws")
    folder, _ = datasets.add_uploads(ws, "p", [str(poly)], trigger="sks", cls="dog", repeats=1, max_bytes=1 << 20)
    stored = folder / "poly.png"
    assert not zipfile.is_zipfile(stored) and b"hello" not in stored.read_bytes()
    with Image.open(stored) as a, Image.open(good) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))  # the same pixels


def test_a_jpeg_keeps_its_pixels_and_its_rotation_is_applied(tmp_path):
    src = tmp_path / "photo.jpg"
    y, x = np.mgrid[0:16, 0:24]  # smooth, as a photo is (noise is JPEG's worst case)
    pixels = np.stack([x * 10, y * 15, x * 5 + y * 5], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(src, quality=90)
    ws = Workspace.create(tmp_path / "ws")
    folder, _ = datasets.add_uploads(ws, "j", [str(src)], trigger="sks", cls="dog", repeats=1, max_bytes=1 << 20)
    with Image.open(folder / "photo.jpg") as a, Image.open(src) as b:
        assert a.format == "JPEG" and np.abs(np.asarray(a).astype(int) - np.asarray(b)).mean() < 2
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees for display, as a phone writes it
    Image.fromarray(pixels).save(src, quality=90, exif=exif)
    folder, _ = datasets.add_uploads(ws, "j", [str(src)], trigger="sks", cls="dog", repeats=1, max_bytes=1 << 20)
    with Image.open(folder / "photo-1.jpg") as a:
        assert a.size == (16, 24)  # upright, as training would see it


def test_symlinks_out_of_the_workspace_are_refused_in_a_workspace_folder(tmp_path):
    """A folder of images in the workspace: an image (or caption) that is a symlink out, a symlinked parent
    folder, and a symlink swapped in after the path was checked are all refused on the file actually opened."""
    import os

    ws = Workspace.create(tmp_path / "ws")
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = _png(outside / "secret.png")
    photos = ws.resolve("photos")
    photos.mkdir()
    _png(photos / "a.png")
    os.symlink(secret, photos / "b.png")
    with pytest.raises(UserInputError, match=r"b.png: a symlink leads outside"):
        datasets.add_uploads(ws, "s", [], trigger="sks", cls="dog", repeats=1, max_bytes=1 << 20, folder="photos")
    assert not ws.resolve("datasets/s").exists()  # nothing written: every image is checked first
    (photos / "b.png").unlink()
    os.symlink(outside / "secret.txt", photos / "a.txt")
    (outside / "secret.txt").write_text("the secret caption")
    with pytest.raises(UserInputError, match=r"a.txt: a symlink leads outside"):
        datasets.add_uploads(ws, "s", [], trigger="sks", cls="dog", repeats=1, max_bytes=1 << 20, folder="photos")
    (photos / "a.txt").unlink()
    os.symlink(outside, ws.root / "linked")  # a symlinked parent folder
    with pytest.raises(UserInputError, match="a symlink leads outside the workspace"):
        datasets.add_uploads(ws, "s", [], trigger="sks", cls="dog", repeats=1, max_bytes=1 << 20, folder="linked")
    # the check passed, then the folder was swapped for a symlink out (check, then use): the open file decides
    from lorafuse.train import dataset_folders

    real_images_in = dataset_folders._images_in

    def swap_then_list(folder):
        found = real_images_in(folder)
        os.rename(photos, ws.root / "photos-old")
        os.symlink(outside, photos)
        (outside / "a.png").write_bytes(secret.read_bytes())
        return found

    dataset_folders._images_in = swap_then_list
    try:
        with pytest.raises(UserInputError, match=r"a.png: a symlink leads outside"):
            datasets.add_uploads(ws, "s", [], trigger="sks", cls="dog", repeats=1, max_bytes=1 << 20, folder="photos")
    finally:
        dataset_folders._images_in = real_images_in
