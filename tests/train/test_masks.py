"""Loss masks (kohya's masked_loss / alpha_mask): the loss against a slow hand reference, the mask through the
dataset's geometry and the latent cache, the config and kohya import, and a few training steps on the world base."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from lorafuse.errors import ConfigError, UserInputError
from lorafuse.train.config import DatasetConfig
from lorafuse.train.config_subsets import SubsetConfig
from lorafuse.train.data import _FLIP, SampleKey, TrainDataset, _rng
from lorafuse.train.losses import diffusion_loss
from lorafuse.train.scan import scan_dataset

ALPHAS = torch.linspace(0.9999, 0.01, 1000)


def _loss(pred, target, mask=None, **kw):
    t = torch.tensor([100, 700])
    return diffusion_loss(pred, target, t, ALPHAS, mask=mask, **kw)


def _reference(pred, target, mask, sample_weight):
    """The slow reference: each latent cell's weight is the mean of the 8x8 mask pixels it encodes (kohya's area
    resize), times the squared error; mean over (C, h, w) per sample, times the sample weight, mean over samples."""
    b, c, h, w = pred.shape
    total = 0.0
    for i in range(b):
        s = 0.0
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    cell = float(mask[i, 0, 8 * y : 8 * y + 8, 8 * x : 8 * x + 8].mean())
                    s += cell * float(pred[i, ch, y, x] - target[i, ch, y, x]) ** 2
        total += s / (c * h * w) * float(sample_weight[i])
    return total / b


def test_masked_loss_matches_the_hand_reference():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 2, generator=g), torch.randn(2, 4, 3, 2, generator=g)
    mask = torch.rand(2, 1, 24, 16, generator=g)
    mask[0, :, :8] = 0.0  # a masked-out band, and grey values elsewhere
    weight = torch.tensor([1.0, 0.5])
    got = _loss(pred, target, mask, sample_weight=weight)
    assert got.item() == pytest.approx(_reference(pred, target, mask, weight), rel=1e-5)
    # not renormalised by the mask's mean (kohya): a half-weight mask halves the loss
    half = _loss(pred, target, torch.full_like(mask, 0.5))
    assert half.item() == pytest.approx(_loss(pred, target).item() / 2, rel=1e-6)


def test_a_fully_opaque_mask_equals_the_unmasked_loss():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    for kw in ({}, {"loss_type": "huber", "huber_schedule": "snr"}, {"min_snr_gamma": 5.0}):
        plain = _loss(pred, target, **kw)
        assert torch.equal(_loss(pred, target, torch.ones(2, 1, 32, 32), **kw), plain)


def test_a_masked_out_region_gets_zero_gradient():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 4, 4, 4, generator=g).requires_grad_(True)
    target = torch.randn(2, 4, 4, 4, generator=g)
    mask = torch.ones(2, 1, 32, 32)
    mask[:, :, :, :16] = 0.0  # the left half of every image: latent columns 0 and 1
    _loss(pred, target, mask).backward()
    assert torch.equal(pred.grad[..., :2], torch.zeros_like(pred.grad[..., :2]))
    assert (pred.grad[..., 2:].abs() > 0).all()


def test_masks_need_an_image_shaped_prediction():
    with pytest.raises(UserInputError, match="image-shaped prediction"):
        _loss(torch.zeros(2, 16, 8), torch.ones(2, 16, 8), torch.ones(2, 1, 8, 8))


# --- the dataset -------------------------------------------------------------------------------------------


def _rgba(path, size=(96, 64)):
    """An RGBA image whose alpha ramps left to right (0 .. 255), with a fully opaque bottom-right block."""
    w, h = size
    alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    alpha[h // 2 :, w // 2 :] = 255
    rgb = np.full((h, w, 3), 90, np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    return alpha


def _expected(alpha: np.ndarray, item, offset, flip) -> torch.Tensor:
    """The alpha channel through the image's geometry, done independently with PIL."""
    img = Image.fromarray(alpha, "L").resize(item.assignment.resized, Image.Resampling.LANCZOS)
    left, top = offset
    img = img.crop((left, top, left + item.assignment.bucket[0], top + item.assignment.bucket[1]))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(img, np.float32) / 255.0)[None]


