"""Temporary names of atomic writes, and the sweep that removes those of dead writers.

`.lorafuse-tmp-<pid>-<host><random>-<name>`: the pid and the host say whose a temporary is, so `sweep_stale`
(run at every write's start in a folder) removes what a killed run left without touching a live writer's files,
on this machine or on another one sharing the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

TMP_PREFIX = ".lorafuse-tmp-"
_NAME_MAX = 255  # bytes in one path component, on every common file system


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _started_at(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from Linux's /proc; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, counted after the command's name
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))  # fmt: skip
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _writer_alive(pid: int, entry: Path) -> bool:
    """Whether the process that made `entry` still runs: its pid is alive and was not reused since (after a
    restart, container pids start again from 1, so a killed run's pid is soon someone else's). A process
    cannot have made a file before it started; the 2 s cover /proc's clock-tick rounding."""
    if not _pid_alive(pid):
        return False
    started = _started_at(pid)
    if started is None:
        return True
    try:
        made = entry.lstat().st_mtime
    except OSError:
        return True
    return made >= started - 2.0


def _tmp_owner(name: str) -> int | None:
    """The pid in `.lorafuse-tmp-<pid>-<random>-<name>`, or None if the name is not ours."""
    if not name.startswith(TMP_PREFIX):
        return None
    pid, _, _ = name[len(TMP_PREFIX) :].partition("-")
    return int(pid) if pid.isdigit() else None


# an old folder that `atomic_folder` moved aside: `.lorafuse-tmp-<pid>-<host><hex>.old-<name>`
_ASIDE = re.compile(r"^\d+-[0-9a-f]+\.old-(?P<name>.+)$")
_TAG = re.compile(r"^\d+-(?P<tag>[0-9a-f]+)[-.]")
# which machine (or container) wrote a temporary: a pid means nothing on another one sharing the folder (NFS, a
# volume mounted in two containers), so their temporaries are left alone unless a day old
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]
_FOREIGN_AGE = 24 * 3600


def _foreign_age(entry: Path) -> bool | None:
    """For a temporary another host wrote: True while it may still be written (under a day old), None once it
    is older; False for this host's own (and for names from before temporaries carried the host)."""
    tag = _TAG.match(entry.name[len(TMP_PREFIX) :])
    if tag is None or len(tag["tag"]) != 10 or tag["tag"][:4] == HOST:
        return False
    try:
        return True if time.time() - entry.lstat().st_mtime < _FOREIGN_AGE else None
    except OSError:
        return True


def sweep_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries of dead writers in `folder` (left by kill -9 or a power cut); return what went.

    An old folder that a killed `atomic_folder` had moved aside while its replacement was not yet in place
    goes back under its name (the previous output, whole), rather than being deleted."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = sorted(folder.iterdir(), key=lambda e: not _ASIDE.match(e.name[len(TMP_PREFIX) :]))
    except OSError:
        return removed
    for entry in entries:
        pid = _tmp_owner(entry.name)
        if pid is None:
            continue  # not a temporary of ours
        foreign = _foreign_age(entry)
        if foreign is True:
            continue  # another host's, maybe still being written
        if foreign is False and _writer_alive(pid, entry):
            continue  # a running writer's (this process's own too: nested writes)
        aside = _ASIDE.match(entry.name[len(TMP_PREFIX) :])
        if aside and not (folder / aside["name"]).exists() and not (folder / aside["name"]).is_symlink():
            with contextlib.suppress(OSError):
                os.replace(entry, folder / aside["name"])
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def tmp_name(final: Path, aside: bool = False) -> Path:
    head, name = f"{TMP_PREFIX}{os.getpid()}-{HOST}{secrets.token_hex(3)}", final.name
    if len(os.fsencode(f"{head}.old-{name}")) <= _NAME_MAX:
        return final.with_name(f"{head}{'.old' if aside else ''}-{name}")
    # a long but valid name must not make the temporary too long; cut, it can no longer name the folder to put
    # back, so an aside folder then carries no `.old` mark (the sweep deletes it)
    while len(os.fsencode(f"{head}-{name}")) > _NAME_MAX:
        name = name[1:]
    return final.with_name(f"{head}-{name}")
