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
dead without rc -> interrupted (the machine went down); stop without start -> cancelled; else queued. A job file
that cannot be read (edited by hand, a disk that filled up) is listed as "unreadable" with the reason, never run,
and never stops the page or the worker from reading the others.
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
FINISHED = ("done", "failed", "stopped", "cancelled", "interrupted", "unreadable")
# tqdm's text form: "desc:  40%|████      | 4/10 [00:01<00:02, ...]"
_CLI_ERROR = re.compile(r"lorafuse [\w-]+( [\w-]+)?: error: .*")
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
    # the workspace paths it reads, checked when queued and again when it starts (a symlink out made meanwhile)
    inputs: list[str] = field(default_factory=list)

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
               continue_of: str | None = None, inputs: list[str] | None = None) -> Job:  # fmt: skip
        now = time.time()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        job_id = f"{stamp}-{int(now * 1000) % 1000:03d}-{kind}"
        while self.path(job_id, "json").exists():  # two jobs in the same millisecond
            job_id += "x"
        job = Job(job_id, kind, title, [str(a) for a in argv], dict(outputs or {}), now, continue_of, list(inputs or []))
        atomic_write_text(self.path(job_id, "json"), json.dumps(job.__dict__, indent=1))
        return job

    def request_stop(self, job_id: str) -> str:
        """Stop a running job (SIGINT: training saves its state) or cancel a queued one."""
        view = self.view(self.load(job_id))
        if view.status in FINISHED:
            raise UserInputError(f"job {job_id} has already ended ({view.status})")
        if view.status == "running" and self.path(job_id, "stop").exists():
            # a second SIGINT is a second Ctrl-C: training gives up its clean stop and exits without the state it is
            # saving, so a second click must not send one
            return (f"stop already sent to {job_id}; it is saving its state and ends after this step (to end it at "
                    f"once, without that state: kill {view.pid})")  # fmt: skip
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
        path = self.path(job_id, "json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            job = Job(**data)
        except FileNotFoundError:
            raise UserInputError(f"no job {job_id} in {self.dir}") from None
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
            raise UserInputError(f"jobs/{path.name}: not a readable job file ({type(e).__name__}: {e})") from None
        if job.id != job_id or not all(isinstance(v, t) for v, t in ((job.argv, list), (job.outputs, dict), (job.inputs, list))):
            raise UserInputError(f"jobs/{path.name}: not a readable job file (its fields do not match its name)")
        return job

    def jobs(self) -> list[Job]:
        """Every job, oldest first (ids start with their creation time); an unreadable job file comes back as a
        job of kind "unreadable" whose title says why (see `view`), so one bad file hides nothing else."""
        found = []
        for p in sorted(self.dir.glob("*.json")):
            if not _ID.fullmatch(p.stem):
                continue
            try:
                found.append(self.load(p.stem))
            except UserInputError as e:
                found.append(Job(p.stem, "unreadable", str(e), []))
        return found

    def _read_json(self, job_id: str, ext: str, keys: tuple[str, ...]) -> dict[str, Any] | None:
        """A small state file, or None if it is missing; one that is there but unreadable (or lacks `keys`)
        comes back as {} so the caller can tell it from a missing one."""
        try:
            data = json.loads(self.path(job_id, ext).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError):
            return {}
        return data if isinstance(data, dict) and all(k in data for k in keys) else {}

    def view(self, job: Job) -> JobView:
        if job.kind == "unreadable":
            return JobView(job, "unreadable", None, None, None, "", job.title)
        start = self._read_json(job.id, "start", ("pid", "time"))
        rc = self._read_json(job.id, "rc", ("returncode",))
        stop = self.path(job.id, "stop").exists()
        pid = start.get("pid") if start else None
        pid = pid if isinstance(pid, int) else None
        error = ""
        if rc is not None:
            code = rc.get("returncode")
            code = code if isinstance(code, int) else None
            status = "stopped" if stop else ("done" if code == 0 else "failed")
            if code is None:
                error = f"jobs/{job.id}.rc: unreadable exit status"
        elif start is not None:
            began = start.get("time")
            status = "running" if pid_alive(pid, began if isinstance(began, (int, float)) else None) else "interrupted"
            code = None
        else:
            status, code = ("cancelled" if stop else "queued"), None
        log = self.log_tail(job.id)
        if status == "failed" and not error:
            error = rc.get("error") or last_error(log)
        started = start.get("time") if start else None
        return JobView(job, status, pid, started if isinstance(started, (int, float)) else None, code,
                       tqdm_progress(log), error)  # fmt: skip

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
    """The environment of the job worker and its jobs: the page's, without the UI's login token (a job runs
    whatever command line was queued and logs it; it has no use for the token)."""
    from lorafuse.ui.auth import TOKEN_ENV

    env = dict(os.environ)
    env.pop(TOKEN_ENV, None)
    env["PYTHONUNBUFFERED"] = "1"
    # one job at a time on a small machine: the job may use every core, the page stays responsive anyway
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def pid_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether `pid` still runs the process that was started at `started` (epoch seconds): after a reboot the
    same pid can belong to another program, which must not keep a job "running" (and the queue waiting)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie (ended, not yet reaped by its parent) counts as ended
            return False
        if started is not None:
            boot = next(float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                        if ln.startswith("btime "))  # fmt: skip
            began = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
            # the job's start file is written just after its process starts: a process begun well after that
            # is another program that got the pid
            return began <= started + 5.0
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
        # anywhere in the line: a progress bar drawn without a newline after it runs into the error line
        found = _CLI_ERROR.search(line)
        if found:
            return found.group(0)
    return lines[-1] if lines else ""
