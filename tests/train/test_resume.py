"""A run killed with SIGKILL mid-training and resumed from its last state ends bit-identical to an uninterrupted one.

The run exercises every random stream the loop has: LoRA dropout (torch's global RNG), caption shuffle / dropout
and flips (per-sample numpy streams), noise offset and biased timesteps (the loop's generator), a short last
gradient-accumulation group per epoch, text-encoder LoRA, and sampling between epochs (which must not disturb
any of them). Each run is a subprocess through the CLI, with one thread, so both see the same float arithmetic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafuse.config.toml_io import save_config
from lorafuse.errors import UserInputError
from lorafuse.train.config import load_train_config
from lorafuse.train.run_log import read_rows

# The driver slows each step down (test code, not a hook in the trainer) so the kill lands mid-training.
DRIVER = """
import sys, time
import lorafuse.train.loop as loop
delay = float(sys.argv[1])
original = loop.diffusion_loss
def slow(*args, **kwargs):
    time.sleep(delay)
    return original(*args, **kwargs)
loop.diffusion_loss = slow
from lorafuse.cli.main import main
sys.exit(main(["train", *sys.argv[2:], "--no-progress"]))
"""


def _config(train_overrides, out: Path, path: Path) -> Path:
    cfg = load_train_config(
        None,
        train_overrides(
            **{
                "dataset.flip_aug": True,
                "dataset.shuffle_caption": True,
                "dataset.caption_dropout_rate": 0.2,
                "network.network_dropout": 0.1,
                "loss.loss_type": "huber",
                "loss.min_snr_gamma": 5,
                "loss.noise_offset": 0.05,
                "loss.timestep_bias": "content",
                "scheduler.lr_scheduler": "cosine_with_restarts",
                "scheduler.lr_warmup_steps": 2,
                "scheduler.lr_scheduler_num_cycles": 2,
                # 9 samples, batch 2: 5 batches per epoch; accumulation 2: groups of 2, 2, 1 -> 3 steps per epoch
                "training.gradient_accumulation_steps": 2,
                "training.max_train_steps": 9,
                "training.save_every_n_steps": 2,
                "training.save_state": True,
                "training.sample_every_n_epochs": 1,
                "training.sample_prompts": '["a photo of a sks robot"]',
                "training.sample_steps": 2,
                "training.output_dir": str(out),
            }
        ),
    )
    save_config(cfg, path)
    return path


def _start(driver: Path, delay: float, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, str(driver), str(delay), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, what: str) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{what} failed:\n{out[-3000:]}"
    return out


def _rows(csv: Path) -> int:
    return len(read_rows(csv)) if csv.is_file() else 0


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, train_overrides):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    full_cfg = _config(train_overrides, tmp_path / "full", tmp_path / "full.toml")
    kill_cfg = _config(train_overrides, tmp_path / "killed", tmp_path / "killed.toml")

    full = _start(driver, 0.0, str(full_cfg))
    killed = _start(driver, 0.4, str(kill_cfg))
    state = tmp_path / "killed" / "run-step00000004-state"
    csv = tmp_path / "killed" / "logs" / "run.csv"
    deadline = time.time() + 300
    while not (state.is_dir() and _rows(csv) >= 5):  # a state at step 4, and training went on past it
        assert killed.poll() is None, (
            "the run ended before it could be killed:\n" + killed.communicate()[0][-3000:]
        )
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "run.safetensors").exists()  # it really stopped before the end
    assert _rows(csv) < 9
    for folder in (tmp_path / "killed").glob("run-*-state"):  # a state under its final name is always whole
        assert all((folder / name).is_file() for name in ("lora.safetensors", "state.pt", "progress.json"))

    resumed = _start(driver, 0.0, str(kill_cfg), "--set", f"training.resume={state}")
    out = _finish(resumed, "resumed run")
    assert "resumed from" in out and "step 4" in out
    _finish(full, "uninterrupted run")

    a = load_file(str(tmp_path / "full" / "run.safetensors"))
    b = load_file(str(tmp_path / "killed" / "run.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("lora_te_") for k in a)
    moved = [k for k in a if k.endswith("lora_up.weight") and a[k].abs().max() > 0]
    assert moved, "training did not change the LoRA: the comparison would prove nothing"
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    # the final training states agree as well (optimizer moments included), and so does the loss curve
    sa = torch.load(tmp_path / "full" / "run-state" / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "killed" / "run-state" / "state.pt", weights_only=True)
    for pid, moments in sa["optimizer"]["state"].items():
        for name, tensor in moments.items():
            assert torch.equal(tensor, sb["optimizer"]["state"][pid][name]), (pid, name)
    losses = [
        [r["loss"] for r in read_rows(d / "logs" / "run.csv")]
        for d in (tmp_path / "full", tmp_path / "killed")
    ]
    assert len(losses[0]) == 9 and losses[0] == losses[1]


def test_resume_from_a_folder_that_is_not_a_state(tmp_path, train_overrides):
    from lorafuse.train.loop import train_lora

    (tmp_path / "nostate").mkdir()
    cfg = load_train_config(None, train_overrides(**{"training.resume": tmp_path / "nostate"}))
    with pytest.raises(UserInputError, match="not a lorafuse training state"):
        train_lora(cfg, progress_bar=False)
    assert not (tmp_path / "out").exists()


def test_resume_with_other_settings_is_refused(tmp_path, train_overrides):
    from lorafuse.train.loop import train_lora

    cfg = load_train_config(
        None, train_overrides(**{"training.save_state": True, "training.max_train_steps": 1})
    )
    result = train_lora(cfg, progress_bar=False)
    state = result.states[-1]
    changed = load_train_config(None, train_overrides(**{"training.resume": state, "network.network_dim": 8}))
    with pytest.raises(UserInputError, match=r"network\.network_dim: saved 4, now 8"):
        train_lora(changed, progress_bar=False)


def test_a_failed_state_save_leaves_nothing(tmp_path, monkeypatch):
    from lorafuse.train import checkpoint

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    kwargs = dict(
        lora={"unet.x": param},
        optimizer=optimizer,
        lr_scheduler=scheduler,
        generator=torch.Generator(),
        progress=checkpoint.Progress(0, 1, 1),
        config={},
    )
    folder = checkpoint.save_train_state(tmp_path / "run-state", **kwargs)
    assert checkpoint.read_train_state(folder).progress == checkpoint.Progress(0, 1, 1)

    def broken(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_train_state(tmp_path / "run-step00000002-state", **kwargs)
    with pytest.raises(OSError, match="disk full"):  # replacing an existing state keeps the old one intact
        checkpoint.save_train_state(folder, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-state"]
    assert checkpoint.read_train_state(folder).progress == checkpoint.Progress(0, 1, 1)
