"""Disk space: every heavy writer refuses a disk without room for its estimated output, with one line naming the
user's path, before any model loads and before anything is written; and each estimate bounds what a small real
run writes (checked where such a run takes a few seconds)."""

from __future__ import annotations

import shutil
import subprocess
from collections import namedtuple

import pytest

_Usage = namedtuple("usage", "total used free")


@pytest.fixture
def no_render(monkeypatch):
    """The built-in world's renderer fails the test: datasets, pairs and render pools are refused before any
    image is made."""
    import lorafuse.world.dataset as dataset
    import lorafuse.world.pool as pool
    import lorafuse.world.render as render

    def rendered(*a, **k):
        pytest.fail("an image was rendered before the disk-space check")

    monkeypatch.setattr(render, "render", rendered)
    monkeypatch.setattr(dataset, "render", rendered)
    monkeypatch.setattr(pool, "render_pool", rendered)


@pytest.fixture
def full_disk(monkeypatch):
    """1000 bytes free everywhere: any positive estimate is refused."""
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(10**9, 10**9 - 1000, 1000))


def _argv(writer, out, inputs, lora):
    return {
        "train": ["train", "--pretrained_model_name_or_path", "world-random", "--train_data_dir", inputs / "ds",
                  "--resolution", "64", "--network_dim", "4", "--max_train_steps", "2", "--output_dir", out,
                  "--no-progress"],
        "fuse": ["fuse", "--content", lora, "--style", lora, "--prompt", "a dog", "--method", "direct",
                 "--base", "sd15-tiny", "--steps", "2", "--num-images", "1", "--no-progress", "--out", out],
        "grid": ["grid", inputs / "grid.toml", "--out", out, "--no-progress"],
        "world dataset": ["world", "dataset", out, "--subject", "teapot_08", "--n", "2"],
        "craft pairs": ["craft", "pairs", "--out", out, "--content", "teapot_08", "--style", "ink"],
        "craft expert": ["craft", "expert", "--out", out, "--pair", "teapot_08:crayon", "--work-dir", out.parent / "w"],
        "demo": ["demo", "--out", out, "--seeds", "1", "--steps", "2", "--methods", "direct", "--no-progress"],
        "world pretrain": ["world", "pretrain", "--work", out.parent / "w", "--out", out],
        "world train-oracle": ["world", "train-oracle", "--work", out.parent / "w", "--out", out],
        "world render": ["world", "render", "teapot_08", "--n", "1", "--out", out],
    }[writer]  # fmt: skip


WRITERS = ["train", "fuse", "grid", "world dataset", "craft pairs", "craft expert", "demo", "world pretrain",
           "world train-oracle", "world render"]  # fmt: skip


@pytest.mark.parametrize("writer", WRITERS)
def test_no_space_for_the_estimate_is_refused_before_the_model_loads(cli, tmp_path, inputs, tiny_lora, no_model,
                                                                     no_render, full_disk, writer):  # fmt: skip
    out = tmp_path / "out"
    msg = cli.refused(_argv(writer, out, inputs, tiny_lora), str(out), "not enough disk space", watch=tmp_path)
    assert "needs about" in msg and "1000 bytes are free" in msg, msg


def test_training_disk_caches_need_their_space_in_the_dataset_folder(cli, tmp_path, no_model, monkeypatch):
    """Latents cached to disk go beside the images: with room for the run's outputs but not for the caches, the
    dataset folder is the one named."""
    from lorafuse.world.dataset import write_subject_dataset

    concept = write_subject_dataset("robot_09", tmp_path / "ds", n=2, repeats=1)  # ds/<repeats>_<name>
    other = tmp_path / "elsewhere"
    other.mkdir()

    def usage(p):  # two "filesystems": lots of room for the outputs, none in the dataset
        return _Usage(10**12, 0, 1000 if str(p).startswith(str(tmp_path / "ds")) else 10**12)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    monkeypatch.setattr("lorafuse.train.disk_estimate.same_filesystem", lambda a, b: False)
    argv = ["train", "--pretrained_model_name_or_path", "world-random", "--train_data_dir", tmp_path / "ds",
            "--resolution", "64", "--max_train_steps", "1", "--output_dir", other / "out", "--cache_latents",
            "--cache_latents_to_disk", "--no-progress"]  # fmt: skip
    cli.refused(argv, f"{concept}: not enough disk space for the disk cache", watch=tmp_path)


def _du(path) -> int:
    return int(subprocess.check_output(["du", "-sb", str(path)]).split()[0])


