"""The grid files the Fuse and Compare tabs write are what `lorafuse grid` reads: LoRA paths relative to the file,
world names for the oracle found from the LoRA's run config and its world dataset."""

from __future__ import annotations

import json

import pytest

from lorafuse.errors import UserInputError
from lorafuse.eval.grid_config import load_grid_config
from lorafuse.ui import grids
from lorafuse.ui.workspace import Workspace


def test_compare_grid_round_trips_through_the_cli_loader(tmp_path):
    ws = Workspace.create(tmp_path / "ws")
    (ws.root / "datasets" / "teapot").mkdir()
    (ws.root / "datasets" / "teapot" / "world_dataset.json").write_text(json.dumps({"kind": "subject",
                                                                                  "individual": "teapot_08"}))
    run = ws.root / "runs" / "teapot"
    run.mkdir()
    (run / "config.toml").write_text('[dataset]\ntrain_data_dir = "datasets/teapot"\n')
    for name in ("teapot-000001.safetensors", "teapot.safetensors"):
        (run / name).write_bytes(b"")
    ckpts = ["runs/teapot/teapot-000001.safetensors", "runs/teapot/teapot.safetensors"]
    names = grids.world_names(ws, ckpts[0])
    assert names == {"individual": "teapot_08"}
    axes = {"base": ["world"], "checkpoint": list(ckpts), "lora_weight": [0.5, 1.0], "steps": [2], "seed": [0]}
    config, out = grids.write_grid(ws, "grids", "g1", prompt="a photo of a sks teapot", axes=axes,
                                   metrics={**names, "cross_influence": False})  # fmt: skip
    assert (config, out) == ("grids/g1.toml", "grids/g1")
    cfg = load_grid_config(ws.root / config)
    assert [p.resolve() for p in cfg.axes.checkpoint] == [ws.resolve(c) for c in ckpts]
    assert cfg.axes.lora_weight == [0.5, 1.0] and cfg.metrics.individual == "teapot_08"
    assert cfg.out.resolve() == ws.resolve(out)


def test_grid_refuses_paths_outside_and_pickles(tmp_path):
    ws = Workspace.create(tmp_path / "ws")
    with pytest.raises(UserInputError, match="'..' is refused"):
        grids.write_grid(ws, "grids", "g", prompt="p", axes={"checkpoint": ["../x.safetensors"]}, metrics={})
    (ws.root / "loras" / "old.ckpt").write_bytes(b"")
    with pytest.raises(UserInputError, match="--allow-pickle"):
        grids.write_grid(ws, "grids", "g", prompt="p", axes={"checkpoint": ["loras/old.ckpt"]}, metrics={})
    with pytest.raises(UserInputError, match="write a prompt"):
        grids.write_grid(ws, "grids", "g", prompt=" ", axes={}, metrics={})


def test_a_grid_base_is_a_builtin_name_or_a_workspace_path(tmp_path):
    ws = Workspace.create(tmp_path / "ws")
    (ws.root / "loras" / "a.safetensors").write_bytes(b"")
    axes = {"checkpoint": ["loras/a.safetensors"], "steps": [2]}
    for bad, message in [("/etc", "absolute paths"), ("../x", "'..' is refused"), ("owner/model", "no such file")]:
        with pytest.raises(UserInputError, match=message):
            grids.write_grid(ws, "grids", "g", prompt="p", axes={**axes, "base": [bad]}, metrics={})
    (ws.root / "bases" / "mine").mkdir()
    config, _ = grids.write_grid(ws, "grids", "g", prompt="p", axes={**axes, "base": ["world", "bases/mine"]},
                                 metrics={})  # fmt: skip
    cfg = load_grid_config(ws.root / config)
    assert cfg.axes.base == ["world", str(ws.root / "grids" / ".." / "bases" / "mine")]


def test_unreadable_run_files_give_no_oracle_hint_not_an_error(tmp_path):
    ws = Workspace.create(tmp_path / "ws")
    run = ws.root / "runs" / "r"
    run.mkdir()
    (run / "r.safetensors").write_bytes(b"")
    for text in ("[dataset\ntrain_data_dir = ", '[dataset]\ntrain_data_dir = "/etc"\n', "dataset = 3\n"):
        (run / "config.toml").write_text(text)
        assert grids.world_names(ws, "runs/r/r.safetensors") == {}
    (ws.root / "datasets" / "d").mkdir()
    (ws.root / "datasets" / "d" / "world_dataset.json").write_text('{"kind": "subject"')
    (run / "config.toml").write_text('[dataset]\ntrain_data_dir = "datasets/d"\n')
    assert grids.world_names(ws, "runs/r/r.safetensors") == {}


def test_grid_pages_open_in_the_preview_and_are_sent_only_when_they_change():
    import gradio as gr

    from lorafuse.ui.common import grid_pages

    pages = ["grids/g/grid_p01.png", "grids/g/grid_p02.png"]
    first = grid_pages(pages, None)
    assert isinstance(first, gr.Gallery) and first.selected_index == 0  # the large view, not a cropped thumbnail
    assert grid_pages(pages, pages) == gr.skip()  # unchanged: the page the user opened stays open
    assert grid_pages([], pages).selected_index is None  # a job without pages yet empties the gallery