def _subset_folder(tmp_path, name="imgs"):
    folder = tmp_path / name
    folder.mkdir()
    alpha = _rgba(folder / "a.png")
    (folder / "a.txt").write_text("zkz robot")
    return folder, alpha


def test_an_rgba_image_gives_its_alpha_as_mask_through_crop_resize_and_flip(tmp_path):
    folder, alpha = _subset_folder(tmp_path)
    cfg = DatasetConfig(
        resolution=(64, 32), alpha_mask=True, flip_aug=True, random_crop=True,
        subsets=(SubsetConfig(folder, num_repeats=8),),
    )  # fmt: skip
    index = scan_dataset(cfg)
    assert index.items[0].mask == "alpha" and index.has_masks
    data = TrainDataset(index, seed=3)
    flips = set()
    for sid in range(8):
        out = data[SampleKey(0, sid)]
        assert out["mask"].shape == (1, 32, 64) and out["pixel_values"].shape == (3, 32, 64)
        # the flip and the crop this sample's image got: the dataset's flip stream and its reported crop
        flip = bool(_rng(3, 0, sid, _FLIP).random() < 0.5)
        top, left = out["crop_top_left"]
        assert torch.allclose(out["mask"], _expected(alpha, index.items[0], (left, top), flip), atol=1 / 255)
        flips.add((flip, top))
    assert {f for f, _ in flips} == {False, True} and len({y for _, y in flips}) > 1  # flips, crops


def test_cached_masks_equal_the_uncached_ones(tmp_path):
    from lorafuse.models.tiny import tiny_sd15_pipeline
    from lorafuse.train.cache import LatentCache

    folder, _ = _subset_folder(tmp_path)
    cfg = DatasetConfig(resolution=64, alpha_mask=True, flip_aug=True, cache_latents=True,
                        cache_latents_to_disk=True, subsets=(SubsetConfig(folder, num_repeats=4),))  # fmt: skip
    index = scan_dataset(cfg)
    cache = LatentCache(tiny_sd15_pipeline(seed=0).vae, to_disk=True)
    assert cache.prepare(index).computed == 1
    cached, plain = TrainDataset(index, 0, latent_cache=cache), TrainDataset(index, 0)
    for sid in range(4):
        assert torch.equal(cached[SampleKey(0, sid)]["mask"], plain[SampleKey(0, sid)]["mask"])
    assert LatentCache(cache.vae, to_disk=True).prepare(index).reused == 1  # mask stored in the same file
    # another mask source is another cache entry
    cfg2 = DatasetConfig(resolution=64, flip_aug=True, cache_latents=True, cache_latents_to_disk=True,
                         subsets=(SubsetConfig(folder, num_repeats=4),))  # fmt: skip
    assert LatentCache(cache.vae, to_disk=True).prepare(scan_dataset(cfg2)).computed == 1


