"""Output paths: refused before any work when they cannot be written; a full disk is one error with nothing
partial left; temporaries carry a recognisable prefix, go on every error path, and stale ones are swept."""

from __future__ import annotations

import errno
import os
import shutil
from collections import namedtuple

import pytest
import torch

from lorafuse.utils.atomic import TMP_PREFIX


def _tools(lora_files, out, what):
    src = lora_files["sd15"]
    return {
        "merge": ["merge", src, lora_files["sd15b"], "--out", out],
        "resize": ["resize", src, "--rank", "1", "--out", out],
        "convert": ["convert", src, "--to", "diffusers", "--arch", "sd15", "--out", out],
    }[what]


TOOLS = ["merge", "resize", "convert"]


@pytest.mark.parametrize("tool", TOOLS)
def test_output_is_an_existing_folder(cli, tmp_path, lora_files, tool):
    (tmp_path / "out.safetensors").mkdir()
    cli.refused(_tools(lora_files, tmp_path / "out.safetensors", tool), "out.safetensors", "existing folder",
                watch=tmp_path)  # fmt: skip


@pytest.mark.parametrize("tool", TOOLS)
def test_output_under_a_file(cli, tmp_path, lora_files, tool):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out.safetensors"
    cli.refused(_tools(lora_files, out, tool), str(out), "is a file, not a folder", watch=tmp_path)


