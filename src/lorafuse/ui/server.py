"""Starting the web app: where it listens, who may use it, and the workspace it is confined to.

By default it binds 127.0.0.1 only. `--listen` (any host may connect) needs a token: from LORAFUSE_UI_TOKEN,
`--auth-file PATH`, `--auth TOKEN`, or `--auth generate` for a random one that is printed once (`auth.take_token`
says where it comes from). With a token, the page asks for it as the password (any user name) and every route,
files included, needs the login.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from lorafuse.errors import UserInputError
from lorafuse.ui.auth import GENERATE, MIN_TOKEN_CHARS, TOKEN_ENV

LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class Binding:
    host: str
    port: int
    token: str | None
    generated: bool = False


def binding(*, listen: bool, auth: str | None, port: int, host: str | None = None, source: str = "--auth") -> Binding:
    """Where to bind and which token to require (`auth`: a token, GENERATE or None; `source` names where it came
    from, for the message); refuses to open to other hosts without a token."""
    if auth is not None and auth != GENERATE and len(auth) < MIN_TOKEN_CHARS:
        raise UserInputError(f"{source}: a token needs at least {MIN_TOKEN_CHARS} characters (or use --auth generate)")
    if not listen:
        if host not in (None, LOCALHOST, "localhost"):
            raise UserInputError(f"--host {host}: binding another address needs --listen (and --auth)")
        token, generated = _token(auth)
        return Binding(LOCALHOST, port, token, generated)
    if auth is None:
        raise UserInputError(
            f"--listen opens the UI to other machines; it refuses to start without a token: set {TOKEN_ENV}, "
            "give --auth-file PATH (a file only you can read), or --auth generate to have one made and printed"
        )
    token, generated = _token(auth)
    return Binding(host or "0.0.0.0", port, token, generated)


def _token(auth: str | None) -> tuple[str | None, bool]:
    if auth == GENERATE:
        return secrets.token_urlsafe(18), True
    return auth, False


def check_login(token: str):
    """Gradio's auth callable: any user name, the token as password (compared in constant time)."""

    def check(_user: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), token.encode())

    return check


# what the login page itself loads before anyone has logged in (the app's script, styles, icons, and the config
# route, which answers 401 itself and so tells the page to show the login form), and gradio's own start-up self-check;
# every other route needs the login
OPEN_PATHS = frozenset({"/", "/login", "/login/", "/config", "/config/", "/favicon.ico", "/manifest.json",
                        "/theme.css", "/gradio_api/theme.css", "/robots.txt", "/gradio_api/login_check",
                        "/gradio_api/startup-events"})  # fmt: skip
OPEN_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")


class LoginGate:
    """Deny by default: with a token, a request reaches gradio only with the login cookie, except for the login
    page's own files. gradio checks the login on its API routes one by one, and a few (cancel, heartbeat, stream,
    run history, the route list) had no check; this gate does not depend on gradio remembering each new route."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = b'{"detail":{"error":"Not authenticated","auth_message":"lorafuse: log in with the token"}}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})  # fmt: skip

    @staticmethod
    def _allowed(scope) -> bool:
        from starlette.requests import cookie_parser

        app = scope.get("app")
        if getattr(app, "auth", None) is None:  # no token: nothing to guard (loopback only, see `binding`)
            return True
        path = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return True
        headers = dict(scope.get("headers") or [])
        cookies = cookie_parser(headers.get(b"cookie", b"").decode("latin-1"))
        cookie = cookies.get(f"access-token-{app.cookie_id}") or cookies.get(f"access-token-unsecure-{app.cookie_id}")
        return bool(cookie) and cookie in app.tokens


def free_port(host: str = LOCALHOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def quiet_gradio() -> None:
    """No analytics calls and no share tunnels: nothing leaves the machine (the UI works offline)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _announce_helper(since: float) -> None:
    """Tell the terminal when quick commands answer at once (the helper has loaded its packages)."""
    from lorafuse.ui import tasks
    from lorafuse.ui.helper import HELPER

    try:
        HELPER.call(tasks.method_catalog)
    except Exception as e:  # shown, not raised: the page works on, and the next call restarts the helper
        print(f"lorafuse ui: the helper process failed to start: {e}", flush=True)
        return
    print(f"lorafuse ui: quick commands ready ({time.monotonic() - since:.1f} s after the page)", flush=True)


def serve(app, bind: Binding, workspace, *, block: bool = True, max_upload: int) -> None:
    """Launch `app` (a gr.Blocks) as `bind` says; files are served from the workspace only."""
    from starlette.middleware import Middleware

    from lorafuse.ui.app import THEME

    if bind.generated:
        print(f"lorafuse ui: generated token (use it as the password): {bind.token}", flush=True)
    print(f"lorafuse ui: serving http://{bind.host}:{bind.port} (workspace {workspace.root})", flush=True)
    app.queue(default_concurrency_limit=4)
    # gradio checks that it can reach its own page (HEAD, 3 s timeout) and gives up if not; on a loaded machine the
    # first page can take longer than that, so a failed self-check closes the server and launches again
    for attempt in range(3):
        try:
            app.launch(
                server_name=bind.host,
                server_port=bind.port,
                auth=check_login(bind.token) if bind.token else None,
                auth_message="lorafuse: log in with any name and the token as password",
                share=False,
                inbrowser=False,
                show_error=True,
                quiet=True,
                prevent_thread_lock=True,
                allowed_paths=[str(workspace.root)],
                max_file_size=max_upload,
                ssr_mode=False,
                mcp_server=False,
                footer_links=[],
                theme=THEME,
                app_kwargs={"middleware": [Middleware(LoginGate)]},
            )
            break
        except ValueError as e:
            if "localhost is not accessible" not in str(e) or attempt == 2:
                raise
            app.close()
    # Only now, with the page served, the helper process starts loading torch, diffusers and the fusion
    # registry for the quick commands (the page's own process never imports them: `helper.py`).
    from lorafuse.ui.helper import HELPER

    HELPER.start()
    threading.Thread(target=_announce_helper, args=(time.monotonic(),), daemon=True).start()
    if block:
        app.block_thread()
