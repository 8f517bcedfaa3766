"""Atomic writes and output checks: an interrupted write never leaves a half file under the final name, and a
path that cannot be written is refused before any model loads.

- `check_output(path, kind, estimate)`: the one pre-flight check of an output path (wrong kind, not writable,
  no space), called by every command before heavy work; the message names the user's path.
- `atomic_path(final)` / `atomic_folder(final)`: write under a temporary name beside `final`, rename on
  success; remove the temporary on every error. A full disk becomes one `OutputError`.
- Temporary names start with `TMP_PREFIX` and carry the writer's pid, so `sweep_stale(folder)` (run at every
  write's start in that folder) can remove what a killed run left without touching a live writer's files.
- An output path that is a symbolic link is written through: the link stays and its target gets the new
  content (as `cp` and a shell's `>` do), for files and folders alike.
- `png_bytes(width, height)`: the one upper bound of a PNG's size that writers' estimates use.
- `check_output(kind="folder")` remembers the folders it will create; `discard_created_folders()` (called by the
  CLI when a command fails or is interrupted) removes those of them that are still empty.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from lorafuse.errors import OutputError
from lorafuse.utils.temps import _NAME_MAX, HOST, TMP_PREFIX, _started_at, sweep_stale, tmp_name  # noqa: F401 (re-exported)

_MB = 1 << 20
# room left for the filesystem and logs on top of an output's estimated size
_SPACE_MARGIN = 16 * _MB
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _size(n: int) -> str:
    """Bytes for a message: a LoRA of a few kB must not read as '0 MB'."""
    if n >= _MB:
        return f"{n / _MB:.0f} MB"
    return f"{n / 1024:.0f} kB" if n >= 1024 else f"{n} bytes"


def png_bytes(width: int, height: int, channels: int = 3) -> int:
    """An upper bound of a PNG file's size: the raw rows (a filter byte each) plus deflate's worst case (stored
    blocks, 5 bytes per 64 kB, and 12 bytes of chunk framing per 64 kB IDAT chunk), the signature, IHDR, IEND
    and a small text chunk (matplotlib's "Software"). Photographs compress to 30-70 % of it; flat pictures (world
    renders, grids on white, plots) much better, which is why it stays a bound."""
    raw = height * (1 + width * channels)
    return raw + raw // 4096 + 1024


def same_filesystem(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two (maybe not yet existing) paths land on one filesystem, so their writes share its free space."""
    try:
        return os.stat(_existing_ancestor(Path(a))).st_dev == os.stat(_existing_ancestor(Path(b))).st_dev
    except OSError:
        return False


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def resolve_link(path: str | os.PathLike) -> Path:
    """`path`, or the file or folder it links to: outputs are written through symbolic links."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _reason(e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return (e.strerror or str(e)).lower()


def _cannot_write(final: Path, e: OSError, what: str = "output") -> OutputError:
    """One message for a write refused by the OS, naming the user's path and, if it differs, the folder."""
    if is_disk_full(e):
        return disk_full_error(final, e)
    anchor = _existing_ancestor(final.parent)
    if not anchor.is_dir():
        return OutputError(f"{final}: cannot create the {what} there, because {anchor} is a file, not a folder")
    where = f"{anchor}: " if anchor != final else ""
    return OutputError(f"{final}: cannot write the {what} there ({where}{_reason(e)}); choose a folder you can write to")


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
        if parent.exists() or parent.is_symlink():
            return parent
    return Path("/")


# folders `check_output` found missing (so the command will create them): removed again, if still empty, when
# the command fails (`discard_created_folders`), so a refused or interrupted run leaves no empty output folder
_CREATED: list[Path] = []


def _note_created(path: Path) -> None:
    top = path.absolute()
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    _CREATED.append(top)


def discard_created_folders() -> list[Path]:
    """Remove the folders `check_output` saw missing that hold no file now (empty subfolders included)."""
    removed = []
    while _CREATED:
        top = _CREATED.pop()
        if not top.is_dir() or top.is_symlink():
            continue
        subdirs = sorted((p for p in top.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts))
        if any(not p.is_dir() or p.is_symlink() for p in top.rglob("*")):
            continue  # something was written: whole files (every write is atomic), kept
        for p in [*subdirs, top]:
            with contextlib.suppress(OSError):
                p.rmdir()
        removed.append(top)
    return removed


