"""Optional dependencies: one message naming the extra; pyproject's extras install what the code asks for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib

from lorafuse.errors import UserInputError
from lorafuse.utils.extras import EXTRAS, NOT_IN_ALL, MissingExtraError, require

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_missing_package_names_its_extra(module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when not installed
    dist, extra = EXTRAS[module]
    with pytest.raises(MissingExtraError) as info:
        require(module, "this feature")
    message = str(info.value)
    assert f"pip install 'lorafuse[{extra}]'" in message and dist in message
    assert isinstance(info.value, UserInputError)  # the CLI prints it as one line


def test_unknown_module_is_a_bug_not_a_user_error():
    with pytest.raises(KeyError, match="not an optional dependency"):
        require("numpy", "x")


def test_pyproject_extras_install_what_the_code_requires():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    for _module, (dist, extra) in EXTRAS.items():
        assert extra in extras, f"pyproject.toml has no [{extra}] extra"
        assert any(req.startswith(dist) for req in extras[extra]), f"[{extra}] does not install {dist}"
    combined = extras["all"][0]
    for _module, (_dist, extra) in EXTRAS.items():
        assert (extra in combined) != (extra in NOT_IN_ALL), f"[all] must include [{extra}] or say why not"
    dev = " ".join(extras["dev"])
    for extra in NOT_IN_ALL:  # CI installs dev: what [all] leaves out must stay out of it too
        assert not any(req.split(">")[0] in dev for req in extras[extra]), f"dev installs [{extra}]"
