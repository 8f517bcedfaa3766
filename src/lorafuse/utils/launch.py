"""`lorafuse train/grid --num-processes N`: run the same command again under `accelerate launch` with N processes.

`accelerate launch --multi_gpu` starts the processes with torchrun; on a machine without GPUs each process then
runs on the CPU and accelerate joins them with the gloo backend, so the same command works on a laptop, in CI
and on a multi-GPU box. Settings travel as the same command-line words, so the children parse exactly what the
parent did.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence


def in_launched_process() -> bool:
    """True inside a process that torchrun/accelerate started (it must not launch again)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def launch_command(num_processes: int, lorafuse_args: Sequence[str], module: str = "lorafuse") -> list[str]:
    """The `accelerate launch` command line that runs `python -m module *lorafuse_args` (the CLI, or e.g. a
    benchmark) in `num_processes` processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_processes", str(num_processes), "--num_machines", "1"]
    # the run's own config decides precision inside each process; these only silence the launcher's defaults
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*cmd, "-m", module, *lorafuse_args]


def relaunch(num_processes: int, lorafuse_args: Sequence[str], module: str = "lorafuse") -> int:
    """Run the launcher and return its exit code (the children print their own output)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default too; stated so the children do not oversubscribe
    return subprocess.run(launch_command(num_processes, lorafuse_args, module), env=env).returncode


def process_state():
    """accelerate's `PartialState` inside a launched process (gloo on CPUs when there is no GPU), else None: a
    plain run never imports accelerate for this."""
    if not in_launched_process():
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
