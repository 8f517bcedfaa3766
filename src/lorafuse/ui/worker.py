"""The job worker: `python -m lorafuse.ui.worker WORKSPACE` runs queued jobs one at a time, then exits when
the queue has been empty for a while. Started by the page in its own session, so closing the browser or
stopping `lorafuse ui` does not stop the job. One worker per workspace (a lock on jobs/worker.lock)."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path

from lorafuse.ui.jobs import JobStore, job_env
from lorafuse.utils.atomic import atomic_write_text

IDLE_EXIT_S = 60.0
POLL_S = 0.5


def run(root: Path) -> int:
    store = JobStore(root)
    lock = open(store.dir / "worker.lock", "a")  # noqa: SIM115 - held for the worker's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("another worker runs on this workspace", flush=True)
        return 0
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
        with open(store.path(job.id, "log"), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lorafuse.ui.runner", str(root), job.id], cwd=root, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=job_env(),
            )  # fmt: skip
        atomic_write_text(store.path(job.id, "start"), json.dumps({"pid": proc.pid, "time": time.time()}))
        print(f"{time.strftime('%H:%M:%S')} started {job.id}: {job.command}", flush=True)
        proc.wait()
        print(f"{time.strftime('%H:%M:%S')} ended {job.id}: {proc.returncode}", flush=True)
        idle_since = time.monotonic()
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
