"""`lorafuse ui`'s login token: where it is read from (file, option, environment; which wins), the file's checks,
and that no process the UI starts receives it."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest

from lorafuse.errors import UserInputError
from lorafuse.ui.auth import GENERATE, TOKEN_ENV, read_token_file, take_token


def token_file(tmp_path, text: str | bytes, mode: int = 0o600):
    path = tmp_path / "token"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    path.chmod(mode)
    return path


def test_precedence_file_then_option_then_environment(tmp_path):
    path = token_file(tmp_path, "from-the-file-123\n")
    env = {TOKEN_ENV: "from-the-env-456", "HOME": "/h"}
    choice = take_token(None, path, env)
    assert (choice.token, choice.source) == ("from-the-file-123", f"--auth-file {path}")
    assert env == {"HOME": "/h"}  # taken out of the environment even though the file won
    assert any(f"{TOKEN_ENV} is set but ignored" in w for w in choice.warnings)

    env = {TOKEN_ENV: "from-the-env-456"}
    choice = take_token("on-the-command-line", None, env)
    assert (choice.token, choice.source) == ("on-the-command-line", "--auth") and env == {}
    assert any("can be read by every user of this machine" in w and TOKEN_ENV in w and "--auth-file" in w
               for w in choice.warnings)  # fmt: skip

    env = {TOKEN_ENV: "  from-the-env-456\n"}
    choice = take_token(None, None, env)
    assert (choice.token, choice.source, choice.warnings) == ("from-the-env-456", TOKEN_ENV, []) and env == {}

    choice = take_token(GENERATE, None, {})
    assert (choice.token, choice.warnings) == (GENERATE, [])  # a generated token is printed once, never typed
    assert take_token(None, None, {TOKEN_ENV: ""}).token is None  # empty counts as unset
    assert take_token(None, None, {}).token is None
    with pytest.raises(UserInputError, match="give one of them"):
        take_token("on-the-command-line", path, {})


def test_the_default_environment_is_os_environ(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-the-env-456")
    assert take_token(None, None).token == "from-the-env-456"
    assert TOKEN_ENV not in os.environ


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("secret-token-1\n", 0o644, r"other users may read it \(mode 0644\); run `chmod 600"),
        ("secret-token-1\n", 0o640, r"other users may read it \(mode 0640\)"),
        ("", 0o600, "the file is empty"),
        ("short\n", 0o600, "at least 8 characters"),
        ("two words here\n", 0o600, "one line holding the token"),
        ("line-one-xx\nline-two-xx\n", 0o600, "one line holding the token"),
        (b"\xff\xfe\x00binary", 0o600, "not a text file"),
        ("x" * 5000, 0o600, "one line holding the token"),
        ("generate\n", 0o600, "'generate' works only as --auth generate"),
    ],
)
def test_a_bad_token_file_is_refused_with_its_reason(tmp_path, text, mode, message):
    path = token_file(tmp_path, text, mode)
    with pytest.raises(UserInputError, match=message) as refused:
        read_token_file(path)
    assert str(path) in str(refused.value)


def test_a_token_file_that_is_not_a_regular_file_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        read_token_file(tmp_path / "missing")
    with pytest.raises(UserInputError, match="not a regular file"):
        read_token_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UserInputError, match="not a regular file"):  # refused at once, not blocked on a writer
        read_token_file(fifo)
    with pytest.raises(UserInputError, match="not a regular file"):
        read_token_file("/dev/zero")


def test_a_symlink_to_a_private_file_is_read(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(token_file(tmp_path, "secret-token-1\n"))
    assert read_token_file(link) == "secret-token-1"


def test_the_jobs_never_receive_the_token(monkeypatch):
    """The worker is started with `job_env()`, and a forked job replaces its environment with it: the token that
    an older page left in the worker's environment is gone too."""
    from lorafuse.ui.jobs import job_env

    monkeypatch.setenv(TOKEN_ENV, "from-the-env-456")
    monkeypatch.setenv("LORAFUSE_KEEP_ME", "1")
    env = job_env()
    assert TOKEN_ENV not in env and env["LORAFUSE_KEEP_ME"] == "1" and env["PYTHONUNBUFFERED"] == "1"


def test_the_worker_process_starts_without_the_token(tmp_path, monkeypatch):
    """What the kernel shows of the started worker (/proc/PID/environ and cmdline), not only the dict it was given."""
    import signal
    import time
    from pathlib import Path

    from lorafuse.ui.jobs import JobStore

    store = JobStore(tmp_path)
    store.submit("probe", "probe", ["--version"])
    monkeypatch.setenv(TOKEN_ENV, "from-the-env-456")
    pid = store.ensure_worker()
    try:
        cmdline = Path(f"/proc/{pid}/cmdline")
        deadline = time.monotonic() + 60
        while b"lorafuse.ui.worker" not in cmdline.read_bytes():  # until it has exec'd (a fork shows our own)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert b"from-the-env-456" not in Path(f"/proc/{pid}/environ").read_bytes()
        assert b"from-the-env-456" not in cmdline.read_bytes()
    finally:
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):  # subprocess may have reaped it already
            os.waitpid(pid, 0)


def test_a_forked_job_runs_without_the_token(tmp_path, monkeypatch):
    """The worker's fork path, with the job's runner replaced by one that records the forked process's
    environment and argv."""
    import json

    from lorafuse.ui import runner, worker
    from lorafuse.ui.jobs import JobStore

    store = JobStore(tmp_path)
    job = store.submit("probe", "probe", ["--version"])
    seen = tmp_path / "env.json"

    def record(root, job_id):  # runs in the forked child
        seen.write_text(json.dumps({"env": dict(os.environ), "argv": sys.argv}))
        return 0

    monkeypatch.setattr(runner, "run", record)
    monkeypatch.setenv(TOKEN_ENV, "from-the-env-456")
    assert worker._fork_job(tmp_path, store, job) == 0
    got = json.loads(seen.read_text())
    assert TOKEN_ENV not in got["env"] and "from-the-env-456" not in json.dumps(got)
    assert os.environ[TOKEN_ENV] == "from-the-env-456"  # the worker's own environment is untouched


def test_cli_refusals_name_the_alternatives(tmp_path, capsys):
    from lorafuse.__main__ import main  # the entry point: the CLI plus `lorafuse ui`

    assert main(["ui", "--listen", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "refuses to start without a token" in err and TOKEN_ENV in err and "--auth-file" in err
    path = token_file(tmp_path, "secret-token-1\n", 0o644)
    assert main(["ui", "--listen", "--port", "0", "--auth-file", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lorafuse ui: error: --auth-file {path}: other users may read it (mode 0644); run `chmod 600 {path}` so "
        "only you can"
    )
    # a token on the command line: the warning, then (here) the binding's refusal, before anything starts
    assert main(["ui", "--auth", "secret-token-1", "--host", "10.0.0.1", "--port", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("lorafuse ui: warning: a token given as --auth TOKEN can be read by every user")
    assert "needs --listen" in lines[1] and len(lines) == 2
