"""`lorafuse train --num-processes N`: re-run the same command under `accelerate launch` with N processes.

`accelerate launch --multi_gpu` starts the processes with torchrun; on a machine without GPUs each process then
runs on the CPU and accelerate joins them with the gloo backend, so the same command works on a laptop, in CI
and on a multi-GPU box. Settings travel as `--set key=value`, so the children parse exactly what the parent did.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def in_launched_process() -> bool:
    """True inside a process that torchrun/accelerate started (it must not launch again)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def launch_command(
    num_processes: int, config: Path | None, overrides: dict[str, str], extra: list[str]
) -> list[str]:
    """The `accelerate launch` command line that runs `lorafuse train` in `num_processes` processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", str(num_processes), "--num_machines", "1"]
    # the config's training.mixed_precision decides inside the run; these only silence the launcher's defaults
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "lorafuse", "train"]
    if config is not None:
        cmd.append(str(config))
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd + extra


def relaunch(num_processes: int, config: Path | None, overrides: dict[str, str], extra: list[str]) -> int:
    """Run the launcher and return its exit code (the children print their own output)."""
    env = dict(os.environ)
    env.setdefault(
        "OMP_NUM_THREADS", "1"
    )  # torchrun's default too; stated so the children do not oversubscribe
    return subprocess.run(launch_command(num_processes, config, overrides, extra), env=env).returncode
