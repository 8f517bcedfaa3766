"""`lorafuse ui` in a real browser: every tab renders; a path outside the workspace is refused on the page;
--listen without a token refuses to start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorafuse.ui.app import TABS

pytestmark = pytest.mark.browser


def test_every_tab_renders(page, ui_server):
    print(f"lorafuse ui: command to first HTTP 200 in {ui_server.startup_s:.1f} s")
    for name in TABS:
        page.get_by_role("tab", name=name).click()
    page.get_by_role("tab", name="Train").click()
    assert page.locator("#opt-network-network_dim").is_visible() is False  # [network] starts folded
    page.get_by_text("[network]").click()
    assert "[network.network_dim]" in page.locator("#opt-network-network_dim").inner_text()


def test_path_outside_the_workspace_is_refused(page, ui_server):
    page.locator("#world-name textarea, #world-name input").first.fill("../../escape")
    page.locator("#world-make").click()
    page.get_by_text("'..' is refused").first.wait_for()
    assert not (ui_server.workspace.parent.parent / "escape").exists()


def test_listen_without_token_refuses():
    proc = subprocess.run([sys.executable, "-m", "lorafuse", "ui", "--listen", "--port", "0"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "refuses to start without a token" in proc.stderr
