"""Input files: one check that says what is wrong with a path the user gave, in the user's words.

Every reader of a user file (LoRA, config, caption, image) goes through `check_input_file` first, so a missing
file, a dangling symlink, a folder where a file belongs and an unreadable file each get their own message
naming the path, instead of a traceback or a misleading "no such file".
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
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
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Windows Notepad's "Unicode"
        raise error(f"{path}: {what} is UTF-16 text; save it as UTF-8")
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


def shape_mismatch(
    got: Mapping[str, Sequence[int]], want: Mapping[str, Sequence[int]], phrases: tuple[str, str, str], **fields: str
) -> str | None:
    """How the named shapes `got` (a file's) differ from `want` (a model's), or None when they match: one phrase
    each for names only in `want`, names only in `got`, and names with other shapes, "; "-joined. A phrase is a
    format string over n (how many), total (len(want)), name (the first, sorted), got / want (its two shapes)
    and `fields`."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if tuple(got[k]) != tuple(want[k]))
    parts = [
        phrase.format(n=len(names), total=len(want), name=names[0], got=tuple(got.get(names[0], ())),
                      want=tuple(want.get(names[0], ())), **fields)
        for phrase, names in zip(phrases, (missing, extra, wrong), strict=True)
        if names
    ]  # fmt: skip
    return "; ".join(parts) or None