def test_the_training_estimate_bounds_a_real_run(cli, tmp_path, inputs, monkeypatch):
    """A real tiny run with a periodic save, states and disk-cached latents: the estimate is at least what it
    wrote, in output_dir and beside the images, and within 10x of it."""
    import lorafuse.train.prepare as prepare

    shutil.copytree(inputs / "ds", tmp_path / "ds")
    seen = []
    real = prepare.check_disk_space
    monkeypatch.setattr(prepare, "check_disk_space", lambda *a: seen.append(real(*a)) or seen[-1])
    out = tmp_path / "run"
    argv = _argv("train", out, tmp_path, None)  # its own copy of the dataset: the caches go beside the images
    code, _, err = cli(*argv, "--save_state", "--save_every_n_steps", "1", "--cache_latents",
                       "--cache_latents_to_disk", "--flip_aug")  # fmt: skip
    assert code == 0, err
    (est,) = seen
    assert est.output >= _du(out) and est.output <= 10 * _du(out), (est.parts, _du(out))
    cached = sum(p.stat().st_size for p in (tmp_path / "ds").rglob("*.latents.safetensors"))
    assert sum(est.caches.values()) >= cached > 0, (est.caches, cached)


ESTIMATES = {  # writer -> its estimate (module, function)
    "fuse": ("lorafuse.cli.fuse", "estimate_output_bytes"),
    "grid": ("lorafuse.cli.grid", "estimate_output_bytes"),
    "world dataset": ("lorafuse.world.dataset", "estimate_bytes"),
    "craft pairs": ("lorafuse.backbone.pairs", "estimate_pairs_bytes"),
}


@pytest.mark.parametrize("writer", list(ESTIMATES))
def test_the_estimate_bounds_a_real_run(cli, tmp_path, inputs, tiny_lora, monkeypatch, writer):
    """Each writer's estimate is at least what a small real run of it writes (fuse with K-LoRA, the method with
    the largest record and a heatmap)."""
    import importlib

    module, name = ESTIMATES[writer]
    module = importlib.import_module(module)
    seen, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: seen.append(real(*a)) or seen[-1])
    out = tmp_path / "out"
    (tmp_path / "grid.toml").write_text(f'prompt = "a dog"\n[axes]\nbase = ["sd15-tiny"]\ncheckpoint = ["{tiny_lora}"]\n'
                                        'lora_weight = [0.5, 1.0]\nsteps = [2]\n[metrics]\n')  # fmt: skip
    argv = [("klora" if a == "direct" else a) for a in _argv(writer, out, tmp_path, tiny_lora)]
    code, _, err = cli(*argv)
    assert code == 0, err
    assert len(seen) == 1 and _du(out) <= seen[0], (seen, _du(out))


def _backbone_config(tmp_path, out):
    """A tiny backbone run: a 2 x 1 pairs dataset (rendered) and a config of 2 steps with a save after the first."""
    from lorafuse.backbone import pairs as P

    content, style = P.render_pairs(["teapot_08", "robot_09"], ["ink"])
    data = P.write_pairs(tmp_path / "pairs", content, style, [["a teapot, ink"], ["a robot, ink"]],
                         ["teapot_08", "robot_09"], ["ink"], {})  # fmt: skip
    (tmp_path / "bb.toml").write_text(
        f'pairs = "{data}"\noutput_dir = "{out}"\nbase = "sd15-tiny"\nsteps = 2\nbatch_size = 1\nwarmup_steps = 1\n'
        'r_max = 4\nr_min = 1\nreference_width = 0\nfeatures = "none"\nlambda_p = 0\nsave_every_n_steps = 1\n'
    )
    return ["craft", "backbone", tmp_path / "bb.toml", "--no-progress"]


def test_backbone_training_is_refused_before_the_base_loads(cli, tmp_path, no_model, monkeypatch):
    argv = _backbone_config(tmp_path, tmp_path / "bb")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(10**9, 10**9 - 1000, 1000))
    cli.refused(argv, str(tmp_path / "bb"), "not enough disk space", watch=tmp_path)


def test_the_backbone_estimate_bounds_a_real_run(cli, tmp_path, monkeypatch):
    import lorafuse.backbone.train as train

    argv = _backbone_config(tmp_path, tmp_path / "bb")
    seen, real = [], train.estimate_backbone_bytes
    monkeypatch.setattr(train, "estimate_backbone_bytes", lambda *a: seen.append(real(*a)) or seen[-1])
    code, _, err = cli(*argv)
    assert code == 0, err
    assert len(seen) == 1 and _du(tmp_path / "bb") <= seen[0] <= 10 * _du(tmp_path / "bb"), (seen, _du(tmp_path / "bb"))


