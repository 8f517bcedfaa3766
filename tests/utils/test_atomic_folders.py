"""`atomic_folder` and the helpers around it: a replaced folder is swapped whole, a kill between the two renames of
the fallback path leaves the old folder (put back by the next sweep), links are written through, and the folders
a failed command created are removed again when empty."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import lorafuse.utils.atomic as atomic
from lorafuse.errors import OutputError
from lorafuse.utils.atomic import TMP_PREFIX, atomic_folder, check_output, sweep_stale


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("exchange", [True, False], ids=["one-step-swap", "two-renames"])
def test_an_existing_folder_is_replaced_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_folder(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
    assert _tree(final) == {"sub/new.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_folder_write_keeps_the_old_one(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(final) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("the write failed")
    assert _tree(final) == {"old.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
import lorafuse.utils.atomic as atomic
atomic._exchange = lambda a, b: False  # a file system without the one-step swap
real = os.replace
def replace(src, dst):
    real(src, dst)
    if ".old-" in str(dst):  # the old folder is aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
atomic.os.replace = replace
with atomic.atomic_folder(Path(sys.argv[1])) as tmp:
    (tmp / "new.txt").write_text("new")
"""


def test_a_kill_between_the_two_renames_leaves_the_old_folder(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    proc = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(final)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not final.exists()  # the moment the kill hit: both folders under temporary names
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]) == 2
    sweep_stale(tmp_path)  # what the next write in this folder does first
    assert _tree(final) == {"old.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_live_writers_aside_folder_is_left_alone(tmp_path):
    live = tmp_path / f"{TMP_PREFIX}{os.getppid()}-abcdef.old-model"
    live.mkdir()
    sweep_stale(tmp_path)
    assert live.is_dir() and not (tmp_path / "model").exists()


def test_a_symlinked_output_folder_keeps_its_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with atomic_folder(tmp_path / "link") as tmp:
        (tmp / "new.txt").write_text("new")
    assert (tmp_path / "link").is_symlink() and _tree(tmp_path / "real") == {"new.txt": "new"}


def test_check_output_through_a_link_names_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match=r"link\.safetensors \(a link to .*real\): the output path is an existing folder"):
        check_output(tmp_path / "link.safetensors")


def test_created_folders_go_again_when_empty(tmp_path):
    atomic.forget_created_folders()
    check_output(tmp_path / "a" / "b" / "out", kind="folder")
    check_output(tmp_path / "kept" / "out", kind="folder")
    (tmp_path / "a" / "b" / "out" / "sub").mkdir(parents=True)  # folders only: nothing was written
    (tmp_path / "kept" / "out").mkdir(parents=True)
    (tmp_path / "kept" / "out" / "whole.png").write_bytes(b"a finished file")
    (tmp_path / "existing").mkdir()
    check_output(tmp_path / "existing", kind="folder")  # was there before: never removed
    atomic.discard_created_folders()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "kept"]
    assert (tmp_path / "kept" / "out" / "whole.png").is_file()


@pytest.mark.skipif(atomic._started_at(os.getpid()) is None, reason="process start times come from Linux's /proc")
def test_a_reused_pid_does_not_keep_a_dead_writers_temporary(tmp_path):
    """After a restart a killed run's pid may belong to a running process: a temporary older than that process
    cannot be its, and goes; one made since it started is kept."""
    old = tmp_path / f"{TMP_PREFIX}{os.getpid()}-abcdef-out.safetensors"
    old.write_bytes(b"left by a run killed before this process started")
    started = atomic._started_at(os.getpid())
    os.utime(old, (started - 3600, started - 3600))
    live = tmp_path / f"{TMP_PREFIX}{os.getpid()}-123456-other.safetensors"
    live.write_bytes(b"being written")
    assert sweep_stale(tmp_path) == [old]
    assert [p.name for p in tmp_path.iterdir()] == [live.name]


def test_a_long_valid_name_gets_a_temporary_that_fits(tmp_path):
    name = "x" * 250 + ".png"  # 254 bytes: allowed, but not with the temporary's prefix in front
    atomic.atomic_write_bytes(tmp_path / name, b"png")
    assert [p.name for p in tmp_path.iterdir()] == [name]
    with pytest.raises(OutputError, match="name is 260 bytes long"):
        check_output(tmp_path / ("y" * 256 + ".png"))


def test_a_device_or_fifo_is_never_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="a named pipe"):
        check_output(fifo)
    with pytest.raises(OutputError, match="is a named pipe"):
        atomic.atomic_write_text(fifo, "x")
    assert fifo.is_fifo()
    with pytest.raises(OutputError, match="/dev/null: the output path is a character device"):
        check_output("/dev/null")


def test_another_hosts_temporaries_wait_a_day(tmp_path):
    """On a folder shared between machines (NFS, one volume in two containers) a pid says nothing: another
    host's temporary is kept while it may still be written, and swept once a day old."""
    import time

    other = "0000" if atomic.HOST != "0000" else "ffff"
    young = tmp_path / f"{TMP_PREFIX}999999999-{other}abcdef-a.safetensors"
    old = tmp_path / f"{TMP_PREFIX}999999999-{other}123456-b.safetensors"
    ours = tmp_path / f"{TMP_PREFIX}999999999-{atomic.HOST}abcdef-c.safetensors"  # this host's, writer dead
    for p in (young, old, ours):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    assert sorted(p.name for p in sweep_stale(tmp_path)) == sorted([old.name, ours.name])
    assert [p.name for p in tmp_path.iterdir()] == [young.name]
    assert atomic.tmp_name(tmp_path / "x").name.startswith(f"{TMP_PREFIX}{os.getpid()}-{atomic.HOST}")
