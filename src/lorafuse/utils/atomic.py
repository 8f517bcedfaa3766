"""Atomic writes and output checks: an interrupted write never leaves a half file under the final name, and a
path that cannot be written is refused before any model loads.

- `check_output(path, kind, estimate)`: the one pre-flight check of an output path (wrong kind, not writable,
  no space), called by every command before heavy work; the message names the user's path.
- `atomic_path(final)` / `atomic_folder(final)`: write under a temporary name beside `final`, rename on
  success; remove the temporary on every error. A full disk becomes one `OutputError`.
- Temporary names start with `TMP_PREFIX` and carry the writer's pid, so `sweep_stale(folder)` (run at every
  write's start in that folder) can remove what a killed run left without touching a live writer's files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from lorafuse.errors import OutputError

TMP_PREFIX = ".lorafuse-tmp-"
_MB = 1 << 20
# room left for the filesystem and logs on top of an output's estimated size
_SPACE_MARGIN = 16 * _MB
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _size(n: int) -> str:
    """Bytes for a message: a LoRA of a few kB must not read as '0 MB'."""
    if n >= _MB:
        return f"{n / _MB:.0f} MB"
    return f"{n / 1024:.0f} kB" if n >= 1024 else f"{n} bytes"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _tmp_owner(name: str) -> int | None:
    """The pid in `.lorafuse-tmp-<pid>-<random>-<name>`, or None if the name is not ours."""
    if not name.startswith(TMP_PREFIX):
        return None
    pid, _, _ = name[len(TMP_PREFIX) :].partition("-")
    return int(pid) if pid.isdigit() else None


def sweep_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries of dead writers in `folder` (left by kill -9 or a power cut); return what went."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        pid = _tmp_owner(entry.name)
        if pid is None or (pid != os.getpid() and _pid_alive(pid)):
            continue
        if pid == os.getpid():
            continue  # ours and still in use (nested writes)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def tmp_name(final: Path) -> Path:
    return final.with_name(f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-{final.name}")


def is_disk_full(exc: BaseException, folder: Path | None = None) -> bool:
    """True for a write that failed for lack of space, whichever library raised it (OSError from Python,
    SafetensorError with the OS message from safetensors). torch.save says only "file write failed", so any
    failed write into a `folder` left with under 1 MB free counts too."""
    if folder is not None and isinstance(exc, Exception):
        try:
            if shutil.disk_usage(_existing_ancestor(folder)).free < _MB:
                return True
        except OSError:
            pass
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path("/")


def disk_full_error(final: Path, exc: BaseException | None = None) -> OutputError:
    where = _existing_ancestor(final.parent)
    try:
        free = f"{_size(shutil.disk_usage(where).free)} free"
    except OSError:
        free = "free space unknown"
    return OutputError(
        f"{final}: the disk is full ({free} in {where}); nothing was written under this name. "
        "Free some space or choose another output location, then run again."
    )


def check_output(path: str | os.PathLike, *, kind: str = "file", estimate: int = 0, what: str = "output") -> Path:
    """Refuse an output path that cannot be written, before any work: one `OutputError` naming `path`.

    kind: "file" (replaced atomically if it exists) or "folder" (created if missing, reused if it exists).
    estimate: bytes the output will need; refused when the filesystem has less free (plus a small margin).
    """
    path = Path(path)
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    if kind == "file" and path.is_dir():
        raise OutputError(f"{path}: the {what} path is an existing folder; give a file name (e.g. {path / 'out'}…)")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise OutputError(f"{path}: the {what} path is an existing file, but a folder is needed; choose another name")
    anchor = _existing_ancestor(path if kind == "folder" else path.parent)
    if not anchor.is_dir():
        raise OutputError(
            f"{path}: cannot create the {what} there, because {anchor} is a file, not a folder"
        )
    probe_dir = path if kind == "folder" and path.is_dir() else anchor
    _probe_writable(path, probe_dir, what)
    if estimate > 0:
        free = shutil.disk_usage(probe_dir).free
        if free < estimate + _SPACE_MARGIN:
            raise OutputError(
                f"{path}: not enough disk space for the {what}: it needs about {_size(estimate)} plus "
                f"{_size(_SPACE_MARGIN)} of headroom, and {_size(free)} are free in {probe_dir}. Free some space "
                "or choose another location."
            )
    return path


def _probe_writable(path: Path, folder: Path, what: str) -> None:
    """Create and remove a temporary file: the only test that also holds for root, read-only mounts and ACLs."""
    probe = folder / f"{TMP_PREFIX}{os.getpid()}-probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as e:
        reason = "permission denied" if e.errno in (errno.EACCES, errno.EPERM) else (e.strerror or str(e)).lower()
        raise OutputError(
            f"{path}: cannot write the {what} there ({folder}: {reason}); choose a folder you can write to"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it onto `final`, on error delete it.

    The temp file lives in the same folder so the rename is atomic on POSIX (same filesystem). The file gets
    the permissions a plain open() would give (0666 minus umask), also when the writer (safetensors) replaced
    our temp file with its own 0600 one.
    """
    final = Path(final)
    if final.is_dir():
        raise OutputError(f"{final}: is an existing folder; cannot write a file under this name")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{final}: cannot create its folder ({e.strerror or e})") from None
    sweep_stale(final.parent)
    tmp = tmp_name(final)
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666 & ~_umask())
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(final, e) from None
        raise OutputError(f"{final}: cannot write here ({e.strerror or e})") from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, Exception) and is_disk_full(e, final.parent):
            raise disk_full_error(final, e) from None
        raise


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` (rename), on error it is removed.

    A folder cannot be renamed onto a non-empty one, so the old one is moved aside first and deleted after;
    a kill between the two renames leaves the old folder under a temporary name, which the next sweep removes.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise OutputError(f"{final}: is an existing file; cannot write a folder under this name")
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final.parent)
    tmp = tmp_name(final)
    try:
        tmp.mkdir(mode=0o777)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(final, e) from None
        raise OutputError(f"{final}: cannot write here ({e.strerror or e})") from None
    try:
        yield tmp
        old = tmp_name(final)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e, final.parent):
            raise disk_full_error(final, e) from None
        raise


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def safetensors_bytes_to(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file to `path` (a temporary of ours) ourselves: `safetensors.torch.save_file`
    writes through its own `.tmpXXXXXX` file, which a kill leaves behind under a name no sweep can claim."""
    from safetensors.torch import save

    Path(path).write_bytes(save(tensors, metadata=metadata))


def atomic_save_safetensors(final: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    with atomic_path(final) as tmp:
        safetensors_bytes_to(tmp, tensors, metadata)
    return Path(final)