@pytest.mark.parametrize("tool", TOOLS)
def test_output_folder_not_writable(cli, tmp_path, lora_files, tool, monkeypatch):
    """As root a chmod does not stop writes, so creating files there is made to fail as it would."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(locked)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    out = locked / "out.safetensors"
    cli.refused(_tools(lora_files, out, tool), str(out), "cannot write", "permission denied", watch=tmp_path)


@pytest.mark.parametrize("tool", TOOLS)
def test_no_space_for_the_estimate(cli, tmp_path, lora_files, tool, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out.safetensors"
    msg = cli.refused(_tools(lora_files, out, tool), str(out), "not enough disk space", watch=tmp_path)
    assert "0 MB" not in msg.split("headroom")[0], msg  # a small LoRA's size reads in kB, not as 0 MB


@pytest.mark.parametrize("tool", TOOLS)
def test_disk_full_during_the_write(cli, tmp_path, lora_files, tool, monkeypatch):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous output")

    def full(path, tensors, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lorafuse.utils.atomic.safetensors_bytes_to", full)
    cli.refused(_tools(lora_files, out, tool), str(out), "the disk is full", "nothing was written", watch=tmp_path)
    assert out.read_bytes() == b"the previous output"


def test_written_lora_has_umask_permissions(cli, tmp_path, lora_files):
    umask = os.umask(0o022)
    try:
        code, _, err = cli(*_tools(lora_files, tmp_path / "out.safetensors", "merge"))
    finally:
        os.umask(umask)
    assert code == 0, err
    assert (tmp_path / "out.safetensors").stat().st_mode & 0o777 == 0o644


def test_stale_temporaries_are_swept_live_ones_kept(cli, tmp_path, lora_files):
    dead = tmp_path / f"{TMP_PREFIX}999999999-abcdef-out.safetensors"
    dead.write_bytes(b"left by kill -9")
    dead_dir = tmp_path / f"{TMP_PREFIX}999999998-abcdef-state"
    dead_dir.mkdir()
    (dead_dir / "lora.safetensors").write_bytes(b"half")
    live = tmp_path / f"{TMP_PREFIX}{os.getppid()}-abcdef-other.safetensors"  # a running process's
    live.write_bytes(b"being written")
    code, _, err = cli(*_tools(lora_files, tmp_path / "out.safetensors", "merge"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.safetensors", live.name])


def test_error_after_the_write_began_leaves_no_temporary(tmp_path, monkeypatch):
    from lorafuse.utils.atomic import atomic_path

    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_fuse_output_is_a_file(cli, tmp_path, lora_files):
    (tmp_path / "out").write_text("not a folder")
    argv = ["fuse", "--content", lora_files["sd15"], "--style", lora_files["sd15b"], "--prompt", "a dog <c>",
            "--method", "direct", "--out", tmp_path / "out"]  # fmt: skip
    cli.refused(argv, str(tmp_path / "out"), "existing file, but a folder is needed", watch=tmp_path)


def test_fuse_missing_lora_before_the_base_loads(cli, tmp_path, lora_files):
    argv = ["fuse", "--content", tmp_path / "none.safetensors", "--style", lora_files["sd15b"], "--prompt", "a",
            "--method", "direct", "--out", tmp_path / "out"]  # fmt: skip
    cli.refused(argv, "none.safetensors: LoRA file not found", watch=tmp_path)


def test_train_output_dir_is_a_file(cli, tmp_path):
    from lorafuse.world.dataset import write_subject_dataset

    write_subject_dataset("robot_09", tmp_path / "ds", n=1, repeats=1)
    (tmp_path / "out").write_text("a file")
    argv = ["train", "--pretrained_model_name_or_path", "world-random", "--train_data_dir", tmp_path / "ds",
            "--resolution", "64", "--output_dir", tmp_path / "out", "--max_train_steps", "1"]  # fmt: skip
    cli.refused(argv, str(tmp_path / "out"), "existing file, but a folder is needed", watch=tmp_path)


def test_report_on_an_empty_folder(cli, tmp_path):
    (tmp_path / "run").mkdir()
    cli.refused(["report", tmp_path / "run"], str(tmp_path / "run"), "nothing to report", watch=tmp_path)


def test_report_out_is_a_folder(cli, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "grid.png").write_bytes(b"")
    (tmp_path / "page.html").mkdir()
    cli.refused(["report", tmp_path / "run", "--out", tmp_path / "page.html"], "page.html", "existing folder",
                watch=tmp_path)  # fmt: skip


def test_training_state_on_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports a full disk only as 'file write failed': with (almost) no space left that is one
    OutputError too, and the half-written state folder is gone."""

    from lorafuse.errors import OutputError
    from lorafuse.train import checkpoint

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    kwargs = dict(lora={"unet.x": param}, optimizer=optimizer,
                  lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                  generator=torch.Generator(), progress=checkpoint.Progress(0, 1, 1), config={})  # fmt: skip
    usage = namedtuple("usage", "total used free")

    def full(*args, **kw):
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 0))
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")  # fmt: skip

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(OutputError, match=r"run-state: the disk is full"):
        checkpoint.save_train_state(tmp_path / "run-state", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_bake_output_checked_before_the_base_loads(cli, tmp_path, lora_files, monkeypatch):
    import lorafuse.models.load as load

    monkeypatch.setattr(load, "load_base_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
    (tmp_path / "afile").write_text("x")
    cli.refused(["bake", "--base", "sd15-tiny", "--lora", lora_files["sd15"], "--out", tmp_path / "afile" / "m"],
                "afile", "is a file, not a folder", watch=tmp_path)  # fmt: skip
    cli.refused(["bake", "--base", "sd15-tiny", "--lora", tmp_path / "none.safetensors", "--out", tmp_path / "m"],
                "none.safetensors: LoRA file not found", watch=tmp_path)  # fmt: skip


def test_a_symlinked_output_file_is_written_through(cli, tmp_path, lora_files):
    """As `cp` and a shell's `>`: the link stays and its target gets the new file (kohya's save_file would
    replace the link by a file; lorafuse keeps one rule for files and folders)."""
    from lorafuse.lora.io import load_lora

    target = tmp_path / "store" / "real.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"the previous file")
    link = tmp_path / "latest.safetensors"
    link.symlink_to(target)
    code, _, err = cli(*_tools(lora_files, link, "merge"))
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == target
    assert len(load_lora(target).modules) == 4
    assert sorted(p.name for p in target.parent.iterdir()) == ["real.safetensors"]


def test_a_symlinked_dataset_folder_is_written_through(cli, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, _, err = cli("world", "dataset", tmp_path / "link", "--subject", "teapot_08", "--n", "1")
    assert code == 0, err
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "world_dataset.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_non_ascii_and_spaces_in_output_paths(cli, tmp_path, lora_files):
    folder = tmp_path / "ünï cödé 日本"
    code, _, err = cli(*_tools(lora_files, folder / "out put.safetensors", "merge"))
    assert code == 0, err
    code, _, err = cli("world", "dataset", folder / "data set", "--subject", "teapot_08", "--n", "1")
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["data set", "out put.safetensors"]


def test_ctrl_c_during_a_write_leaves_nothing(cli, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a dataset: one line, exit 130, no traceback, no half dataset, no temporaries."""
    import lorafuse.world.dataset as dataset

    calls = []
    real = dataset.render

    def render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset, "render", render)
    code, _, err = cli("world", "dataset", tmp_path / "new" / "ds", "--subject", "teapot_08", "--n", "4")
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["lorafuse world: interrupted (Ctrl-C); finished files were kept, nothing "
                                        "half-written was left"]  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # the folders this run created went too


def test_disk_full_in_the_middle_of_a_folder(cli, tmp_path, monkeypatch):
    from PIL import Image

    calls = []
    real = Image.Image.save

    def save(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            with open(fp, "wb") as f:
                f.write(b"half an image")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "new" / "ds"
    cli.refused(["world", "dataset", out, "--subject", "teapot_08", "--n", "4"], str(out), "the disk is full")
    assert list(tmp_path.iterdir()) == []


def test_bake_checks_the_space_for_the_bases_size_before_it_loads(cli, tmp_path, lora_files, no_model, monkeypatch):
    base = tmp_path / "base"
    (base / "unet").mkdir(parents=True)
    (base / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 300_000)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    out = tmp_path / "baked"
    cli.refused(["bake", "--base", base, "--lora", lora_files["sd15"], "--out", out], str(out),
                "not enough disk space", "about 293 kB", watch=tmp_path)  # fmt: skip


def test_a_read_only_dataset_with_disk_caches_is_refused_before_the_base_loads(cli, tmp_path, no_model, monkeypatch):
    """cache_latents_to_disk writes beside the images: a dataset there is no writing to fails at the start."""
    from lorafuse.world.dataset import write_subject_dataset

    folder = write_subject_dataset("robot_09", tmp_path / "ds", n=1, repeats=1)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    argv = ["train", "--pretrained_model_name_or_path", "world-random", "--train_data_dir", tmp_path / "ds",
            "--resolution", "64", "--max_train_steps", "1", "--output_dir", tmp_path / "out", "--cache_latents",
            "--cache_latents_to_disk"]  # fmt: skip
    cli.refused(argv, str(folder), "cannot write the disk cache", "read-only file system", watch=tmp_path)


def test_an_os_write_error_outside_the_helpers_is_one_line(cli, tmp_path, monkeypatch):
    """`dataset subset` renames the folder itself: a read-only dataset gives the OS's reason and the path."""
    from pathlib import Path

    (tmp_path / "ds" / "10_sks dog").mkdir(parents=True)

    def rename(self, target):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "rename", rename)
    cli.refused(["dataset", "subset", tmp_path / "ds", "10_sks dog", "--repeats", "5"],
                str(tmp_path / "ds" / "10_sks dog"), "read-only file system", watch=tmp_path)  # fmt: skip


def test_disk_full_while_appending_the_training_log(tmp_path, monkeypatch):
    import builtins

    from lorafuse.errors import OutputError
    from lorafuse.train.run_log import RunLog

    log = RunLog(tmp_path / "r.csv")
    log.log({"step": 1, "epoch": 0, "loss": 0.5, "loss_avg": 0.5})
    real_open = builtins.open

    def full(path, mode="r", *args, **kwargs):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(OutputError, match=r"r\.csv: the disk is full; the log ends before step 2"):
        log.log({"step": 2, "epoch": 0, "loss": 0.4, "loss_avg": 0.45})


def test_a_stopped_training_stops_the_command_that_asked_for_the_lora(tmp_path, monkeypatch):
    """The demo trains its LoRAs through train_world_lora: Ctrl-C stops that training cleanly (a state is saved),
    and must then stop the demo too, which carried on with a missing LoRA before."""
    import lorafuse.train.loop as loop
    from lorafuse.train.prepare import TrainResult
    from lorafuse.train.world_personalize import subject_recipe, train_world_lora

    def stopped(cfg, progress_bar=True):
        result = TrainResult(lora_path=tmp_path / "x-step00000003.safetensors", global_step=3, total_steps=10)
        result.stopped = True
        return result

    monkeypatch.setattr(loop, "train_lora", stopped)
    with pytest.raises(KeyboardInterrupt):
        train_world_lora(subject_recipe("teapot_08", epochs=1), tmp_path, progress=False)
