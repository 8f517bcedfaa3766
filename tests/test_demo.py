"""`lorafuse demo` with tiny settings: datasets, two 1-step LoRAs, two methods, two sampling steps. Checks what
the page shows (every method's column, the scores, the curves, the references) and that each picture it names
exists; the numbers themselves are meaningless at this size."""

import json
import re

import pytest
from PIL import Image

from lorafuse.cli.main import main
from lorafuse.demo import DemoConfig, run_demo
from lorafuse.errors import UserInputError


def tiny(tmp_path, **changes) -> DemoConfig:
    settings = dict(out=str(tmp_path / "demo"), seeds=2, steps=2, methods=("direct", "klora"), content_epochs=1,
                    style_epochs=1, repeats=1, classes=("teapot", "car"), styles=("flat", "neon"), progress=False)  # fmt: skip
    return DemoConfig(**{**settings, **changes})


def test_demo_writes_report_pictures_and_scores_of_every_method(tmp_path) -> None:
    page_path = run_demo(tiny(tmp_path))
    out = tmp_path / "demo"
    page = page_path.read_text()
    assert page_path == out / "report.html"
    for section in ("References: the training sets", "Base model and single LoRAs", "Every method, side by side",
                    "Oracle scores", "Training: loss and learning rate", "K-LoRA selection schedule",
                    "class x style"):  # fmt: skip
        assert section in page, section
    images = re.findall(r'<img src="([^"]+)"', page)
    for name in (
        "dataset_content.png",
        "dataset_style.png",
        "side_by_side.png",
        "scores.png",
        "klora_schedule.png",
    ):
        assert f"report_files/{name}" in images, name
    assert sum("training_" in i for i in images) == 2  # one curve per trained LoRA
    for rel in images:
        with Image.open(out / rel) as img:
            assert img.format == "PNG" and img.size[0] > 50
    # the scores table names every row: base, both single LoRAs and both methods
    for label in ("base", "content only", "style only", "direct", "klora"):
        assert f"<td>{label}</td>" in page, label
    rows = json.loads((out / "scores.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"base", "content only", "style only", "direct", "klora"}
    assert len(rows) == 5 * 2 and all(0 <= r["right_individual"] <= 1 for r in rows)
    assert all("oracle_ci" in r for r in rows if r["kind"] == "fused")
    # 2 seeds: intervals in the table
    assert re.search(r"<td>-?\d\.\d{3} \[-?\d", page)
    with Image.open(out / "summary.png") as img, Image.open(out / "report_files/side_by_side.png") as grid:
        assert img.height > grid.height and img.width >= grid.width  # the grid with the chart under it


def test_demo_bad_input_fails_before_training(tmp_path) -> None:
    with pytest.raises(UserInputError, match="unknown fusion method 'klorra'"):
        run_demo(tiny(tmp_path, methods=("klorra",)))
    with pytest.raises(UserInputError, match="teapot_99"):
        run_demo(tiny(tmp_path, individual="teapot_99"))
    with pytest.raises(UserInputError, match="seeds must be at least 1"):
        run_demo(tiny(tmp_path, seeds=0))
    assert not (tmp_path / "demo" / "work").exists()
    assert main(["demo", "--out", str(tmp_path / "x"), "--methods", "nope", "--no-progress"]) == 2


def test_demo_runs_offline_whatever_the_shell_says(tmp_path, monkeypatch) -> None:
    """The demo reads only built-in files: it sets the Hub's offline mode itself before anything imports
    huggingface_hub (bitsandbytes, imported with diffusers, would otherwise ask the Hub for a kernel)."""
    import os

    import lorafuse.cli.demo as cli_demo

    seen = {}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(cli_demo, "run_demo", lambda cfg: seen.setdefault("offline", os.environ.get("HF_HUB_OFFLINE")))
    assert main(["demo", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert seen == {"offline": "1"}
