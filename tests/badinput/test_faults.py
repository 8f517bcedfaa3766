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


def _train_args(data: Path, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", "world-random", "--train_data_dir", str(data), "--resolution", "64",
            "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3", "--train_batch_size", "2",
            "--max_train_steps", "4", "--save_every_n_steps", "1", "--save_state", "--output_dir", str(out),
            "--output_name", "run", "--seed", "3", "--flip_aug"]  # fmt: skip


def _latest_state(out: Path) -> Path | None:
    states = sorted(out.glob("run-step*-state"))
    return states[-1] if states else None


# the killed run slows each state save down (test code, not a hook in the trainer) so kills land inside saves too
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


@pytest.mark.slow
def test_kill_during_training_resumes_bit_identical_without_litter(tmp_path, capsys):
    """The killed run is a process of its own; the resumed run and the uninterrupted one run here (no imports to
    pay for), with one torch thread as the killed run has, so every sum is computed in the same order."""
    from lorafuse.cli.main import main
    from lorafuse.world.dataset import write_subject_dataset

    data = tmp_path / "ds"
    write_subject_dataset("robot_09", data, n=1, repeats=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        killed_out = tmp_path / "killed"
        killed = subprocess.Popen([sys.executable, "-c", DRIVER, "0.5", *_train_args(data, killed_out)],
                                  env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
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
        assert main(["train", *_train_args(data, killed_out), "--resume", str(state), "--no-progress"]) == 0
        assert main(["train", *_train_args(data, tmp_path / "full"), "--no-progress"]) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)

    a = load_file(str(tmp_path / "full" / "run.safetensors"))
    b = load_file(str(killed_out / "run.safetensors"))
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in a.items() if "lora_up" in k)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume from {state.name} (seed {SEED})"
    assert _litter(killed_out) == [], f"litter after the resumed run: {_litter(killed_out)}"


# kill -9 inside other writers: a child kills itself at the k-th write boundary (a temporary complete but not yet
# renamed, or renamed and its folder not yet synced), or halfway through writing an image or a safetensors file;
# k comes from the seeded generator. One process imports everything once (with one thread: forking a process
# whose OpenMP pool has threads can deadlock the child) and forks a child per run.
KILLER = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from PIL import Image
import lorafuse.utils.atomic as atomic
from lorafuse.cli.main import main

def run_and_kill_itself(mode, k, argv):
    calls = [0]
    def hit():
        calls[0] += 1
        return calls[0] == k
    real_fsync, real_st, real_save = atomic._fsync, atomic.safetensors_bytes_to, Image.Image.save
    def fsync(path):
        real_fsync(path)
        if mode == "boundary" and hit():
            os.kill(os.getpid(), signal.SIGKILL)
    def half(write):
        def wrapped(*args, **kwargs):
            if mode == "mid" and hit():
                with open(args[1] if write is real_save else args[0], "wb") as f:
                    f.write(b"x" * 25000)  # half a file, then the kill
                os.kill(os.getpid(), signal.SIGKILL)
            return write(*args, **kwargs)
        return wrapped
    atomic._fsync, atomic.safetensors_bytes_to, Image.Image.save = fsync, half(real_st), half(real_save)
    try:
        main(argv)
    finally:
        os._exit(99)  # reached only if the kill never came: the test fails on the status

statuses = []
for mode, k, argv in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        run_and_kill_itself(mode, k, argv)
    statuses.append(os.waitpid(pid, 0)[1])
