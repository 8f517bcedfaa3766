"""SIGINT during training (Ctrl-C, the web UI's stop button) saves a resumable state at the current step and
returns; resuming from it ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import lorafuse.train.loop as loop
from lorafuse.train.config import load_train_config
from lorafuse.train.loop import train_lora


@pytest.mark.parametrize("base", ["world-random", "flux-tiny"])
def test_sigint_saves_state_and_resume_finishes_identically(base, tmp_path, train_overrides, monkeypatch):
    steps = {"training.max_train_steps": 6, "training.save_state": True, "model.pretrained_model_name_or_path": base}
    full = train_lora(load_train_config(None, train_overrides(**steps, **{"training.output_dir": tmp_path / "full"})),
                      progress_bar=False)  # fmt: skip

    calls = {"n": 0}
    original = loop.diffusion_loss

    def interrupting(*args, **kwargs):  # Ctrl-C arrives during the third step's loss
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", interrupting)
    # a backgrounded test run (CI, `nohup`) starts with SIGINT ignored: whatever it was, training puts it back
    before = signal.getsignal(signal.SIGINT)
    over = train_overrides(**steps, **{"training.output_dir": tmp_path / "stopped"})
    stopped = train_lora(load_train_config(None, over), progress_bar=False)
    assert stopped.stopped and stopped.global_step == 3 < stopped.total_steps == 6
    state = tmp_path / "stopped" / "run-step00000003-state"
    assert stopped.states == [state] and (state / "progress.json").is_file()
    assert stopped.lora_path.name == "run-step00000003.safetensors" and stopped.lora_path.is_file()
    assert not (tmp_path / "stopped" / "run.safetensors").exists()  # no final file for an unfinished run
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C is restored

    monkeypatch.setattr(loop, "diffusion_loss", original)
    resumed = train_lora(load_train_config(None, {**over, "training.resume": str(state)}), progress_bar=False)
    assert not resumed.stopped and resumed.global_step == 6
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_up" in k)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_cli_says_how_to_continue_and_exits_130(tmp_path, train_overrides, monkeypatch, capsys):
    """A stopped run is unfinished (there is no final LoRA): the command ends with the shell's Ctrl-C status,
    so `lorafuse train && lorafuse fuse` does not go on, and prints the command that continues it."""
    from lorafuse.cli.main import main

    original = loop.diffusion_loss

    def interrupting(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", interrupting)
    over = train_overrides(**{"training.max_train_steps": 3, "training.output_dir": tmp_path / "out"})
    code = main(["train", "--no-progress", *(w for k, v in over.items() for w in ("--set", f"{k}={v}"))])
    out = capsys.readouterr().out
    assert code == 130
    state = tmp_path / "out" / "run-step00000001-state"
    assert f"stopped at step 1 of 3; state saved in {state}" in out
    assert f"training.resume={state}" in out and not (tmp_path / "out" / "run.safetensors").exists()
