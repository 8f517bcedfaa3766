"""Browser-test fixtures: `lorafuse ui` on a free loopback port in a fresh workspace, and Playwright driving
Debian's chromium (no browser download). Missing chromium or playwright skips the browser tests locally with the
reason; on CI (CI=true) it fails them, because there they must run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LORAFUSE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
ARTIFACTS = Path(os.environ.get("LORAFUSE_UI_ARTIFACTS", "out/ui-test-artifacts"))


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install -e '.[dev]')"
    try:
        import gradio  # noqa: F401
    except ImportError:
        return "gradio is not installed (pip install -e '.[ui]')"
    if not Path(CHROMIUM).exists():
        return f"no chromium at {CHROMIUM} (apt-get install -y chromium, or set LORAFUSE_CHROMIUM)"
    return None


@pytest.fixture(scope="session")
def browser():
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run on CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_200(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"lorafuse ui exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        time.sleep(0.25)
    raise TimeoutError(f"{url}: no HTTP 200 within {timeout} s")


class UiServer:
    def __init__(self, workspace: Path, log: Path, extra: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.workspace = workspace
        self.extra = list(extra)  # more `lorafuse ui` options, e.g. --auth-file PATH
        self.env = dict(env or {})  # more environment variables, e.g. LORAFUSE_UI_TOKEN
        self.log = open(log, "w")  # noqa: SIM115
        self._start()

    def _start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1",
               **self.env}  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorafuse", "ui", "--workspace", str(self.workspace), "--port", str(self.port),
             *self.extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        self.startup_s = wait_http_200(self.url, self.proc)

    def kill_and_restart(self) -> None:
        """SIGKILL the page's process (no clean-up of its own), then start `lorafuse ui` again on the same
        workspace; the job worker, in its own session, goes on."""
        self.proc.kill()
        self.proc.wait(30)
        self._start()

    def stop(self) -> None:
        """End the page, the worker and any job it started (only processes this test started, by pid)."""
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        jobs = self.workspace / "jobs"
        pids = [json.loads(p.read_text())["pid"] for p in [*jobs.glob("*.start"), *jobs.glob("worker.pid")]]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory, browser):
    ws = tmp_path_factory.mktemp("ui") / "workspace"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = UiServer(ws, ARTIFACTS / "lorafuse-ui.log")
    yield server
    server.stop()
    with contextlib.suppress(OSError):
        for log in (ws / "jobs").glob("*.log"):
            shutil.copy(log, ARTIFACTS / log.name)


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def page(browser, ui_server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(ui_server.url)
    pg.wait_for_selector("#tab-dataset", state="attached")
    yield pg
    context.close()
