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


def test_builtin_base_names_match_the_loader():
    from lorafuse.models.load import BUILTIN_BASES
    from lorafuse.ui.workspace import BUILTIN_BASES as ui_names

    assert set(ui_names) == set(BUILTIN_BASES)


def test_a_base_model_is_a_builtin_name_or_a_workspace_path(ws, tmp_path):
    assert ws.base_model("sd15-tiny") == "sd15-tiny"
    (ws.root / "bases" / "mine").mkdir()
    assert ws.base_model("bases/mine/") == "bases/mine"
    for bad, message in [("/etc", "absolute paths are refused"), ("../x", "'..' is refused"),
                         ("runwayml/stable-diffusion-v1-5", "no such file or folder in the workspace"),
                         ("bases/old.ckpt", "pickle files can run code")]:  # fmt: skip
        if bad.endswith(".ckpt"):
            (ws.root / bad).write_bytes(b"x")
        with pytest.raises(UserInputError, match=message) as e:
            ws.base_model(bad)
        said = str(e.value)
        assert (said.startswith("base (one of world, ") or said.startswith(bad)) and "\n" not in said


def test_every_path_option_of_the_train_form_stays_in_the_workspace(ws, tmp_path):
    """The generated form holds options naming files the run reads (base model, LoRA to start from, regularisation
    images, FLUX.1 part files) and writes (latent cache): each is confined like every other path on the page."""
    from lorafuse.train.options import options
    from lorafuse.ui.tab_train import PAGE_SET, checked_paths

    opts = [o for o in options() if o.key not in PAGE_SET]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    (ws.root / "loras" / "start.safetensors").write_bytes(b"x")
    (ws.root / "loras" / "link.safetensors").symlink_to(outside)
    ok = checked_paths(ws, opts, {"model.pretrained_model_name_or_path": "world", "network.network_weights":
                                  "loras/start.safetensors", "dataset.cache_dir": "cache/new", "training.seed": "3"})
    assert ok == {"model.pretrained_model_name_or_path": "world", "network.network_weights": "loras/start.safetensors",
                  "dataset.cache_dir": "cache/new", "training.seed": "3"}  # fmt: skip
    keys = ["model.pretrained_model_name_or_path", "model.ae", "model.clip_l", "model.t5xxl", "model.tokenizers",
            "dataset.reg_data_dir", "dataset.cache_dir", "network.network_weights", "network.lycoris_preset"]  # fmt: skip
    for key in keys:
        for bad, message in [(str(outside), "absolute paths"), ("../x", "'..' is refused"),
                             ("loras/link.safetensors", "symlink leads outside")]:  # fmt: skip
            with pytest.raises(UserInputError, match=message) as e:
                checked_paths(ws, opts, {key: bad})
            assert key in str(e.value)
    paths = {o.key for o in opts if "Path" in str(o.type)}
    assert paths <= set(keys), f"a new path option is not checked here: {paths - set(keys)}"


def test_a_lycoris_preset_is_a_name_or_a_file_in_the_workspace(ws, tmp_path):
    """network.lycoris_preset names one of LyCORIS's presets, or a preset TOML file the run reads: that file is
    confined like every other path, and its check is repeated as the job starts (it is one of the job's inputs)."""
    from lorafuse.train.options import options
    from lorafuse.ui.tab_train import LYCORIS_PRESETS, PAGE_SET, _is_input, checked_paths

    opts = [o for o in options() if o.key not in PAGE_SET]
    for name in LYCORIS_PRESETS:
        assert checked_paths(ws, opts, {"network.lycoris_preset": name}) == {"network.lycoris_preset": name}
        assert not _is_input(opts, "network.lycoris_preset", name)
    (ws.root / "presets").mkdir()
    (ws.root / "presets" / "mine.toml").write_text("enable_conv = true\n")
    ok = checked_paths(ws, opts, {"network.lycoris_preset": "presets/mine.toml"})
    assert ok == {"network.lycoris_preset": "presets/mine.toml"} and _is_input(opts, "network.lycoris_preset", "x")
    outside = tmp_path / "evil.toml"
    outside.write_text("")
    with pytest.raises(UserInputError, match="network.lycoris_preset.*absolute paths are refused"):
        checked_paths(ws, opts, {"network.lycoris_preset": str(outside)})
    config = pytest.importorskip("lycoris.config")
    assert set(LYCORIS_PRESETS) == set(config.PRESET)  # the page's list is LyCORIS's


def test_listings_survive_a_job_writing_at_the_same_time(ws, monkeypatch):
    """A job's atomic write leaves `.lorafuse-tmp-*` for a moment, then renames it: a listing must neither show it
    nor fail when a file it saw is gone by the time of its stat (the restarted page once died building the
    Compare tab this way, while the continued run saved a checkpoint)."""
    from pathlib import Path

    from lorafuse.ui.tab_tools import lora_files

    run = ws.root / "runs" / "teapot"
    run.mkdir()
    (run / "teapot-000001.safetensors").write_bytes(b"x")
    (run / ".lorafuse-tmp-1560-743092-teapot-000016.safetensors").write_bytes(b"x")
    (run / "teapot-000002.safetensors").write_bytes(b"x")
    assert sorted(lora_files(ws)) == ["runs/teapot/teapot-000001.safetensors", "runs/teapot/teapot-000002.safetensors"]
    real_stat = Path.stat
    seen = []

    def vanishing(self, *a, **k):  # teapot-000002 is there for its first stat (is_file), gone for the next
        if self.name == "teapot-000002.safetensors":
            seen.append(self)
            if len(seen) > 1:
                raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_stat(self, *a, **k)

    monkeypatch.setattr(Path, "stat", vanishing)
    assert lora_files(ws) == ["runs/teapot/teapot-000001.safetensors"]
    assert len(seen) >= 2
    (ws.root / "datasets" / ".lorafuse-tmp-1-2-new").mkdir()
    assert ws.list_dirs("datasets") == []


def test_a_folder_a_job_reads_has_no_symlink_out(ws, tmp_path):
    """A dataset (or model folder) is read by the queued command, which follows symlinks: one inside it that leads
    out of the workspace, at any depth, is refused before the job is queued; symlinks that stay inside are fine."""
    from lorafuse.train.options import options
    from lorafuse.ui.tab_train import PAGE_SET, config_for

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    subset = ws.root / "datasets" / "dog" / "10_sks dog"
    subset.mkdir(parents=True)
    (subset / "a.png").write_bytes(b"x")
    (ws.root / "photos").mkdir()
    (ws.root / "photos" / "b.png").write_bytes(b"x")
    (subset / "b.png").symlink_to(ws.root / "photos" / "b.png")  # inside: fine
    assert ws.input_file("datasets/dog", "dataset") == "datasets/dog"
    (ws.root / "photos" / "c.png").symlink_to(outside / "secret.png")
    (subset / "more").symlink_to(ws.root / "photos")  # a folder inside that holds a symlink out
    with pytest.raises(WorkspacePathError, match=r"^dataset: photos/c.png: a symlink leads outside"):
        ws.input_file("datasets/dog", "dataset")
    (subset / "more").unlink()
    (subset / "deep").mkdir()
    (subset / "deep" / "d.png").symlink_to(outside / "secret.png")
    opts = [o for o in options() if o.key not in PAGE_SET]
    with pytest.raises(WorkspacePathError, match=r"datasets/dog/10_sks dog/deep/d.png: a symlink leads outside"):
        config_for(ws, opts, "datasets/dog", "run", [o.default for o in opts])  # refused before any work