def test_the_world_estimates_bound_the_shipped_artefacts_and_a_pool(tmp_path):
    """`world train-oracle` and `world pretrain` wrote the shipped oracle and base; a render pool file is cheap."""
    import argparse

    from lorafuse.cli.world import oracle_file_bytes, pretrain_bytes
    from lorafuse.models.world import default_base_path
    from lorafuse.world.catalog import all_individuals
    from lorafuse.world.oracle import default_oracle_path
    from lorafuse.world.pool import pool_file_bytes, render_pool, save_pool

    oracle = default_oracle_path().stat().st_size
    assert oracle <= oracle_file_bytes() <= 2 * oracle
    pipeline, _ = pretrain_bytes(argparse.Namespace(work=tmp_path, pool=8, caption_ft_steps=0))
    assert _du(default_base_path()) <= pipeline <= 2 * _du(default_base_path())
    save_pool(render_pool(3, all_individuals()[:2], ["ink", "flat"], seed=0), tmp_path / "pool.npz")
    assert (tmp_path / "pool.npz").stat().st_size <= pool_file_bytes(3)


@pytest.mark.parametrize("every", [1, 2, 3])
@pytest.mark.parametrize("last_n", [None, 1, 2, 5])
def test_the_training_estimate_counts_the_saves_the_rotation_keeps(tmp_path, every, last_n):
    """The most LoRA files and states alive at once, replayed through the run's own `SaveRotation` (step saves
    and epoch saves, as the loop makes them), is never more than the estimate counts."""
    from lorafuse.train.config import DatasetConfig, ModelConfig, TrainConfig, TrainingConfig
    from lorafuse.train.disk_estimate import _save_counts
    from lorafuse.train.saving import SaveRotation

    for batches, steps in ((1, 12), (3, 12)):
        training = TrainingConfig(output_dir=tmp_path, max_train_steps=steps, save_every_n_steps=every,
                                  save_last_n_steps=last_n, save_every_n_epochs=every, save_last_n_epochs=last_n,
                                  save_state=True, save_last_n_steps_state=last_n)  # fmt: skip
        cfg = TrainConfig(ModelConfig("world-random"), DatasetConfig(train_data_dir=tmp_path), training=training)
        loras, states, _, total = _save_counts(cfg, batches)
        rotation, alive, most, k = SaveRotation(last_n, last_n), set(), 0, 0
        for step in range(1, total + 1):  # `on_step_end` and `on_epoch_end`
            for kind, n in (("step", step), ("epoch", step // batches if step % batches == 0 else 0)):
                if n and n % every == 0 and (step < total if kind == "step" else n < total // batches):
                    path = tmp_path / f"{kind}{k}"
                    path.touch()
                    k += 1
                    alive.add(path)
                    most = max(most, len(alive) + 1)  # the final file comes on top
                    alive -= set(getattr(rotation, f"add_{kind}")(n, path))
        assert most <= loras and most <= states, (batches, most, loras, states)


def test_a_base_its_configs_cannot_size_is_checked_once_loaded_before_any_step(cli, tmp_path, inputs, monkeypatch):
    """train and craft backbone: when the base's architecture cannot be read without loading it, the real
    network (the real UNet) is sized right after it is built, before any cache, data or step."""
    import lorafuse.backbone.train as backbone
    import lorafuse.models.meta as meta
    import lorafuse.train.prepare as prepare
    from lorafuse.errors import UserInputError

    def unknown(name):
        raise UserInputError(f"{name}: cannot tell the architecture without loading it")

    argv = _backbone_config(tmp_path, tmp_path / "bb")
    monkeypatch.setattr(meta, "meta_components", unknown)
    monkeypatch.setattr(prepare, "_build_caches", lambda run: pytest.fail("the run went on"))
    monkeypatch.setattr(backbone, "prepare_data", lambda *a, **k: pytest.fail("the run went on"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(10**9, 10**9 - 1000, 1000))
    cli.refused(argv, str(tmp_path / "bb"), "not enough disk space", watch=tmp_path)
    out = tmp_path / "out"
    cli.refused(_argv("train", out, inputs, None), str(out), "not enough disk space", watch=tmp_path)
    # the same when the base is readable but its network cannot be built on the meta device
    monkeypatch.undo()
    import lorafuse.train.estimate as estimate

    def meta_fails(*a):
        raise RuntimeError("Cannot copy out of meta tensor; no data!")

    monkeypatch.setattr(estimate, "_lora", meta_fails)
    monkeypatch.setattr(prepare, "_build_caches", lambda run: pytest.fail("the run went on"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _Usage(10**9, 10**9 - 1000, 1000))
    cli.refused(_argv("train", out, inputs, None), str(out), "not enough disk space", watch=tmp_path)
