"""kill -9 at random points during a save and during training: the final name holds the old or the new file,
never part of one; a resumed run is bit-identical to an uninterrupted one; the next run leaves no litter.

The kill times come from a seeded generator (printed in failures) so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafuse.utils.atomic import TMP_PREFIX

SEED = 20261205

SAVER = """
import sys, torch
from lorafuse.lora.io import save_lora
from lorafuse.lora.state import LoraModule, LoraState
target = sys.argv[1]
def state(v):  # ~4 MB, so a write takes long enough to be hit
    return LoraState({f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn{i}.to_k":
                      LoraModule(down=torch.full((32, 4096), v), up=torch.full((4096, 32), v), alpha=32.0)
                      for i in (1, 2)})
states = [state(0.001), state(0.002)]
save_lora(states[0], target, arch="sd15")
print("ready", flush=True)
k = 1
while True:
    save_lora(states[k % 2], target, arch="sd15")
    k += 1
"""


def _litter(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith((TMP_PREFIX, ".tmp"))]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


@pytest.mark.slow
def test_kill_during_save_leaves_old_or_new_and_next_save_sweeps(tmp_path):
    from lorafuse.lora.io import load_lora, save_lora

    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    target = tmp_path / "out" / "lora.safetensors"
    rng = random.Random(SEED)
    values = set()
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(target)], env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        assert proc.stdout.readline().strip() == "ready", proc.communicate()[0][-2000:]
        delay = rng.uniform(0.0, 0.6)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        state = load_lora(target)  # whole and valid, whatever moment the kill hit
        first = next(iter(state.modules.values())).down.flatten()[0].item()
        assert first in (pytest.approx(0.001), pytest.approx(0.002)), (round_, delay)
        values.add(round(first, 4))
    # whatever the kills left (a half temporary when one hit mid-write) goes at the next save in that folder
    save_lora(state, target, arch="sd15")
    assert _litter(tmp_path / "out") == [] and [p.name for p in (tmp_path / "out").iterdir()] == ["lora.safetensors"]


# the driver slows each state save down (test code, not a hook in the trainer) so kills land inside saves too
DRIVER = """
import sys, time
import lorafuse.utils.atomic as atomic
delay = float(sys.argv[1])
original = atomic.safetensors_bytes_to
def slow(*args, **kwargs):
    original(*args, **kwargs)
    time.sleep(delay)  # the file is written, the folder not yet renamed into place
atomic.safetensors_bytes_to = slow
from lorafuse.cli.main import main
sys.exit(main(["train", *sys.argv[2:], "--no-progress"]))
"""


def _train_args(data: Path, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", "world-random", "--train_data_dir", str(data), "--resolution", "64",
            "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3", "--train_batch_size", "2",
            "--max_train_steps", "4", "--save_every_n_steps", "1", "--save_state", "--output_dir", str(out),
            "--output_name", "run", "--seed", "3", "--flip_aug"]  # fmt: skip


def _latest_state(out: Path) -> Path | None:
    states = sorted(out.glob("run-step*-state"))
    return states[-1] if states else None


@pytest.mark.slow
def test_kill_during_training_resumes_bit_identical_without_litter(tmp_path):
    from lorafuse.world.dataset import write_subject_dataset

    data = tmp_path / "ds"
    write_subject_dataset("robot_09", data, n=1, repeats=2)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    full = subprocess.Popen([sys.executable, str(driver), "0", *_train_args(data, tmp_path / "full")], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    killed_out = tmp_path / "killed"
    killed = subprocess.Popen([sys.executable, str(driver), "0.5", *_train_args(data, killed_out)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    rng = random.Random(SEED)
    target_step = rng.randint(1, 2)  # kill after this many states are saved, at a random moment after it
    deadline = time.time() + 300
    while len(list(killed_out.glob("run-step*-state"))) < target_step:
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.5))
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert not (killed_out / "run.safetensors").exists(), "the run finished before the kill"
    for folder in killed_out.glob("run-step*-state"):  # a state under its final name is always whole
        assert all((folder / n).is_file() for n in ("lora.safetensors", "state.pt", "progress.json")), folder

    state = _latest_state(killed_out)
    resumed = subprocess.run([sys.executable, str(driver), "0", *_train_args(data, killed_out), "--resume",
                              str(state)], env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]

    a = load_file(str(tmp_path / "full" / "run.safetensors"))
    b = load_file(str(killed_out / "run.safetensors"))
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in a.items() if "lora_up" in k)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume from {state.name} (seed {SEED})"
    assert _litter(killed_out) == [], f"litter after the resumed run: {_litter(killed_out)}"
