"""The workspace confinement and upload checks of `lorafuse ui`."""

from __future__ import annotations

import pytest

from lorafuse.errors import UserInputError
from lorafuse.ui.workspace import Workspace, WorkspacePathError


@pytest.fixture
def ws(tmp_path):
    return Workspace.create(tmp_path / "ws")


def test_inside_paths_resolve(ws):
    assert ws.resolve("datasets/a/b.png") == ws.root / "datasets" / "a" / "b.png"
    assert ws.resolve("./runs") == ws.root / "runs"
    (ws.root / "runs" / "inner").symlink_to(ws.root / "datasets")  # a symlink that stays inside is fine
    assert ws.resolve("runs/inner") == ws.root / "datasets"


@pytest.mark.parametrize("path", ["../outside", "datasets/../../x", "/etc/passwd", "C:\\x", "", "a\x00b"])
def test_escapes_are_refused(ws, path):
    with pytest.raises(WorkspacePathError):
        ws.resolve(path)


def test_symlink_out_is_refused(ws, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (ws.root / "datasets" / "link").symlink_to(outside)
    with pytest.raises(WorkspacePathError, match="symlink leads outside the workspace"):
        ws.resolve("datasets/link/file.txt")
    assert "datasets/link" not in ws.list_dirs("datasets")


def test_pickle_needs_the_opt_in(ws, tmp_path):
    path = ws.resolve("loras/x.ckpt")
    with pytest.raises(UserInputError, match="--allow-pickle"):
        ws.check_pickle(path)
    Workspace(ws.root, allow_pickle=True).check_pickle(path)
    ws.check_pickle(ws.resolve("loras/x.safetensors"))
