"""Every command that writes (14 writers): the same refusals of an output path they cannot use (the wrong kind, under
a file, not writable, read-only), each before any model loads, and files and folders with the umask's modes."""

from __future__ import annotations

import errno
import os

import pytest

from lorafuse.utils.atomic import TMP_PREFIX


def _writer_argv(name, out, inputs, loras):
    lora, other = loras["sd15"], loras["sd15b"]
    return {
        "merge": ["merge", lora, other, "--out", out],
        "resize": ["resize", lora, "--rank", "1", "--out", out],
        "convert": ["convert", lora, "--to", "diffusers", "--arch", "sd15", "--out", out],
        "report": ["report", inputs / "run", "--out", out],
        "config import": ["config", "import", inputs / "kohya.toml", "--out", out],
        "world render": ["world", "render", "teapot_08", "--n", "1", "--out", out],
        "bake": ["bake", "--base", "sd15-tiny", "--lora", lora, "--out", out],
        "fuse": ["fuse", "--content", lora, "--style", other, "--prompt", "a dog", "--method", "direct",
                 "--base", "sd15-tiny", "--steps", "2", "--num-images", "1", "--no-progress", "--out", out],
        "grid": ["grid", inputs / "grid.toml", "--out", out, "--no-progress"],
        "train": ["train", "--pretrained_model_name_or_path", "world-random", "--train_data_dir", inputs / "ds",
                  "--resolution", "64", "--network_dim", "4", "--max_train_steps", "1", "--output_dir", out,
                  "--no-progress"],
        "world dataset": ["world", "dataset", out, "--subject", "teapot_08", "--n", "2"],
        "dataset add": ["dataset", "add", out, inputs / "imgs", "--class", "dog"],
        "craft pairs": ["craft", "pairs", "--out", out, "--content", "teapot_08", "--style", "ink"],
        "demo": ["demo", "--out", out, "--seeds", "1", "--steps", "2", "--methods", "direct", "--no-progress"],
    }[name]  # fmt: skip


FILE_WRITERS = ["merge", "resize", "convert", "report", "config import", "world render"]
FOLDER_WRITERS = ["bake", "fuse", "grid", "train", "world dataset", "dataset add", "craft pairs", "demo"]
SUFFIX = {"report": ".html", "config import": ".toml", "world render": ".png"}


def _out_name(writer):
    return "out" + SUFFIX.get(writer, ".safetensors") if writer in FILE_WRITERS else "out"


@pytest.mark.parametrize("writer", FILE_WRITERS + FOLDER_WRITERS)
def test_every_writer_refuses_the_wrong_kind_of_path(cli, tmp_path, inputs, lora_files, no_model, writer):
    out = tmp_path / _out_name(writer)
    if writer in FILE_WRITERS:
        out.mkdir()
        (out / "keep.txt").write_text("the user's")
        expected = "is an existing folder"
    else:
        out.write_text("the user's file")
        expected = "is an existing file, but a folder is needed"
    if writer == "bake":
        expected = "already exists"  # a baked model is never overwritten, whatever is there
    cli.refused(_writer_argv(writer, out, inputs, lora_files), str(out), expected, watch=tmp_path)


@pytest.mark.parametrize("writer", FILE_WRITERS + FOLDER_WRITERS)
def test_every_writer_refuses_a_path_under_a_file(cli, tmp_path, inputs, lora_files, no_model, writer):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / _out_name(writer)
    cli.refused(_writer_argv(writer, out, inputs, lora_files), str(out), f"{tmp_path / 'afile'} is a file, not a folder",
                watch=tmp_path)  # fmt: skip


@pytest.mark.parametrize("error", [errno.EACCES, errno.EROFS], ids=["permission-denied", "read-only"])
@pytest.mark.parametrize("writer", FILE_WRITERS + FOLDER_WRITERS)
def test_every_writer_refuses_a_folder_it_cannot_write(cli, tmp_path, inputs, lora_files, no_model, monkeypatch,
                                                       writer, error):  # fmt: skip
    """As root neither chmod nor a read-only mount can be set up portably: creating files there fails as the OS
    would make it fail (a real read-only tmpfs and a real non-root user give the same lines: see the notes)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(real):
        def call(path, *args, **kwargs):
            if str(path).startswith(str(locked)):
                raise OSError(error, os.strerror(error), str(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "open", refuse(real_open))
    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    out = locked / _out_name(writer)
    reason = "permission denied" if error == errno.EACCES else "read-only file system"
    cli.refused(_writer_argv(writer, out, inputs, lora_files), str(out), "cannot write", reason, watch=tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_have_the_umask_permissions(cli, tmp_path, inputs, lora_files, tiny_lora, umask):
    """LoRA files, a baked pipeline folder, a dataset, and everything train writes (LoRAs, states, logs, the
    effective config): files 0666 and folders 0777 minus the umask, as any program's."""
    old = os.umask(umask)
    try:
        runs = {w: tmp_path / w.replace(" ", "_") / _out_name(w) for w in ("merge", "bake", "world dataset", "train")}
        for writer, out in runs.items():
            argv = _writer_argv(writer, out, inputs, {**lora_files, "sd15": tiny_lora} if writer == "bake" else lora_files)
            if writer == "train":
                argv += ["--save_state", "--save_every_n_steps", "1", "--max_train_steps", "2"]
            code, _, err = cli(*argv)
            assert code == 0, (writer, err)
    finally:
        os.umask(old)
    for writer, out in runs.items():
        paths = [out, *out.rglob("*")] if out.is_dir() else [out]
        modes = {(p.is_dir(), p.stat().st_mode & 0o777) for p in paths}
        assert modes <= {(False, 0o666 & ~umask), (True, 0o777 & ~umask)}, (writer, modes)
    assert any((runs["train"]).glob("*-state")), "no training state was written"


def test_training_disk_full_at_a_later_save(cli, tmp_path, inputs, monkeypatch):
    """The disk fills up during a run: the save that fails is one error naming its file; the LoRA and state
    saved before stay whole, nothing half-written or temporary is left, and the run resumes from that state."""
    import lorafuse.utils.atomic as atomic
    from lorafuse.lora.io import load_lora

    real, calls = atomic.safetensors_bytes_to, []

    def fill_up(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the LoRA files through it (a state's LoRA goes through checkpoint's own import)
            with open(path, "wb") as f:
                f.write(b"part of a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(atomic, "safetensors_bytes_to", fill_up)
    out = tmp_path / "run"
    argv = _writer_argv("train", out, inputs, {"sd15": None, "sd15b": None})
    argv += ["--save_state", "--save_every_n_steps", "1", "--max_train_steps", "3", "--output_name", "r"]
    msg = cli.refused(argv, "the disk is full", "nothing was written under this name")
    assert str(out / "r-step00000002.safetensors") in msg
    assert load_lora(out / "r-step00000001.safetensors").modules
    assert not [p for p in out.rglob("*") if p.name.startswith((TMP_PREFIX, ".tmp"))]
    monkeypatch.setattr(atomic, "safetensors_bytes_to", real)
    code, _, err = cli(*argv, "--resume", out / "r-step00000001-state")
    assert code == 0, err
    assert load_lora(out / "r.safetensors").modules
