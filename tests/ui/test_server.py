"""Where `lorafuse ui` binds and what it requires: loopback by default, --listen only with a token."""

from __future__ import annotations

import pytest

from lorafuse.errors import UserInputError
from lorafuse.ui.server import binding, check_login


def test_loopback_by_default():
    b = binding(listen=False, auth=None, port=7860)
    assert (b.host, b.token) == ("127.0.0.1", None)


def test_listen_refuses_without_token():
    with pytest.raises(UserInputError, match="refuses to start without a token"):
        binding(listen=True, auth=None, port=7860)
    with pytest.raises(UserInputError, match="needs --listen"):
        binding(listen=False, auth=None, port=7860, host="0.0.0.0")
    with pytest.raises(UserInputError, match="at least 8"):
        binding(listen=True, auth="short", port=7860)


def test_listen_with_token_or_generated():
    b = binding(listen=True, auth="s3cret-token", port=1)
    assert (b.host, b.token, b.generated) == ("0.0.0.0", "s3cret-token", False)
    g = binding(listen=True, auth="generate", port=1)
    assert g.generated and len(g.token) >= 20 and g.token != binding(listen=True, auth="generate", port=1).token
    check = check_login("s3cret-token")
    assert check("anyone", "s3cret-token") and not check("anyone", "s3cret-tokem")


def test_cli_listen_without_token_exits_with_the_message(capsys):
    from lorafuse.__main__ import main  # the entry point: the CLI plus `lorafuse ui`

    assert main(["ui", "--listen", "--port", "0"]) == 2
    assert "refuses to start without a token" in capsys.readouterr().err


def test_the_page_is_built_without_torch_and_quick_commands_run_in_the_helper(tmp_path):
    """The page's process serves without importing torch/diffusers (start-up time); the helper process has them
    and runs the CLI's quick commands, returning the CLI's one-line error."""
    import subprocess
    import sys

    script = f"""
import sys
from lorafuse.ui.app import build_app
from lorafuse.ui.workspace import Workspace
from lorafuse.ui.common import run_cli
from lorafuse.ui.tab_fuse import method_catalog
ws = Workspace.create({str(tmp_path / "ws")!r})
build_app(ws, max_upload=1 << 20)
heavy = [m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules]
assert not heavy, heavy
names, text = method_catalog()
assert "direct" in names and "klora" in names and "direct" in text
result = run_cli(["inspect", "missing.safetensors"], ws.root)
assert result.code == 2 and result.error.startswith("lorafuse inspect: error: "), result
assert "missing.safetensors" in result.error
assert not [m for m in ("torch", "diffusers") if m in sys.modules]
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_the_login_gate_denies_by_default():
    """With a token, only the login page's own files pass without the login cookie; every other route (also ones
    gradio adds later) needs a cookie that gradio issued at login."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from lorafuse.ui.server import LoginGate

    app = SimpleNamespace(auth=[("any", "t")], cookie_id="C", tokens={"good": "me"})
    reached = []

    async def inner(scope, receive, send):
        reached.append(scope["path"])

    def status(path, cookie=b""):
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": path, "app": app, "headers": [(b"cookie", cookie)] if cookie else []}
        # in a thread of its own: in the full suite the browser tests' session-wide playwright keeps an event loop
        # running in this thread, where asyncio.run refuses to start another
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, LoginGate(inner)(scope, None, send)).result()
        return 200 if reached and reached[-1] == path and not sent else sent[0]["status"]

    for path in ("/", "/assets/index.js", "/theme.css", "/config", "/gradio_api/startup-events"):
        assert status(path) == 200, path
    for path in ("/gradio_api/cancel", "/gradio_api/heartbeat/x", "/openapi.json", "/gradio_api/queue/join",
                 "/gradio_api/file=/ws/a.png", "/gradio_api/some-future-route", "/monitoring/x"):  # fmt: skip
        assert status(path) == 401, path
    assert status("/gradio_api/cancel", b"access-token-C=good") == 200
    assert status("/gradio_api/cancel", b"access-token-unsecure-C=good") == 200
    assert status("/gradio_api/cancel", b"access-token-C=forged") == 401
    assert status("/gradio_api/cancel", b"access-token-OTHER=good") == 401
    app.auth = None  # no token (loopback only): nothing to guard
    assert status("/gradio_api/cancel") == 200
