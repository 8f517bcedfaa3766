"""Jobs: `lorafuse` command lines queued in WORKSPACE/jobs and run one at a time by a worker process.

A job is a CLI command line, so whatever the page starts is exactly what `lorafuse ...` does, and the page can
show that command. The state is a handful of small files per job, each written once (atomically) by one
writer, so the status can be read back by any process at any time, also after a restart:

    jobs/<id>.json     the job: argv, title, kind, outputs          written by the page when queued
    jobs/<id>.start    pid and start time of the process running it  written by the worker
    jobs/<id>.rc       its exit status                               written by the runner when it ends
    jobs/<id>.stop     a stop request                                written by the page
    jobs/<id>.log      everything the command printed (tqdm bars included)
    jobs/worker.pid    the worker's pid; jobs/worker.lock is locked while it runs

Status is derived: rc present -> done / failed / stopped; started and its pid alive -> running; started and
dead without rc -> interrupted (the machine went down); stop without start -> cancelled; else queued.
A training job stopped from the page receives SIGINT, as Ctrl-C in a terminal: `lorafuse train` saves a
resumable state and exits; "continue" queues the same command with `--set training.resume=<that state>`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafuse.errors import UserInputError
from lorafuse.utils.atomic import atomic_write_text

_ID = re.compile(r"\d{8}-\d{6}-\d{3}-\w+")
FINISHED = ("done", "failed", "stopped", "cancelled", "interrupted")
# tqdm's text form: "desc:  40%|████      | 4/10 [00:01<00:02, ...]"
_TQDM = re.compile(r"(?:([^\r\n|]*?):\s*)?(\d+)%\|[^|]*\|\s*(\d+)/(\d+)")


@dataclass
class Job:
    id: str
    kind: str
    title: str
    argv: list[str]
    outputs: dict[str, str] = field(default_factory=dict)  # workspace-relative paths the page shows
    created: float = 0.0
    continue_of: str | None = None

    @property
    def command(self) -> str:
        return "lorafuse " + shlex.join(self.argv)


@dataclass
class JobView:
    job: Job
    status: str
    pid: int | None
    started: float | None
    returncode: int | None
    progress: str  # the last tqdm line's "desc n/total (pct%)", or ""
    error: str  # the CLI's one-line error message when it failed


class JobStore:
    def __init__(self, root: Path):
        self.root = root  # the workspace
        self.dir = root / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, job_id: str, ext: str) -> Path:
        return self.dir / f"{job_id}.{ext}"

    # ----- writing (the page)
    def submit(self, kind: str, title: str, argv: list[str], outputs: dict[str, str] | None = None,
               continue_of: str | None = None) -> Job:  # fmt: skip
        now = time.time()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        job_id = f"{stamp}-{int(now * 1000) % 1000:03d}-{kind}"
        while self.path(job_id, "json").exists():  # two jobs in the same millisecond
            job_id += "x"
        job = Job(job_id, kind, title, [str(a) for a in argv], dict(outputs or {}), now, continue_of)
        atomic_write_text(self.path(job_id, "json"), json.dumps(job.__dict__, indent=1))
        return job

    def request_stop(self, job_id: str) -> str:
        """Stop a running job (SIGINT: training saves its state) or cancel a queued one."""
        view = self.view(self.load(job_id))
        if view.status in FINISHED:
            raise UserInputError(f"job {job_id} has already ended ({view.status})")
        atomic_write_text(self.path(job_id, "stop"), str(time.time()))
        if view.status == "running" and view.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(view.pid, signal.SIGINT)
            return f"stop sent to {job_id} (training saves a resumable state first)"
        return f"cancelled {job_id}"

    # ----- reading (anyone)
    def load(self, job_id: str) -> Job:
        if not _ID.fullmatch(job_id or ""):
            raise UserInputError(f"{job_id!r}: not a job id")
        try:
            data = json.loads(self.path(job_id, "json").read_text())
        except FileNotFoundError:
            raise UserInputError(f"no job {job_id} in {self.dir}") from None
        return Job(**data)

    def jobs(self) -> list[Job]:
        """Every job, oldest first (ids start with their creation time)."""
        return [self.load(p.stem) for p in sorted(self.dir.glob("*.json")) if _ID.fullmatch(p.stem)]

    def _read_json(self, job_id: str, ext: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(job_id, ext).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def view(self, job: Job) -> JobView:
        start = self._read_json(job.id, "start")
        rc = self._read_json(job.id, "rc")
        stop = self.path(job.id, "stop").exists()
        pid = start["pid"] if start else None
        if rc is not None:
            code = rc["returncode"]
            status = "stopped" if stop else ("done" if code == 0 else "failed")
        elif start is not None:
            status = "running" if pid_alive(pid) else "interrupted"
            code = None
        else:
            status, code = ("cancelled" if stop else "queued"), None
        log = self.log_tail(job.id)
        return JobView(job, status, pid, start and start["time"], code, tqdm_progress(log),
                       last_error(log) if status == "failed" else "")  # fmt: skip

    def views(self) -> list[JobView]:
        return [self.view(j) for j in self.jobs()]

    def next_queued(self) -> Job | None:
        for job in self.jobs():
            if self.view(job).status == "queued":
                return job
        return None

    def log_tail(self, job_id: str, size: int = 20000) -> str:
        path = self.path(job_id, "log")
        if not path.exists():
            return ""
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - size))
            return fh.read().decode("utf-8", "replace")

    # ----- the worker process
    def worker_alive(self) -> bool:
        """True while a worker holds the lock on jobs/worker.lock."""
        import fcntl

        with open(self.dir / "worker.lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False

    def ensure_worker(self) -> int | None:
        """Start the worker if queued jobs wait and none runs; it outlives the page (own session)."""
        if self.worker_alive() or self.next_queued() is None:
            return None
        log = open(self.dir / "worker.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorafuse.ui.worker", str(self.root)], cwd=self.root, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=job_env(),
        )  # fmt: skip
        log.close()
        atomic_write_text(self.dir / "worker.pid", json.dumps({"pid": proc.pid, "time": time.time()}))
        return proc.pid


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # one job at a time on a small machine: the job may use every core, the page stays responsive anyway
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (ended, not yet reaped by its parent) counts as ended
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def tqdm_progress(log: str) -> str:
    """The last progress bar's state in `log`: "desc 4/10 (40%)"."""
    matches = list(_TQDM.finditer(log))
    if not matches:
        return ""
    desc, pct, n, total = matches[-1].groups()
    desc = (desc or "").strip().splitlines()[-1] if desc and desc.strip() else ""
    return f"{desc + ' ' if desc else ''}{n}/{total} ({pct}%)"


def last_error(log: str) -> str:
    """The CLI's one-line error (`lorafuse CMD: error: ...`), else the last line of a traceback."""
    lines = [ln.strip() for ln in log.replace("\r", "\n").splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"lorafuse \S+( \S+)?: error:", line):
            return line
    return lines[-1] if lines else ""
