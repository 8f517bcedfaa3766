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
