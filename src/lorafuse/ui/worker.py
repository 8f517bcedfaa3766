"""The job worker: `python -m lorafuse.ui.worker WORKSPACE` runs queued jobs one at a time, then exits when
the queue has been empty for a while. Started by the page in its own session, so closing the browser or
stopping `lorafuse ui` does not stop the job. One worker per workspace (a lock on jobs/worker.lock).

The worker imports torch, diffusers and the CLI once, then forks a child per job: a job starts at once
instead of paying those imports again (about 20 s a job on a loaded 2-core machine). The worker itself never
runs torch, so every child starts from the same clean state (no thread pool, no accelerate state to inherit).
Where fork is missing, each job is a fresh `python -m lorafuse.ui.runner` process instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lorafuse.ui.jobs import Job, JobStore, job_env
from lorafuse.utils.atomic import atomic_write_text

IDLE_EXIT_S = 60.0
POLL_S = 0.5
# what most jobs import first (train, grid/fuse, bake, demo); loaded once per worker
WARM = ("lorafuse.cli.main", "lorafuse.train.loop", "lorafuse.fusion.registry", "lorafuse.models.world",
        "lorafuse.eval.grid")  # fmt: skip


def run(root: Path) -> int:
    store = JobStore(root)
    lock = open(store.dir / "worker.lock", "a")  # noqa: SIM115 - held for the worker's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("another worker runs on this workspace", flush=True)
        return 0
    forking = hasattr(os, "fork") and os.environ.get("LORAFUSE_UI_FORK", "1") != "0"
    if forking:
        from lorafuse.cli.main import warm_up

        warm_up(WARM)
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < IDLE_EXIT_S:
        views = store.views()
        if any(v.status == "running" for v in views):  # e.g. a job a previous worker started still runs
            time.sleep(POLL_S)
            idle_since = time.monotonic()
            continue
        job = next((v.job for v in views if v.status == "queued"), None)
        if job is None:
            time.sleep(POLL_S)
            continue
        print(f"{time.strftime('%H:%M:%S')} starting {job.id}: {job.command}", flush=True)
        code = _fork_job(root, store, job) if forking else _spawn_job(root, store, job)
        _record_kill(store, job, code)
        print(f"{time.strftime('%H:%M:%S')} ended {job.id}: {code}", flush=True)
        idle_since = time.monotonic()
    return 0


def _record_kill(store: JobStore, job: Job, code: int) -> None:
    """A job killed by a signal (the OOM killer, `kill -9`) never wrote its exit status: write it here, so the
    page shows "failed" with the reason instead of a job that looks interrupted."""
    if code >= 0 or store.path(job.id, "rc").exists():
        return
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    error = f"the job's process was killed by {name} (out of memory, or killed by hand); its log has what it did"
    atomic_write_text(store.path(job.id, "rc"), json.dumps({"returncode": code, "time": time.time(), "error": error}))


def _spawn_job(root: Path, store: JobStore, job: Job) -> int:
    with open(store.path(job.id, "log"), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorafuse.ui.runner", str(root), job.id], cwd=root, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=job_env(),
        )  # fmt: skip
    atomic_write_text(store.path(job.id, "start"), json.dumps({"pid": proc.pid, "time": time.time()}))
    return proc.wait()


def _fork_job(root: Path, store: JobStore, job: Job) -> int:
    from lorafuse.ui import runner

    log = os.open(store.path(job.id, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the job: its output goes to the job's log, as a spawned runner's would
        code = 1
        try:
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            env = job_env()  # replaces, not updates: what job_env leaves out (the login token) must go
            os.environ.clear()
            os.environ.update(env)
            code = runner.run(root, job.id)
        finally:
            os._exit(code)
    os.close(log)
    atomic_write_text(store.path(job.id, "start"), json.dumps({"pid": pid, "time": time.time()}))
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