print(json.dumps(statuses))
"""


def _writer(name: str, out: Path, lora: Path, grid_toml: Path) -> list[str]:
    return {
        "bake": ["bake", "--base", "sd15-tiny", "--lora", str(lora), "--out", str(out)],
        "grid": ["grid", str(grid_toml), "--out", str(out), "--no-progress"],
        "fuse": ["fuse", "--content", str(lora), "--style", str(lora), "--prompt", "a dog", "--method", "direct",
                 "--base", "sd15-tiny", "--steps", "2", "--num-images", "2", "--no-progress", "--out", str(out)],
        "world dataset": ["world", "dataset", str(out), "--subject", "teapot_08", "--n", "3"],
    }[name]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_sd15_lora(tmp_path_factory, tiny_lora) -> tuple[Path, Path]:
    """(a LoRA for the tiny SD1.5 base, a 4-cell grid config using it)."""
    grid = tmp_path_factory.mktemp("grid") / "grid.toml"
    grid.write_text(f'prompt = "a dog"\n[axes]\nbase = ["sd15-tiny"]\ncheckpoint = ["{tiny_lora}"]\n'
                    "lora_weight = [0.0, 0.5, 1.0, 1.5]\nsteps = [2]\n[metrics]\n")  # fmt: skip
    return tiny_lora, grid


def _whole(folder: Path) -> None:
    """Every file under its final name reads back: images decode, safetensors and JSON parse."""
    import json

    from PIL import Image

    for p in folder.rglob("*"):
        if p.is_file() and not p.name.startswith(TMP_PREFIX) and TMP_PREFIX not in str(p.relative_to(folder)):
            if p.suffix == ".png":
                Image.open(p).load()
            elif p.suffix == ".safetensors":
                load_file(str(p))
            elif p.suffix == ".json":
                json.loads(p.read_text())


@pytest.mark.slow
def test_kill_inside_other_writers_leaves_whole_files_and_the_next_run_no_litter(tmp_path, tiny_sd15_lora):
    """Bake (a pipeline folder), grid (resumable cells), fuse (images) and world dataset (a dataset folder), each
    killed mid-write; then the same command finishes and leaves nothing of the kill."""
    import json

    from lorafuse.cli.main import main

    lora, grid = tiny_sd15_lora
    runs = []
    for writer in ("bake", "grid", "fuse", "world dataset"):
        rng = random.Random(f"{SEED}-{writer}")
        # diffusers writes a pipeline's weights itself: bake is killed at a boundary (inside its folder's write)
        mode, k = rng.choice(["boundary"] if writer == "bake" else ["boundary", "mid"]), rng.randint(1, 3)
        out = tmp_path / writer.replace(" ", "_") / "out"
        runs.append((writer, mode, k, out, _writer(writer, out, lora, grid)))
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps([(m, k, a) for _, m, k, _, a in runs])],
                          env=_env(), capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = json.loads(proc.stdout.strip().splitlines()[-1])
    for (writer, mode, k, out, argv), status in zip(runs, statuses, strict=True):
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (writer, mode, k, status)
        if writer in ("bake", "world dataset"):  # a folder that appears whole or not at all
            marker = "model_index.json" if writer == "bake" else "world_dataset.json"
            assert not out.exists() or (out / marker).is_file(), (writer, mode, k)
        if out.exists():
            _whole(out)
        assert main(argv) == 0, (writer, mode, k)  # the next run: done, and nothing of the killed one is left
        _whole(out)
        assert _litter(out.parent) == [], (writer, mode, k, _litter(out.parent))


def _recorded_cells(out: Path) -> list[str]:
    """The cells the grid's index records as done (a cell whose image is written but not yet recorded is not)."""
    import json

    try:
        return list(json.loads((out / "index.json").read_text())["cells"])
    except (OSError, ValueError):
        return []


def test_ctrl_c_during_a_grid_is_one_line_and_the_grid_resumes(tmp_path, tiny_sd15_lora, capsys, monkeypatch):
    """A real SIGINT, sent by the process to itself once the second cell is recorded (in-process: a subprocess
    costs its imports): exit 130, one line, no traceback, no temporaries; the next run keeps the recorded cells
    (the same files) and does the rest."""
    from lorafuse.cli.main import main
    from lorafuse.eval import grid as grid_module

    lora, grid = tiny_sd15_lora
    out = tmp_path / "out"
    argv = _writer("grid", out, lora, grid)
    # a backgrounded parent may have left SIGINT ignored; the default handler raises KeyboardInterrupt
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    real_add = grid_module.CellStore.add

    def add(self, *args, **kwargs):
        real_add(self, *args, **kwargs)
        if len(self.index) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(grid_module.CellStore, "add", add)
    try:
        capsys.readouterr()
        code = main(argv)
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines() == ["lorafuse grid: interrupted (Ctrl-C); finished files were kept, nothing "
                                        "half-written was left"], err  # fmt: skip
    assert _litter(tmp_path) == []
    done = {f"{cid}.png": (out / "cells" / f"{cid}.png").stat().st_mtime_ns for cid in _recorded_cells(out)}
    assert len(done) == 2, done
    monkeypatch.setattr(grid_module.CellStore, "add", real_add)
    assert main(argv) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.png")}
    assert len(after) == 4 and all(after[n] == t for n, t in done.items()), (done, after)
    assert _litter(tmp_path) == []
