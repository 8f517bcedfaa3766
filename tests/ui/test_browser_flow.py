"""A new user's whole job in the browser: a world subject and style dataset, a tiny subject and style LoRA
trained from the queue while the loss chart updates, a run stopped and continued, two fusion methods side by
side with oracle scores, the HTML report opened. Screenshots of every tab go to the test artifacts (and, with
LORAFUSE_UPDATE_DOCS=1, small copies to docs/ for the README)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
ARTIFACTS = Path(os.environ.get("LORAFUSE_UI_ARTIFACTS", "out/ui-test-artifacts"))
DOCS = Path(__file__).resolve().parents[2] / "docs"


def fill(page, elem: str, value) -> None:
    box = page.locator(f"#{elem} textarea, #{elem} input").first
    box.fill(str(value))
    box.evaluate("e => e.blur()")  # gradio reads the value on blur; focus moves nowhere (no dropdown opens)


def type_choice(page, elem: str, value: str) -> None:
    """A dropdown that takes typed values (paths in the workspace)."""
    box = page.locator(f"#{elem} input").first
    box.fill(value)
    box.press("Enter")
    box.evaluate("e => e.blur()")


def choose(page, elem: str, value: str) -> None:
    """A dropdown's option by its text."""
    page.locator(f"#{elem} input").first.click()
    page.get_by_role("option", name=value, exact=True).click()


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def text_of(page, elem: str) -> str:
    """What an element shows: a text box's value, else its text."""
    box = page.locator(f"#{elem} textarea")
    if box.count():
        return box.first.input_value()
    return page.locator(f"#{elem}").inner_text()


def wait_text(page, elem: str, pattern: str, timeout: float = 240.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, text_of(page, elem))
        if found:
            return found
        page.wait_for_timeout(500)
    toasts = page.locator(".toast-body").all_inner_texts()
    raise AssertionError(f"#{elem} never showed {pattern!r}; it shows: {text_of(page, elem)[:500]!r}; toasts: {toasts}")


def shot(page, name: str, focus: str | None = None) -> None:
    """A screenshot of the viewport, scrolled to `focus` (an element id) when given."""
    if focus:  # the element at the top of the viewport
        page.locator(f"#{focus}").evaluate("e => e.scrollIntoView({block: 'start'})")
        page.wait_for_timeout(500)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"ui_{name}.png"
    page.screenshot(path=str(path), full_page=False)
    if os.environ.get("LORAFUSE_UPDATE_DOCS"):  # the README's pictures: halved and palette PNGs, a few dozen KB
        from PIL import Image

        with Image.open(path) as im:
            small = im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4), Image.LANCZOS)
            small.quantize(colors=128).save(DOCS / f"ui_{name}.png", optimize=True)


def queue_training(page, preset: str, dataset: str, name: str, **fields) -> None:
    tab(page, "Train")
    choose(page, "train-preset", preset)
    page.locator("#train-apply").click()
    page.wait_for_timeout(1500)
    type_choice(page, "train-dataset", dataset)
    fill(page, "train-name", name)
    for key, value in fields.items():
        fill(page, f"opt-training-{key}", value)
    page.locator("#train-queue").click()
    wait_text(page, "train-queued", rf"queued .*lorafuse train runs/{name}/config.toml", 60)