def test_mask_dir_images_weight_by_their_red_channel(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(folder / "a.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (32, 32), 127).save(masks / "a.png")  # another size, same shape: resized to the image
    cfg = DatasetConfig(resolution=64,
                        subsets=(SubsetConfig(folder, class_tokens="zkz", mask_dir=masks, alpha_mask=True),))  # fmt: skip
    index = scan_dataset(cfg)
    assert index.items[0].mask == masks / "a.png"  # the mask folder wins over alpha_mask, as in kohya
    mask = TrainDataset(index, 0)[SampleKey(0, 0)]["mask"]
    assert torch.allclose(mask, torch.full((1, 64, 64), 127 / 255))


def test_masks_without_an_image_are_named(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("a.png", "b_typo.png"):
        Image.new("L", (64, 64), 255).save(masks / name)
    cfg = DatasetConfig(resolution=64, subsets=(SubsetConfig(folder, class_tokens="zkz", mask_dir=masks),))
    with caplog.at_level(logging.WARNING):
        scan_dataset(cfg)
    assert "1 mask image(s) match no image of the subset and are not used (e.g. b_typo.png)" in caplog.text


def test_alpha_mask_in_the_folder_layout(tmp_path):
    folder = tmp_path / "train" / "2_sks robot"
    folder.mkdir(parents=True)
    alpha = _rgba(folder / "a.png", (64, 64))
    index = scan_dataset(DatasetConfig(train_data_dir=tmp_path / "train", resolution=64, alpha_mask=True))
    assert [it.mask for it in index.items] == ["alpha"]
    mask = TrainDataset(index, 0)[SampleKey(0, 0)]["mask"]
    assert torch.equal(mask, torch.from_numpy(alpha.astype(np.float32) / 255.0)[None])


def test_mask_dir_errors_name_the_image_and_the_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    cfg = DatasetConfig(resolution=64, subsets=(SubsetConfig(folder, class_tokens="zkz", mask_dir=masks),))
    with pytest.raises(UserInputError, match=r"a\.png: no mask image named a\.\* in .*masks"):
        scan_dataset(cfg)
    Image.new("L", (64, 16)).save(masks / "a.png")
    index = scan_dataset(cfg)
    with pytest.raises(UserInputError, match=r"the mask is 64x16, its image a\.png is 64x64"):
        TrainDataset(index, 0)[SampleKey(0, 0)]


def test_alpha_mask_on_images_without_alpha_is_reported_and_trains_them_whole(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "opaque.png")
    _rgba(folder / "cut.png", (64, 64))
    cfg = DatasetConfig(resolution=64, alpha_mask=True, subsets=(SubsetConfig(folder, class_tokens="zkz"),))
    with caplog.at_level(logging.WARNING):
        index = scan_dataset(cfg)
    assert "1 image(s) have no alpha channel and train whole (e.g. opaque.png)" in caplog.text
    opaque = next(i for i, it in enumerate(index.items) if it.path.name == "opaque.png")
    sid = index.samples.index(opaque)
    assert torch.equal(TrainDataset(index, 0)[SampleKey(0, sid)]["mask"], torch.ones(1, 64, 64))


def test_unmasked_subsets_get_ones_beside_masked_ones(tmp_path):
    folder, _ = _subset_folder(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (96, 64)).save(plain / "p.png")
    cfg = DatasetConfig(resolution=64, subsets=(SubsetConfig(folder, alpha_mask=True),
                                                 SubsetConfig(plain, class_tokens="zkz")))  # fmt: skip
    index = scan_dataset(cfg)
    sid = next(s for s, i in enumerate(index.samples) if index.items[i].path.name == "p.png")
    assert torch.equal(TrainDataset(index, 0)[SampleKey(0, sid)]["mask"], torch.ones(1, 64, 64))


# --- config, kohya import, training ------------------------------------------------------------------------


def test_masked_loss_needs_a_mask_source_for_every_image(tmp_path):
    from lorafuse.train.config import load_train_config

    base = {"model.pretrained_model_name_or_path": "world-random", "loss.masked_loss": "true"}
    with pytest.raises(ConfigError, match="loss.masked_loss.*needs loss masks: set dataset.alpha_mask"):
        load_train_config(None, {**base, "dataset.train_data_dir": str(tmp_path)})
    path = tmp_path / "c.toml"
    path.write_text(
        '[model]\npretrained_model_name_or_path = "world-random"\n[loss]\nmasked_loss = true\n'
        f'[[dataset.subsets]]\nimage_dir = "{tmp_path.as_posix()}/a"\nalpha_mask = true\n'
        f'[[dataset.subsets]]\nimage_dir = "{tmp_path.as_posix()}/b"\n'
    )
    with pytest.raises(ConfigError, match=r"dataset.subsets\[1\] .*has neither mask_dir nor alpha_mask"):
        load_train_config(path)


def test_mask_settings_round_trip_through_toml(tmp_path):
    from lorafuse.config.toml_io import save_config
    from lorafuse.train.config import load_train_config

    path = tmp_path / "c.toml"
    path.write_text(
        '[model]\npretrained_model_name_or_path = "world-random"\n[loss]\nmasked_loss = true\n'
        "[dataset]\nalpha_mask = true\n"
        f'[[dataset.subsets]]\nimage_dir = "{tmp_path.as_posix()}/a"\nmask_dir = "{tmp_path.as_posix()}/m"\n'
        f'[[dataset.subsets]]\nimage_dir = "{tmp_path.as_posix()}/b"\nalpha_mask = false\n'
        f'mask_dir = "{tmp_path.as_posix()}/m2"\n'
    )
    cfg = load_train_config(path)
    assert cfg.loss.masked_loss and cfg.dataset.alpha_mask
    assert cfg.dataset.subsets[0].mask_dir == tmp_path / "m" and cfg.dataset.subsets[1].alpha_mask is False
    save_config(cfg, tmp_path / "again.toml")
    assert load_train_config(tmp_path / "again.toml") == cfg


def _kohya_files(tmp_path, masked_loss: bool = True):
    """A kohya flat config and dataset config: one subset with alpha masks, one with a conditioning_data_dir."""
    from lorafuse.world.dataset import write_subject_dataset

    write_subject_dataset("robot_09", tmp_path / "data", n=3, repeats=1)
    (src,) = (tmp_path / "data").glob("1_*")
    cut, drawn, masks = tmp_path / "cut", tmp_path / "drawn", tmp_path / "masks"
    for folder in (cut, drawn, masks):
        folder.mkdir()
    for k, png in enumerate(sorted(src.glob("*.png"))):
        rgb = np.asarray(Image.open(png).convert("RGB"))
        h, w = rgb.shape[:2]
        alpha = np.zeros((h, w), np.uint8)
        alpha[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255  # the subject in the middle, background ignored
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(cut / png.name)
        Image.fromarray(rgb).save(drawn / png.name)
        Image.fromarray(alpha).save(masks / png.name)
        for folder in (cut, drawn):
            (folder / png.with_suffix(".txt").name).write_text(f"sks robot, view {k}")
    (tmp_path / "ds.toml").write_text(
        "[general]\nenable_bucket = false\ncaption_extension = '.txt'\n\n"
        "[[datasets]]\nresolution = 64\nbatch_size = 2\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{cut.as_posix()}'\n  num_repeats = 2\n  alpha_mask = true\n\n"
        f"  [[datasets.subsets]]\n  image_dir = '{drawn.as_posix()}'\n"
        f"  conditioning_data_dir = '{masks.as_posix()}'\n"
    )
    (tmp_path / "kohya.toml").write_text(
        'pretrained_model_name_or_path = "world-random"\n'
        f'dataset_config = "{(tmp_path / "ds.toml").as_posix()}"\n'
        f"masked_loss = {str(masked_loss).lower()}\n"
        'network_module = "networks.lora"\nnetwork_dim = 4\nnetwork_alpha = 4\nlearning_rate = 0.001\n'
        'optimizer_type = "AdamW"\nmax_train_steps = 3\nseed = 1\nmixed_precision = "no"\n'
        f'output_dir = "{(tmp_path / "out").as_posix()}"\noutput_name = "masked"\nxformers = true\n'
    )
    return tmp_path / "kohya.toml"


def test_a_kohya_config_with_masks_imports_and_trains_on_the_world_base(tmp_path, capsys, monkeypatch):
    from lorafuse.cli.main import main
    from lorafuse.train import masks
    from lorafuse.train.kohya_import import import_kohya_file

    path = _kohya_files(tmp_path)
    imp = import_kohya_file(path)
    subsets = imp.data["dataset"]["subsets"]
    assert subsets[0]["alpha_mask"] is True and subsets[1]["mask_dir"] == (tmp_path / "masks").as_posix()
    assert imp.data["loss"]["masked_loss"] is True
    assert "datasets[0].subsets[1].conditioning_data_dir" in imp.table()
    assert main(["config", "import", str(path), "--out", str(tmp_path / "ours.toml")]) == 0
    assert "masked_loss" in capsys.readouterr().out
    seen = []

    def spy(loss, mask):
        seen.append(float(mask.min()))
        return apply_mask(loss, mask)

    apply_mask = masks.apply_mask
    monkeypatch.setattr(masks, "apply_mask", spy)
    assert main(["train", str(path), "--no-progress"]) == 0
    assert len(seen) == 3 and min(seen) == 0.0  # every step's loss was masked, with a real (not all-ones) mask
    assert (tmp_path / "out" / "masked.safetensors").is_file()


def test_conditioning_data_dir_without_masked_loss_is_refused(tmp_path):
    from lorafuse.train.kohya_import import import_kohya_file

    with pytest.raises(ConfigError, match="conditioning_data_dir.*only with masked_loss = true"):
        import_kohya_file(_kohya_files(tmp_path, masked_loss=False))
