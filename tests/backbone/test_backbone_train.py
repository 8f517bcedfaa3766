"""Backbone training on a tiny model: it trains only the bases, saves W' as a plain diffusers pipeline, resumes."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lorafuse.backbone import pairs as P
from lorafuse.backbone.train import BackboneConfig, load_backbone_config, lr_factor, train_backbone
from lorafuse.errors import ConfigError, UserInputError
from lorafuse.models.tiny import tiny_sd15_pipeline


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    inds, styles = P.world_references(2, 2)
    content, style = P.render_pairs(inds, styles)
    captions = [["a photo of a dog, watercolor style", "a photo of a dog, sketch style"],
                ["a photo of a car, watercolor style", "a photo of a car, sketch style"]]  # fmt: skip
    return P.write_pairs(tmp_path_factory.mktemp("pairs"), content, style, captions, inds, styles, {})


def config(dataset, out, **kw) -> BackboneConfig:
    base = dict(pairs=dataset, output_dir=out, base="sd15-tiny", steps=3, batch_size=2, learning_rate=1e-2,
                warmup_steps=1, r_max=4, r_min=1, reference_width=0, features="random", lambda_p=0.1)  # fmt: skip
    return BackboneConfig(**{**base, **kw})


def test_lr_schedule() -> None:
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.0) == pytest.approx(0.5)


def test_train_saves_a_plain_diffusers_backbone(dataset, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    from lorafuse.backbone.para import orthonormal

    pipe = tiny_sd15_pipeline(0)
    w = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    folder = train_backbone(config(dataset, tmp_path), pipe=pipe, progress=False)
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert len(log) == 4 and float(log[-1].split(",")[-1]) > 0  # 3 steps, perceptual term present
    loaded = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    bases = load_file(str(tmp_path / "bases.safetensors"))
    new = loaded.unet.state_dict()
    assert set(new) == set(w)
    changed = {k for k in w if not torch.equal(w[k], new[k])}
    assert changed == {f"{name.rsplit('.', 1)[0]}.weight" for name in bases}  # only the tuned layers moved
    path = "down_blocks.0.resnets.0.conv1"
    q = orthonormal(
        torch.cat([orthonormal(bases[f"{path}.content"]), orthonormal(bases[f"{path}.style"])], 1)
    )
    flat_w = w[f"{path}.weight"].flatten(1)
    torch.testing.assert_close(
        new[f"{path}.weight"].flatten(1), flat_w - q @ (q.T @ flat_w), atol=1e-5, rtol=0
    )
    info = (folder / "craft_backbone.json").read_text()
    assert '"steps": 3' in info


def test_resume_continues_exactly(dataset, tmp_path) -> None:
    full = train_backbone(config(dataset, tmp_path / "a", steps=4, save_every_n_steps=2, lambda_p=0),
                          pipe=tiny_sd15_pipeline(0), progress=False)  # fmt: skip
    assert (tmp_path / "a" / "checkpoints" / "step-000002-state").is_dir() and full.is_dir()
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000002-state",
                    tmp_path / "b" / "checkpoints" / "step-000002-state")  # fmt: skip
    train_backbone(config(dataset, tmp_path / "b", steps=4, save_every_n_steps=2, lambda_p=0),
                   pipe=tiny_sd15_pipeline(0), progress=False)  # fmt: skip
    a, b = (
        load_file(str(tmp_path / "a" / "bases.safetensors")),
        load_file(str(tmp_path / "b" / "bases.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserInputError, match="other settings"):
        train_backbone(config(dataset, tmp_path / "b", steps=4, r_max=3, lambda_p=0),
                       pipe=tiny_sd15_pipeline(0), progress=False)  # fmt: skip


def test_config_errors(dataset, tmp_path) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        config(dataset, tmp_path, batch_size=0)
    with pytest.raises(ConfigError, match="r_min <= r_max"):
        config(dataset, tmp_path, r_min=9)
    toml = tmp_path / "bb.toml"
    toml.write_text('pairs = "p"\noutput_dir = "o"\nsteps = 2\n')
    cfg = load_backbone_config(toml)
    assert cfg.pairs == tmp_path / "p" and cfg.steps == 2
    toml.write_text('pairs = "p"\noutput_dir = "o"\nstep = 2\n')
    with pytest.raises(ConfigError, match="unknown key 'step'"):
        load_backbone_config(toml)
    with pytest.raises(UserInputError, match="no pairs.json"):
        train_backbone(dataclasses.replace(config(dataset, tmp_path), pairs=tmp_path), progress=False)


def test_auto_features_need_the_world(dataset, tmp_path) -> None:
    with pytest.raises(UserInputError, match="features = 'auto'"):
        train_backbone(config(dataset, tmp_path, features="auto"), pipe=tiny_sd15_pipeline(0), progress=False)