def test_new_user_flow(page, ui_server):
    ws = ui_server.workspace

    # 1. world datasets, one click each
    tab(page, "Dataset")
    fill(page, "world-n", 2)
    fill(page, "world-repeats", 2)
    fill(page, "world-name", "teapot")
    page.locator("#world-make").click()
    wait_text(page, "world-out", r"wrote .*datasets/teapot")
    page.locator("#world-kind label", has_text="style").click()
    fill(page, "world-name", "crayon")
    page.locator("#world-make").click()
    wait_text(page, "world-out", r"wrote .*datasets/crayon")
    wait_text(page, "caption-table", r"in sks style", 60)  # the table switched to the new dataset
    page.locator("#dataset-gallery img").first.wait_for()
    assert page.locator("#dataset-gallery img").count() >= 1
    page.locator("#bucket-preview").click()
    wait_text(page, "bucket-out", r"bucket 64x64: 4", 60)
    assert sorted(p.name for p in (ws / "datasets" / "teapot" / "2_sks teapot").glob("*.png")) == ["000.png", "001.png"]
    shot(page, "dataset")

    # 2. two tiny LoRAs and a longer run, from the queue (one at a time)
    tiny = {"max_train_epochs": 2, "train_batch_size": 4, "sample_steps": 2}  # 1 step an epoch
    queue_training(page, "subject LoRA (world recipe)", "datasets/teapot", "teapot", **tiny)
    queue_training(page, "style LoRA (world recipe)", "datasets/crayon", "crayon", **tiny)
    queue_training(page, "subject LoRA (world recipe)", "datasets/teapot", "long", max_train_epochs=400,
                   train_batch_size=4, sample_every_n_epochs="", save_every_n_epochs="")  # fmt: skip
    assert (ws / "runs" / "teapot" / "config.toml").is_file()
    assert "lorafuse train runs/long/config.toml" in text_of(page, "train-command")

    # 3. the loss chart of the long run updates while it trains
    long_job = page.locator("#run-pick input").input_value()
    assert long_job.endswith("-train")
    first = int(wait_text(page, "run-status", r"step (\d+),", 300).group(1))
    later = int(wait_text(page, "run-status", rf"step ({first + 1}|{first + 2}|[1-9]\d+),", 120).group(1))
    assert later > first
    page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for()
    for run in ("teapot", "crayon"):  # they ran before it
        assert (ws / "runs" / run / f"{run}.safetensors").is_file()
        assert list((ws / "runs" / run / "samples").glob("*.png")), f"{run}: no sample grids"
    shot(page, "train", "run-pick")

    # 4. stop (a state is saved) and continue (resumes from it), then stop again
    page.locator("#run-stop").click()
    wait_text(page, "run-status", r"\bstopped\b", 120)
    states = sorted((ws / "runs" / "long").glob("long-step*-state"))
    assert states, "stopping saved no state"
    page.locator("#run-continue").click()
    wait_text(page, "run-status", rf"training.resume=runs/long/{states[-1].name}", 30)
    wait_text(page, "run-status", r"\brunning\b.*", 120)
    continued = page.locator("#run-pick input").input_value()
    deadline = time.monotonic() + 180
    while "resumed from" not in (ws / "jobs" / f"{continued}.log").read_text():
        assert time.monotonic() < deadline, "the continued run never resumed"
        time.sleep(0.5)
    page.locator("#run-stop").click()
    wait_text(page, "run-status", r"\bstopped\b", 120)

    # 5. LoRA tools: inspect the subject LoRA
    tab(page, "LoRA tools")
    type_choice(page, "tools-lora", "runs/teapot/teapot.safetensors")
    page.locator("#tools-inspect").click()
    wait_text(page, "tools-output", r"(?i)rank", 120)
    shot(page, "tools", "tools-result")

    # 6. fuse with two methods, same seed, oracle scores on the world base
    tab(page, "Fuse")
    type_choice(page, "fuse-content", "runs/teapot/teapot.safetensors")
    type_choice(page, "fuse-style", "runs/crayon/crayon.safetensors")
    fill(page, "fuse-seeds", "0")
    fill(page, "fuse-steps", 4)
    page.locator("#fuse-run").click()
    wait_text(page, "fuse-status", r"\bdone\b", 300)
    page.locator("#fuse-grid img").first.wait_for()
    scores = text_of(page, "fuse-scores")
    assert "oracle_content" in scores and "direct" in scores and "klora" in scores
    page.locator("#fuse-schedule img").first.wait_for()
    shot(page, "fuse", "fuse-status")

    # 7. open the report
    with page.expect_popup() as popup:
        page.locator("#fuse-report a").click()
    report = popup.value
    report.wait_for_load_state()
    assert "K-LoRA" in report.content() and report.locator("img").count() >= 2
    report.close()
    tab(page, "Compare & report")
    page.locator("#report-refresh").click()
    shot(page, "compare")
    tab(page, "Jobs")
    wait_text(page, "jobs-table", r"done", 30)
    shot(page, "jobs")