def forget_created_folders() -> None:
    _CREATED.clear()


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
    _check_name(Path(path), what)
    given, path = Path(path), resolve_link(path)
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    if path != given:
        try:
            _check_target(path, kind, estimate, what)
        except OutputError as e:
            raise OutputError(f"{given} (a link to {path}): {str(e).removeprefix(f'{path}: ')}") from None
        return given
    _check_target(path, kind, estimate, what)
    return path


def _special(path: Path) -> str | None:
    """What `path` is if it exists but is neither a regular file nor a folder (the rename that ends an atomic
    write would put a regular file in place of a device such as /dev/null, or of a FIFO)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return name
    return None


def _check_name(path: Path, what: str = "output") -> None:
    size = len(os.fsencode(path.name))
    if size > _NAME_MAX:
        raise OutputError(f"{path.parent / path.name[:40]}…: the {what} name is {size} bytes long; file systems "
                          f"allow {_NAME_MAX} per name; choose a shorter one")  # fmt: skip


def _check_target(path: Path, kind: str, estimate: int, what: str) -> None:
    if kind == "file" and path.is_dir():
        raise OutputError(f"{path}: the {what} path is an existing folder; give a file name (e.g. {path / 'out'}…)")
    special = _special(path)
    if special:
        raise OutputError(f"{path}: the {what} path is {special}, not a file or folder; give another name")
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
    if kind == "folder" and not path.exists():
        _note_created(path)


def _probe_writable(path: Path, folder: Path, what: str) -> None:
    """Create and remove a temporary file: the only test that also holds for root, read-only mounts and ACLs."""
    probe = folder / f"{TMP_PREFIX}{os.getpid()}-probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as e:
        raise OutputError(
            f"{path}: cannot write the {what} there ({folder}: {_reason(e)}); choose a folder you can write to"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _prepare(final: Path, kind: str) -> None:
    """The checks every atomic write starts with: the name's kind, its folder (created), the stale sweep."""
    special = _special(final)
    if special:
        raise OutputError(f"{final}: is {special}; an output is written as a new file or folder under its name")
    if kind == "file" and final.is_dir():
        raise OutputError(f"{final}: is an existing folder; cannot write a file under this name")
    if kind == "folder" and final.exists() and not final.is_dir():
        raise OutputError(f"{final}: is an existing file; cannot write a folder under this name")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(final, e) from None
    sweep_stale(final.parent)


def _fsync(path: Path) -> None:
    """Flush a written file (or a folder's entries) to the disk, so a power cut after the rename cannot leave
    an empty file under the final name; a kill -9 alone never could (the kernel keeps the written pages)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it onto `final`, on error delete it.

    The temp file lives in the same folder so the rename is atomic on POSIX (same filesystem). The file gets
    the permissions a plain open() would give (0666 minus umask), also when the writer (safetensors) replaced
    our temp file with its own 0600 one. A symbolic link `final` keeps pointing at the new file.
    """
    _check_name(Path(final))
    user, final = Path(final), resolve_link(final)
    _prepare(final, "file")
    tmp = tmp_name(final)
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666 & ~_umask())
    except OSError as e:
        raise _cannot_write(user, e) from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, Exception) and is_disk_full(e, final.parent):
            raise disk_full_error(user, e) from None
        raise


def _umask_modes(folder: Path) -> None:
    """Files 0666 and folders 0777 minus the umask, as a plain open()/mkdir() gives: libraries writing into the
    folder (diffusers' save_pretrained through safetensors) leave 0600 files otherwise."""
    umask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE; the standard library has no binding).
    False where the system or file system cannot: the caller falls back to two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`, on error it is removed.

    An existing `final` is swapped with the new folder in one step where the system allows it; elsewhere it is
    moved aside first (`.lorafuse-tmp-<pid>-<hex>.old-<name>`) and deleted after, and a kill between the two
    renames leaves it aside, where the next sweep puts it back: the old folder or the new one, never neither.
    """
    _check_name(Path(final))
    user, final = Path(final), resolve_link(final)
    _prepare(final, "folder")
    tmp = tmp_name(final)
    try:
        tmp.mkdir(mode=0o777)
    except OSError as e:
        raise _cannot_write(user, e) from None
    old = tmp_name(final, aside=True)
    try:
        yield tmp
        _umask_modes(tmp)
        _fsync(tmp)
        if final.exists() and _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now under the temporary name
        elif final.exists():
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            with contextlib.suppress(OSError):
                os.replace(old, final)  # the second rename failed: the old folder goes back
        if isinstance(e, Exception) and is_disk_full(e, final.parent):
            raise disk_full_error(user, e) from None
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
