"""Datasets: every file of a concept folder is used or named in a warning with the reason; images of every PIL
mode decode to what an 8-bit RGB reference shows; unreadable captions are one clear error."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.train.config import DatasetConfig
from lorafuse.train.images import load_rgb
from lorafuse.train.scan import scan_dataset

SIZE = 32


def _reference() -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: a gradient in each channel, so a wrong scaling or channel order shows."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([x * 8, y * 8, (x + y) * 4], axis=-1).clip(0, 255).astype(np.uint8)


def _gray_reference() -> np.ndarray:
    return _reference()[..., 0]


def _mode_image(mode: str) -> tuple[Image.Image, np.ndarray]:
    """The reference content in `mode`, and the 8-bit RGB it must decode to."""
    rgb, gray = _reference(), _gray_reference()
    gray3 = np.repeat(gray[..., None], 3, axis=-1)
    if mode == "I;16":
        return Image.fromarray(gray.astype(np.uint16) * 257), gray3  # 16-bit: 0..65535
    if mode == "I":
        return Image.fromarray(gray.astype(np.int32) * 257), gray3
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32) / 255.0), gray3
    if mode == "L":
        return Image.fromarray(gray), gray3
    if mode == "P":
        return Image.fromarray(rgb).quantize(256, dither=Image.Dither.NONE), None
    if mode == "CMYK":
        return Image.fromarray(rgb).convert("CMYK"), rgb
    if mode == "LA":
        alpha = np.full_like(gray, 255)
        alpha[:4] = 0  # transparent rows come out white, not whatever colour hides under them
        expected = gray3.copy()
        expected[:4] = 255
        return Image.fromarray(np.stack([gray, alpha], -1), "LA"), expected
    if mode == "RGBA":
        alpha = np.full_like(gray, 255)
        alpha[:, :4] = 0
        expected = rgb.copy()
        expected[:, :4] = 255
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), expected
    if mode == "1":
        bits = gray > 127
        return Image.fromarray(bits), np.repeat((bits * 255).astype(np.uint8)[..., None], 3, -1)
    raise AssertionError(mode)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("I;16", ".png"), ("I", ".tiff"), ("F", ".tiff"), ("L", ".png"), ("P", ".png"), ("CMYK", ".tiff"),
     ("LA", ".png"), ("RGBA", ".png"), ("1", ".png")],  # fmt: skip
)
def test_every_mode_decodes_like_the_8bit_reference(tmp_path, mode, suffix):
    image, expected = _mode_image(mode)
    path = tmp_path / f"img{suffix}"
    image.save(path)
    with Image.open(path) as check:
        assert check.mode.split(";")[0] == mode.split(";")[0] or (mode, check.mode) == ("I", "I;16"), check.mode
    got = np.asarray(load_rgb(path))
    assert got.shape == (SIZE, SIZE, 3) and got.dtype == np.uint8
    if expected is None:  # palette: the quantised colours, which PIL's own RGB conversion gives exactly
        expected = np.asarray(image.convert("RGB"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, mode


def test_16bit_gray_is_not_white(tmp_path):
    """The issue's example: a 16-bit grayscale PNG used to train as an all-white image."""
    path = tmp_path / "g.png"
    Image.fromarray(np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 60).save(path)
    got = np.asarray(load_rgb(path))
    assert got.min() == 0 and 100 < got.mean() < 150


def _dataset(tmp_path, on_bad_image: str = "skip") -> tuple[DatasetConfig, object]:
    folder = tmp_path / "train" / "2_sks dog"
    folder.mkdir(parents=True)
    for k in range(2):
        Image.fromarray(_reference()).save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text(f"a sks dog {k}")
    cfg = DatasetConfig(train_data_dir=tmp_path / "train", resolution=SIZE, on_bad_image=on_bad_image)
    return cfg, folder


def _scan(cfg, caplog):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorafuse"):
        index = scan_dataset(cfg)
    return index, "\n".join(r.getMessage() for r in caplog.records)


def test_clean_dataset_has_no_warnings(tmp_path, caplog):
    cfg, _ = _dataset(tmp_path)
    index, log = _scan(cfg, caplog)
    assert len(index.items) == 2 and log == ""


def test_dangling_symlink_is_named(tmp_path, caplog):
    cfg, folder = _dataset(tmp_path)
    (folder / "2.png").symlink_to(tmp_path / "moved_away.png")
    index, log = _scan(cfg, caplog)
    assert len(index.items) == 2
    assert f"{folder / '2.png'}: skipped, image is a symbolic link to {tmp_path / 'moved_away.png'}, which does not exist" in log
    assert (folder / "2.png", f"image is a symbolic link to {tmp_path / 'moved_away.png'}, which does not exist") in index.skipped
    strict, _ = _dataset(tmp_path / "again", on_bad_image="fail")
    (strict.train_data_dir / "2_sks dog" / "2.png").symlink_to(tmp_path / "moved_away.png")
    with pytest.raises(UserInputError, match=r"2.png: image is a symbolic link to .*on_bad_image = 'skip'"):
        scan_dataset(strict)


