"""What a careless or hostile user types into the page ends in one line naming the field, before any work: cleared
number fields, names that are paths, huge counts, a second click that would silently change a queued job, a second
stop that would abort a state being saved, a continue that would resume other settings."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from lorafuse.errors import UserInputError
from lorafuse.ui.common import number
from lorafuse.ui.jobs import JobStore, last_error
from lorafuse.ui.workspace import Workspace, WorkspacePathError
from lorafuse.utils.atomic import atomic_write_text


class Inline:  # the helper's calls, in this process
    def call(self, fn, *args):
        return fn(*args)


@pytest.fixture
def ws(tmp_path):
    return Workspace.create(tmp_path / "ws")


def test_a_cleared_or_wrong_number_field_is_one_line_naming_it():
    assert number(3, "rank") == 3 and number(2.0, "rank") == 2 and number("0.5", "w", kind=float) == 0.5
    for value, message in [(None, "rank: give a number"), ("", "rank: give a number"), ("x", "expected a number"),
                           (1.5, "a whole number"), (float("nan"), "a whole number"), (float("inf"), "a whole number"),
                           (-1, "at least 0"), (10**13, "at most 1000")]:  # fmt: skip
        with pytest.raises(UserInputError, match=message):
            number(value, "rank", minimum=0, maximum=1000)
    with pytest.raises(UserInputError, match="a finite number"):
        number(float("inf"), "weight", kind=float)


def test_a_name_field_takes_one_folder_name(ws):
    assert ws.folder_name("  teapot ", "run name") == "teapot"
    for bad, message in [("", "give a name"), ("   ", "give a name"), ("/etc/x", "not a path"), ("a/b", "not a path"),
                         ("..", "not a path"), ("a\\b", "not a path"), (".hidden", "hidden"), ("x" * 300, "too long")]:  # fmt: skip
        with pytest.raises(UserInputError, match=message):
            ws.folder_name(bad, "run name")
    with pytest.raises(WorkspacePathError):
        ws.folder_name("/etc", "dataset name")


def test_world_dataset_form_is_checked_before_the_helper_runs_it(ws):
    from lorafuse.ui.tab_dataset import MAX_WORLD_IMAGES, world_argv

    argv = world_argv(ws, "subject", "teapot_08", "crayon", 3, 0, " ohwx ", "")
    assert argv == ["world", "dataset", "datasets/teapot_08", "--subject", "teapot_08", "--trigger", "ohwx", "--n", "3"]
    assert world_argv(ws, "style", "teapot_08", "crayon", None, 5, "", "mine")[2:] == [
        "datasets/mine", "--style", "crayon", "--trigger", "sks", "--repeats", "5"]  # fmt: skip
    for args, message in [
        (("subject", "teapot_08", "crayon", 10**12, 0, "sks", ""), f"images: must be at most {MAX_WORLD_IMAGES}"),
        (("style", "teapot_08", "crayon", 500, 0, "sks", ""), "images: must be at most"),  # more than the seen ones
        (("subject", "teapot_08", "crayon", -5, 0, "sks", ""), "images: must be at least 0"),
        (("subject", "teapot_08", "crayon", 0, -1, "sks", ""), "repeats: must be at least 0"),
        (("subject", "teapot_08", "crayon", 0, 10**9, "sks", ""), "more than 10000"),
        (("subject", "teapot_08", "crayon", 0, 0, "a/b", ""), "trigger 'a/b'"),
        (("subject", "teapot_08", "crayon", 0, 0, "sks", "/etc/x"), "folder name '/etc/x': give one folder name"),
    ]:
        with pytest.raises(UserInputError, match=message):
            world_argv(ws, *args)


def test_an_upload_needs_a_dataset_name_not_a_path(ws, tmp_path):
    from lorafuse.ui import datasets

    for name in ("", "/tmp/zz", "a/b"):
        with pytest.raises(UserInputError, match="dataset name"):
            datasets.add_uploads(ws, name, [str(tmp_path / "x.png")], trigger="sks", cls="dog", repeats=1, max_bytes=1)
    assert list((ws.root / "datasets").iterdir()) == []
    with pytest.raises(UserInputError, match="no captions to save"):
        datasets.save_captions(ws, [])


def test_a_second_stop_does_not_abort_the_state_being_saved(tmp_path, monkeypatch):
    """SIGINT twice is Ctrl-C twice: training gives up its clean stop. The page sends it once."""
    store = JobStore(tmp_path)
    job = store.submit("train", "t", ["train", "x.toml"])
    atomic_write_text(store.path(job.id, "start"), json.dumps({"pid": os.getpid(), "time": time.time()}))
    sent = []
    real_kill = os.kill
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig) if sig == signal.SIGINT else real_kill(pid, sig))
    assert store.request_stop(job.id).startswith("stop sent")
    assert store.request_stop(job.id).startswith("stop already sent") and sent == [signal.SIGINT]
    queued = store.submit("train", "q", ["train", "y.toml"])
    assert store.request_stop(queued.id) == f"cancelled {queued.id}"
    with pytest.raises(UserInputError, match="already ended"):
        store.request_stop(queued.id)


def test_the_error_line_is_found_after_a_progress_bar_without_newline():
    log = "grid cells:   0%|          | 0/2 [00:00<?, ?it/s]lorafuse grid: error: direct: steps must be at most 1000\n"
    assert last_error(log) == "lorafuse grid: error: direct: steps must be at most 1000"
    assert last_error("Traceback ...\nMemoryError\n") == "MemoryError"


def _train_job(ws, store, name="t1", config="[training]\n"):
    from lorafuse.ui.tab_train import _sha256

    run = ws.root / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(config)
    outputs = {"run": f"runs/{name}", "config": f"runs/{name}/config.toml", "csv": f"runs/{name}/logs/{name}.csv",
               "samples": f"runs/{name}/samples", "config_sha256": _sha256(config.encode())}  # fmt: skip
    return store.submit("train", f"train {name}", ["train", outputs["config"]], outputs)


def test_a_run_folder_takes_one_job_at_a_time(ws):
    from lorafuse.ui.tab_train import refuse_busy_run

    store = JobStore(ws.root)
    job = _train_job(ws, store)
    with pytest.raises(UserInputError, match=f"runs/t1: job {job.id} \\(queued\\) trains into this folder"):
        refuse_busy_run(store, "runs/t1")
    refuse_busy_run(store, "runs/t2")
    store.request_stop(job.id)  # cancelled: the folder is free again
    refuse_busy_run(store, "runs/t1")


def test_continue_refuses_what_would_resume_something_else(ws, monkeypatch):
    from lorafuse.ui import tab_train

    monkeypatch.setattr(tab_train, "latest_state", lambda run: None)
    store = JobStore(ws.root)
    job = _train_job(ws, store)
    store.request_stop(job.id)  # cancelled before it started
    with pytest.raises(UserInputError, match="cancelled: it never ran"):
        tab_train.continuable(ws, store, job.id)
    atomic_write_text(store.path(job.id, "start"), json.dumps({"pid": 1, "time": time.time()}))
    atomic_write_text(store.path(job.id, "rc"), json.dumps({"returncode": 130, "time": time.time()}))  # stopped
    with pytest.raises(UserInputError, match="no saved state to continue from"):
        tab_train.continuable(ws, store, job.id)
    (ws.root / "runs" / "t1" / "config.toml").write_text("[training]\nseed = 3\n")  # a later run, same name
    with pytest.raises(UserInputError, match="changed since job .* was queued"):
        tab_train.continuable(ws, store, job.id)
    fuse = store.submit("fuse", "fuse", ["grid", "f.toml"], {"dir": "fuse/f"})
    with pytest.raises(UserInputError, match="not a training job"):
        tab_train.continuable(ws, store, fuse.id)
    with pytest.raises(UserInputError, match="choose a training job first"):
        tab_train.continuable(ws, store, "")
    # the run monitor, given a fuse job's id (the picker takes typed values), says so instead of failing each tick
    text, loss, lr, samples = tab_train.monitor(ws, store, fuse.id)
    assert "not a training job" in text and (loss, lr, samples) == (None, None, [])


def test_config_errors_name_the_field_not_every_override(monkeypatch):
    from lorafuse.ui import tasks

    over = {"model.pretrained_model_name_or_path": "world", "dataset.train_data_dir": "d", "training.output_dir": "r",
            "training.output_name": "x", "optimizer.learning_rate": "abc"}  # fmt: skip
    with pytest.raises(UserInputError) as refused:
        tasks.train_config_toml(over)
    assert str(refused.value) == "optimizer.learning_rate: expected float, got 'abc'"


def test_the_train_form_says_which_required_field_is_empty(ws):
    from lorafuse.train.options import options
    from lorafuse.ui.tab_train import PAGE_SET, config_for, shown

    (ws.root / "datasets" / "d" / "1_sks dog").mkdir(parents=True)
    opts = [o for o in options() if o.key not in PAGE_SET]
    form = [shown(o.default) for o in opts]  # as the page first shows it: the base model's field empty
    with pytest.raises(UserInputError, match=r"^model.pretrained_model_name_or_path: required"):
        config_for(ws, opts, "datasets/d", "run", form)
    with pytest.raises(UserInputError, match="run name: give a name"):
        config_for(ws, opts, "datasets/d", "", form)


def test_each_click_gets_its_own_grid_and_a_refused_one_leaves_nothing(ws, monkeypatch):
    from lorafuse.ui import grids, helper

    names = {grids.claim_name(ws, "fuse", "fuse") for _ in range(3)}  # the same second: three names
    assert len(names) == 3 and all((ws.root / "fuse" / n).is_dir() for n in names)
    monkeypatch.setattr(helper, "HELPER", Inline())
    (ws.root / "loras" / "c.safetensors").write_bytes(b"")
    store = JobStore(ws.root)
    before = set((ws.root / "grids").iterdir())
    with pytest.raises(UserInputError, match=r"axes.steps: every value must be >= 1"):
        grids.queue_grid(ws, store, "grid", "grids", "g", prompt="p", metrics={}, inputs=[],
                         axes={"base": ["world"], "checkpoint": ["loras/c.safetensors"], "steps": [-1], "seed": [0]})  # fmt: skip
    assert set((ws.root / "grids").iterdir()) == before and store.jobs() == []


def test_the_equivalent_flags_survive_text_that_looks_like_a_list():
    from lorafuse.ui.tab_train import flags

    assert flags({"training.sample_prompts": '["a", "b"]'}) == ["--sample_prompts", "a", "b"]
    assert flags({"model.quantize_base": "[abc"}) == ["--quantize_base", "[abc"]  # not a JSON error
