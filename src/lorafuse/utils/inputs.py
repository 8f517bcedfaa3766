"""Input files: one check that says what is wrong with a path the user gave, in the user's words.

Every reader of a user file (LoRA, config, caption, image) goes through `check_input_file` first, so a missing
file, a dangling symlink, a folder where a file belongs and an unreadable file each get their own message
naming the path, instead of a traceback or a misleading "no such file".
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from lorafuse.errors import UserInputError


def problem_with_file(path: Path, what: str = "file") -> str | None:
    """Why `path` cannot be read as a `what` (a phrase to follow "<path>: "), or None when it can."""
    if path.is_symlink() and not path.exists():
        return f"{what} is a symbolic link to {os.readlink(path)}, which does not exist"
    if not path.exists():
        return f"{what} not found (no such file)"
    if path.is_dir():
        return f"is a folder, not a {what}"
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except PermissionError:
        return f"permission denied: the {what} exists but cannot be read; check its permissions (ls -l)"
    except OSError as e:
        if e.errno == errno.EISDIR:
            return f"is a folder, not a {what}"
        return f"{what} cannot be read ({e.strerror or e})"
    return None


def check_input_file(
    path: str | os.PathLike, what: str = "file", error: type[UserInputError] = UserInputError
) -> Path:
    """`path` if it is a readable file, else one `error` naming it and the problem."""
    path = Path(path)
    problem = problem_with_file(path, what)
    if problem is not None:
        raise error(f"{path}: {problem}")
    return path


def read_text(path: str | os.PathLike, what: str = "text file", error: type[UserInputError] = UserInputError) -> str:
    """UTF-8 text of `path`; a binary or wrongly encoded file is one error naming it and the byte offset."""
    path = check_input_file(path, what, error)
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise error(f"{path}: {what} is a binary file, not UTF-8 text")
    try:
        return data.decode("utf-8-sig")  # tolerate the BOM Windows editors write
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(
            f"{path}: {what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); "
            "save it as UTF-8"
        ) from None