def test_animated_gif_uses_first_frame_with_a_warning(tmp_path, caplog):
    cfg, folder = _dataset(tmp_path)
    frames = [Image.fromarray(np.full((SIZE, SIZE, 3), v, np.uint8)) for v in (200, 10, 90)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    index, log = _scan(cfg, caplog)
    assert len(index.items) == 3
    assert f"{folder / 'anim.gif'}: animated image with 3 frames; only the first frame is used" in log
    assert np.asarray(load_rgb(folder / "anim.gif")).mean() > 190


def test_caption_without_image_is_named(tmp_path, caplog):
    cfg, folder = _dataset(tmp_path)
    (folder / "orphan.txt").write_text("a sks dog that is not there")
    index, log = _scan(cfg, caplog)
    assert f"{folder / 'orphan.txt'}: ignored, a caption file with no image named orphan.*" in log


def test_other_files_and_subfolders_are_named(tmp_path, caplog):
    cfg, folder = _dataset(tmp_path)
    (folder / "notes.md").write_text("x")
    (folder / "extra").mkdir()
    index, log = _scan(cfg, caplog)
    assert f"{folder / 'notes.md'}: ignored, not an image" in log
    assert f"{folder / 'extra'}: ignored, a folder inside a concept folder" in log


def test_our_cache_files_are_not_reported(tmp_path, caplog):
    cfg, folder = _dataset(tmp_path)
    (folder / "0.png.latent.safetensors").write_bytes(b"x")
    (folder / "0.png.te.safetensors").write_bytes(b"x")
    _, log = _scan(cfg, caplog)
    assert log == ""


def test_undecodable_image_is_named(tmp_path, caplog):
    cfg, folder = _dataset(tmp_path)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    index, log = _scan(cfg, caplog)
    assert f"{folder / 'broken.png'}: skipped, cannot use this image" in log
    with pytest.raises(UserInputError, match="broken.png: cannot use this image"):
        scan_dataset(DatasetConfig(train_data_dir=tmp_path / "train", resolution=SIZE, on_bad_image="fail"))


def test_unreadable_image_says_permission_denied(tmp_path, caplog, monkeypatch):
    cfg, folder = _dataset(tmp_path)
    target = folder / "1.png"
    real_open = open

    def no_read(file, *args, **kwargs):
        if str(file) == str(target):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("lorafuse.utils.inputs.open", no_read, raising=False)
    index, log = _scan(cfg, caplog)
    assert f"{target}: skipped, permission denied" in log and len(index.items) == 1


def test_invalid_utf8_caption_is_one_error(tmp_path):
    cfg, folder = _dataset(tmp_path)
    (folder / "1.txt").write_bytes(b"a sks dog \xff\xfe in a park")
    with pytest.raises(UserInputError, match=r"1.txt: caption file is not valid UTF-8 \(byte 0xff at offset 10"):
        scan_dataset(cfg)


def test_empty_concept_folder_only(tmp_path):
    (tmp_path / "train" / "3_sks cat").mkdir(parents=True)
    with pytest.raises(UserInputError, match="no usable training images"):
        scan_dataset(DatasetConfig(train_data_dir=tmp_path / "train", resolution=SIZE))


def test_cli_dry_run_shows_dataset_warnings_without_traceback(cli, tmp_path):
    cfg, folder = _dataset(tmp_path)
    (folder / "x.png").symlink_to(tmp_path / "gone.png")
    (folder / "orphan.txt").write_text("c")
    argv = ["train", "--dry-run", "--pretrained_model_name_or_path", "world-random", "--train_data_dir",
            tmp_path / "train", "--resolution", SIZE, "--output_dir", tmp_path / "out", "--on_bad_image", "skip"]  # fmt: skip
    code, out, err = cli(*argv)
    assert code == 0 and "Traceback" not in err
    assert "x.png: skipped, image is a symbolic link" in err and "orphan.txt: ignored, a caption file with no image" in err


def test_cli_invalid_caption_is_refused(cli, tmp_path):
    cfg, folder = _dataset(tmp_path)
    (folder / "0.txt").write_bytes(b"\xc3\x28")
    argv = ["train", "--dry-run", "--pretrained_model_name_or_path", "world-random", "--train_data_dir",
            tmp_path / "train", "--resolution", SIZE, "--output_dir", tmp_path / "out"]  # fmt: skip
    cli.refused(argv, str(folder / "0.txt"), "not valid UTF-8", watch=tmp_path)
