"""Two CPU processes (DDP on gloo, launched by `lorafuse train --num-processes 2`) train what one process trains
with the same total batch: the same loss curve and the same LoRA, up to float32 reduction order.

Tolerance: the two runs see the same samples, noise and timesteps in every step (global batches are split
across processes; the noise is drawn for the whole global batch and sliced). What differs is only the order of
float32 sums: DDP all-reduces two half-batch gradients where one process sums the whole batch (relative error
~1e-7). Losses then agree to ~1e-7 (measured 1.1e-7 relative): rtol 1e-5. Adam divides each gradient element by
√v, so a rounding difference in a near-zero element can move its update by up to lr; over 4 steps at lr 1e-3 the
bound is 4e-3 and we measured 4.2e-6: atol 5e-5 keeps 10x room and stays far below what a real difference does
(a sample seen twice or another noise draw changes the losses by ~1e-1).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorafuse.config.toml_io import save_config
from lorafuse.train.config import load_train_config
from lorafuse.train.run_log import read_rows


def _run(train_overrides, tmp_path, name: str, batch: int, processes: int, **extra) -> tuple[list[float], dict]:
    out = tmp_path / name
    cfg = load_train_config(
        None,
        train_overrides(
            **{
                # 9 samples: global batches of 4, 4, 1 (the last one leaves process 1 with a zero-weight pad)
                "training.train_batch_size": batch,
                "training.gradient_accumulation_steps": 2,  # groups of 2 and 1 micro-batches
                "training.max_train_steps": 4,  # two epochs
                "loss.noise_offset": 0.05,
                "loss.min_snr_gamma": 5,
                "training.output_dir": str(out),
                **extra,
            }
        ),
    )
    path = tmp_path / f"{name}.toml"
    save_config(cfg, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "lorafuse", "train", str(path), "--no-progress"]
    if processes > 1:
        cmd += ["--num-processes", str(processes)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    losses = [float(r["loss"]) for r in read_rows(out / "logs" / "run.csv")]
    return losses, load_file(str(out / "run.safetensors"))


@pytest.mark.multiprocess
def test_two_processes_train_what_one_process_trains(train_overrides, tmp_path):
    one_losses, one = _run(train_overrides, tmp_path, "one", batch=4, processes=1)
    two_losses, two = _run(train_overrides, tmp_path, "two", batch=2, processes=2)
    assert len(one_losses) == len(two_losses) == 4
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-5, atol=0)
    assert one.keys() == two.keys()
    moved = max(float(one[k].abs().max()) for k in one if "lora_up" in k)
    assert moved > 1e-4  # the LoRA trained (B starts at zero)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=5e-5)


@pytest.mark.multiprocess
def test_two_process_resume_is_bit_identical(train_overrides, tmp_path):
    """A 2-process run resumed from its step-2 state ends bit-identical to the uninterrupted 2-process run. LoRA
    dropout draws from each process's own global RNG, and the processes' batches differ in size (9 samples in
    global batches of 6 and 3; the 3 split 2 + 1), so each process's random streams must come back as its own.
    The state is taken mid-epoch (step 3 of 2 x 2)."""
    settings = {"network.network_dropout": 0.2, "dataset.flip_aug": True, "training.save_state": True,
                "training.save_every_n_steps": 3, "training.gradient_accumulation_steps": 1}  # fmt: skip
    whole_losses, whole = _run(train_overrides, tmp_path, "whole", batch=3, processes=2, **settings)
    state = tmp_path / "whole" / "run-step00000003-state"
    assert state.is_dir(), sorted(p.name for p in (tmp_path / "whole").iterdir())
    resumed_losses, resumed = _run(train_overrides, tmp_path, "resumed", batch=3, processes=2, **settings,
                                   **{"training.resume": str(state)})  # fmt: skip
    assert resumed_losses == whole_losses  # the resumed log carries the first two steps over
    assert resumed.keys() == whole.keys()
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
