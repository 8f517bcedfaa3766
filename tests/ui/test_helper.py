"""The page's helper process: answers calls with the CLI's errors intact, reports a crash by its last line, and
is started again after it dies."""

from __future__ import annotations

import os

import pytest

from lorafuse.errors import UserInputError
from lorafuse.ui import tasks
from lorafuse.ui.helper import Helper, HelperDied


def test_calls_errors_crashes_and_a_restart(tmp_path):
    helper = Helper()
    try:
        code, out, err = helper.call(tasks.run_cli, ["world", "list"], str(tmp_path))
        assert code == 0 and "held-out individuals:" in out
        with pytest.raises(UserInputError, match="nope"):  # the CLI's own error, as a UserInputError
            helper.call(tasks.options_help, "nope")
        with pytest.raises(RuntimeError, match="TypeError"):  # a bug: its last traceback line
            helper.call(tasks.latest_state, 5)
        first = helper._proc.pid
        with pytest.raises(HelperDied, match="exit code 3"):
            helper.call(os._exit, 3)
        names, _ = helper.call(tasks.method_catalog)  # a new helper answers
        assert "klora" in names and helper._proc.pid != first
    finally:
        helper.stop()
    assert helper._proc is None


def test_every_train_preset_is_a_config_the_cli_accepts_with_its_papers_layers(monkeypatch):
    """Each preset of the Train tab, as the form sends it, passes the CLI's config checks, and trains the layers
    its name promises (B-LoRA: the joint `blora` set, not every attention projection)."""
    from lorafuse.train.options import options
    from lorafuse.ui import tab_train

    class Inline:  # the helper's calls, in this process
        def call(self, fn, *args):
            return fn(*args)

    monkeypatch.setattr(tab_train, "HELPER", Inline())
    opts = [o for o in options() if o.key not in tab_train.PAGE_SET]
    expected = {"subject": "all", "style": "all", "CRAFT pair: content": "craft_content",
                "CRAFT pair: style": "craft_style", "B-LoRA": "blora"}  # fmt: skip
    for name in tab_train.PRESETS:
        flat = tab_train.preset_values(name)
        values = [tab_train.shown(flat[o.key]) if o.key in flat else tab_train.shown(o.default) for o in opts]
        over = tab_train.overrides_from_form(opts, values)
        over.update({"dataset.train_data_dir": "datasets/x", "training.output_dir": "runs/x", "training.output_name": "x"})
        text, model = tasks.train_config_toml(over)
        layers = next(v for k, v in expected.items() if name.startswith(k))
        assert f'layers = "{layers}"' in text and model == "world", name
