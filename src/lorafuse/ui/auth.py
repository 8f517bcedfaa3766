"""Where `lorafuse ui`'s login token comes from, kept off the command line.

A process's command line is public on a shared machine: `ps` and /proc/PID/cmdline show it to every local user.
Its environment (/proc/PID/environ) and a file of mode 600 are readable by their owner only. So the token is
taken, first match wins, from

    --auth-file PATH     the file's one line; refused if group or others may read it (see `read_token_file`)
    --auth TOKEN         works, with a warning that other users can see it; `--auth generate` makes a fresh one
    LORAFUSE_UI_TOKEN    the environment variable (an empty value counts as unset)

and once read it is removed from the page's environment (`take_token`), so the helper process, the job worker
and the jobs never receive it (`jobs.job_env` removes it again, for a worker started by an older page).
"""

from __future__ import annotations

import os
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from lorafuse.errors import UserInputError

TOKEN_ENV = "LORAFUSE_UI_TOKEN"
GENERATE = "generate"
MIN_TOKEN_CHARS = 8
_MAX_FILE_BYTES = 4096  # a token is a line; anything longer is the wrong file


@dataclass(frozen=True)
class TokenChoice:
    token: str | None  # the token, GENERATE, or None (no login)
    source: str  # where it came from, for messages: "--auth", "--auth-file t.txt", "LORAFUSE_UI_TOKEN", ""
    warnings: list[str] = field(default_factory=list)  # one line each, printed by `lorafuse ui`


def take_token(auth: str | None, auth_file: str | os.PathLike | None,
               environ: MutableMapping[str, str] | None = None) -> TokenChoice:  # fmt: skip
    """The token `lorafuse ui` requires, from the sources above; removes TOKEN_ENV from `environ` (default
    os.environ) whether or not it was the one used, so no child process inherits it."""
    environ = os.environ if environ is None else environ
    from_env = environ.pop(TOKEN_ENV, "").strip()
    if auth is not None and auth_file is not None:
        raise UserInputError("--auth and --auth-file: give one of them")
    notes = []
    if from_env and (auth is not None or auth_file is not None):
        notes.append(f"{TOKEN_ENV} is set but ignored: {'--auth-file' if auth_file is not None else '--auth'} "
                     "given on the command line wins")  # fmt: skip
    if auth_file is not None:
        return TokenChoice(read_token_file(auth_file), f"--auth-file {os.fspath(auth_file)}", notes)
    if auth == GENERATE:
        return TokenChoice(GENERATE, "--auth", notes)
    if auth is not None:
        _check(auth, "--auth")
        notes.append(f"a token given as --auth TOKEN can be read by every user of this machine (ps, /proc/PID/cmdline); "
                     f"set {TOKEN_ENV} or use --auth-file PATH (mode 600) instead")  # fmt: skip
        return TokenChoice(auth, "--auth", notes)
    if from_env:
        _check(from_env, TOKEN_ENV)
        return TokenChoice(from_env, TOKEN_ENV, notes)
    return TokenChoice(None, "", notes)


def read_token_file(path: str | os.PathLike) -> str:
    """The token in `path`: a regular file holding one line, readable by its owner only. Group- or
    world-readable is refused, not merely warned about, as ssh refuses such a private key: a token others can read
    guards nothing, and the fix is one `chmod 600`."""
    name = os.fspath(path)
    # O_NONBLOCK: opening a FIFO must not hang the start-up; the type is checked on the opened file itself (fstat),
    # so the file cannot be swapped between the check and the read
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UserInputError(f"--auth-file {name}: no such file") from None
    except OSError as e:
        raise UserInputError(f"--auth-file {name}: cannot be read ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserInputError(f"--auth-file {name}: not a regular file")
        if info.st_mode & 0o077:
            raise UserInputError(
                f"--auth-file {name}: other users may read it (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run `chmod 600 {name}` so only you can"
            )
        data = os.read(fd, _MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UserInputError(f"--auth-file {name}: not a text file (expected one line, the token)") from None
    if not text:
        raise UserInputError(f"--auth-file {name}: the file is empty; put the token in it (one line)")
    if len(data) > _MAX_FILE_BYTES or any(c.isspace() for c in text):
        raise UserInputError(f"--auth-file {name}: expected one line holding the token, without spaces")
    _check(text, f"--auth-file {name}")
    return text


def _check(token: str, source: str) -> None:
    if token == GENERATE and source != "--auth":
        raise UserInputError(f"{source}: 'generate' works only as --auth generate; put the token itself here")
    if len(token) < MIN_TOKEN_CHARS:
        raise UserInputError(f"{source}: a token needs at least {MIN_TOKEN_CHARS} characters "
                             "(or use --auth generate)")  # fmt: skip
