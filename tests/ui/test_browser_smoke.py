"""`lorafuse ui` in a real browser: every tab renders; a path outside the workspace is refused on the page;
--listen without a token refuses to start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lorafuse.ui.app import TABS

pytestmark = pytest.mark.browser


def test_every_tab_renders(page, ui_server):
    print(f"lorafuse ui: command to first HTTP 200 in {ui_server.startup_s:.1f} s")
    maps = Path(f"/proc/{ui_server.proc.pid}/maps")
    if maps.exists():  # the page's own process serves without torch (its quick commands run in the helper)
        assert "libtorch" not in maps.read_text()
    for name in TABS:
        page.get_by_role("tab", name=name).click()
    page.get_by_role("tab", name="Train").click()
    assert page.locator("#opt-network-network_dim").is_visible() is False  # [network] starts folded
    page.get_by_text("[network]").click()
    assert "[network.network_dim]" in page.locator("#opt-network-network_dim").inner_text()


def test_path_outside_the_workspace_is_refused(page, ui_server):
    page.get_by_text("Your images").click()
    page.locator("#upload-folder textarea, #upload-folder input").first.fill("../../escape")
    page.locator("#upload-add").click()
    page.get_by_text("'..' is refused").first.wait_for()
    # a name field takes one folder name: a path there is refused too, not quietly made datasets/etc/x
    page.locator("#world-name textarea, #world-name input").first.fill("/etc/x")
    page.locator("#world-make").click()
    page.get_by_text("folder name '/etc/x': give one folder name").first.wait_for()
    assert not (ui_server.workspace / "datasets" / "etc").exists()


def upload(page, path, name: str) -> None:
    page.get_by_text("Your images").click()
    page.locator("#upload-name textarea, #upload-name input").first.fill(name)
    page.locator("#upload input[type=file]").set_input_files([str(path)])
    page.locator("#upload").get_by_text(path.name).first.wait_for(timeout=120_000)  # uploaded to the server
    page.locator("#upload-add").click()


def test_upload_that_is_not_an_image_is_refused(page, ui_server, tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"#!/bin/sh\necho this is not an image\n")
    upload(page, fake, "fake")
    page.get_by_text("photo.png: not an image").first.wait_for()
    assert not (ui_server.workspace / "datasets" / "fake").exists()


def test_upload_caption_table_and_subset(page, ui_server, tmp_path, artifacts):
    """Upload an image, edit its caption in the table, then set the subset's trigger word and repeats: each is
    a `lorafuse dataset` command, shown on the page, and its files are on disk."""
    import numpy as np
    from PIL import Image

    real = tmp_path / "dog.png"
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(real)
    upload(page, real, "mine")
    # the add runs in the page's helper process; on a loaded machine its first call can wait more than the default
    # 60 s for the helper's imports (seen once in a full-suite run at load ~2; the next runs took 8 s)
    page.get_by_text("wrote datasets/mine/10_sks dog").first.wait_for(timeout=180_000)
    page.get_by_text("lorafuse dataset add datasets/mine dog.png --trigger sks --class dog").first.wait_for()
    folder = ui_server.workspace / "datasets" / "mine" / "10_sks dog"
    assert (folder / "dog.png").is_file() and (folder / "dog.txt").read_text() == "a photo of a sks dog\n"
    # the picker followed the new dataset: its caption table lists the image; edit the caption cell
    cell = page.locator("#caption-table [data-row='0'][data-col='1']").filter(visible=True).first
    cell.filter(has_text="a photo of a sks dog").wait_for()
    cell.dblclick()  # opens the cell's editor
    editor = page.get_by_label("Edit cell").filter(visible=True).first
    editor.fill("a photo of a sks dog on a red sofa")
    editor.press("Enter")
    page.locator("#caption-save").click()
    page.get_by_text("saved 1 captions").first.wait_for()
    assert (folder / "dog.txt").read_text() == "a photo of a sks dog on a red sofa\n"
    # trigger word and repeats: the subset folder is renamed (kohya's layout), the table follows it. Picking the
    # subset fills these fields from its folder name in a reply of its own: wait for it, or it overwrites ours
    from playwright.sync_api import expect

    trigger = page.locator("#subset-trigger textarea, #subset-trigger input").first
    expect(trigger).to_have_value("sks", timeout=60_000)
    trigger.fill("ohwx")
    page.locator("#subset-repeats input").first.fill("3")
    page.locator("#subset-set").click()
    page.get_by_text("now 3_ohwx dog").first.wait_for()
    assert (ui_server.workspace / "datasets" / "mine" / "3_ohwx dog" / "dog.txt").is_file() and not folder.exists()
    page.screenshot(path=str(artifacts / "dataset-captions.png"), full_page=True)


def test_a_workspace_folder_becomes_a_dataset(page, ui_server):
    import numpy as np
    from PIL import Image

    photos = ui_server.workspace / "photos"
    photos.mkdir(exist_ok=True)
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(photos / "cat.png")
    page.get_by_text("Your images").click()
    page.locator("#upload-name textarea, #upload-name input").first.fill("from_folder")
    page.locator("#upload-folder textarea, #upload-folder input").first.fill("photos")
    page.locator("#upload-add").click()
    page.get_by_text("lorafuse dataset add datasets/from_folder photos --trigger sks --class dog").first.wait_for()
    assert (ui_server.workspace / "datasets" / "from_folder" / "10_sks dog" / "cat.png").is_file()


def test_pickle_is_refused_without_the_opt_in(page, ui_server):
    (ui_server.workspace / "loras" / "old.ckpt").write_bytes(b"not read")
    page.get_by_role("tab", name="LoRA tools").click()
    box = page.locator("#tools-lora input").first
    box.fill("loras/old.ckpt")
    box.press("Enter")
    box.evaluate("e => e.blur()")
    page.locator("#tools-inspect").click()
    page.get_by_text("pickle files can run code when loaded; refused").first.wait_for()


def test_listen_without_token_refuses():
    proc = subprocess.run([sys.executable, "-m", "lorafuse", "ui", "--listen", "--port", "0"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "refuses to start without a token" in proc.stderr


def descendants(pid: int) -> list[int]:
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            found += [child, *descendants(child)]
    return found


def test_with_a_token_every_route_needs_the_login(browser, tmp_path, artifacts):
    """A token from LORAFUSE_UI_TOKEN: the page asks for it; without the login cookie every route answers 401
    (gradio's API, files, uploads, and the routes gradio itself leaves open: cancel, heartbeat, the route list);
    with it the page works. The token is on no command line and in no child process's environment."""
    import json
    import urllib.error
    import urllib.request

    from tests.ui.conftest import UiServer

    server = UiServer(tmp_path / "ws", artifacts / "lorafuse-ui-auth.log", env={"LORAFUSE_UI_TOKEN": "s3cret-token-1"})
    try:
        (server.workspace / "inside.txt").write_text("inside")
        for method, route in [("GET", "config"), ("GET", "gradio_api/info"), ("GET", "openapi.json"),
                              ("GET", "gradio_api/heartbeat/x"), ("GET", "gradio_api/app_id"),
                              ("GET", f"gradio_api/file={server.workspace / 'inside.txt'}"),
                              ("POST", "gradio_api/queue/join"), ("POST", "gradio_api/upload"),
                              ("POST", "gradio_api/cancel"), ("POST", "gradio_api/run/predict")]:  # fmt: skip
            data = json.dumps({}).encode() if method == "POST" else None
            request = urllib.request.Request(server.url + route, data=data, method=method,
                                             headers={"Content-Type": "application/json"})  # fmt: skip
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 401, route
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(server.url)
        page.get_by_label("username").fill("me")
        page.get_by_label("password").fill("s3cret-token-1")
        page.get_by_role("button", name="Login").click()
        from playwright.sync_api import expect

        page.locator("#bucket-preview").click()  # a click that reaches the app (and needs no helper process)
        expect(page.locator("#bucket-out textarea").first).to_have_value("choose a dataset first")
        context.close()
        if Path("/proc/self/task").exists():  # the helper process is up once the page is served
            children = descendants(server.proc.pid)
            assert children
            for pid in [server.proc.pid, *children]:
                assert b"s3cret-token-1" not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
            for pid in children:
                assert b"s3cret-token-1" not in Path(f"/proc/{pid}/environ").read_bytes(), pid
    finally:
        server.stop()
