"""`lorafuse fuse --help` lists the methods; `--help-options` lists one method's options with ranges."""

from __future__ import annotations

import pytest

from lorafuse.cli.main import main
from lorafuse.fusion.registry import get_method, method_names


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_help_lists_every_method_with_its_summary(capsys):
    code, out, _ = run(["fuse", "--help"], capsys)
    assert code == 0
    for name in method_names():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert get_method(name).summary[:40] in line
    assert "--help-options" in out


def test_help_options_shows_defaults_and_the_methods_own_ranges(capsys):
    code, out, _ = run(["fuse", "--method", "klora", "--help-options"], capsys)
    assert code == 0
    assert "alpha  (float; default: 1.5)" in out
    assert "must be a finite number > 0" in out  # from KLoraConfig.validate, not written twice
    assert "selection  (one of 'topk', 'fixed', 'random'; default: 'topk')" in out
    assert "0: K_l = r_c · r_s per layer" in out  # the comment beside the field
    _, out, _ = run(["fuse", "--help-options", "ziplora"], capsys)
    assert "max_steps  (int; default: 100)" in out and "range [1, 10000]" in out
    _, out, _ = run(["fuse", "--help-options", "switch"], capsys)
    assert "content_weight  (float; default: 1.0)" in out and "range [-4, 4]" in out


def test_help_options_unknown_method(capsys):
    code, _, err = run(["fuse", "--method", "nope", "--help-options"], capsys)
    assert code == 2 and "unknown fusion method 'nope'" in err
