"""Where `lorafuse ui` binds and what it requires: loopback by default, --listen only with a token."""

from __future__ import annotations

import pytest

from lorafuse.errors import UserInputError
from lorafuse.ui.server import binding, check_login


def test_loopback_by_default():
    b = binding(listen=False, auth=None, port=7860)
    assert (b.host, b.token) == ("127.0.0.1", None)


def test_listen_refuses_without_token():
    with pytest.raises(UserInputError, match="refuses to start without a token"):
        binding(listen=True, auth=None, port=7860)
    with pytest.raises(UserInputError, match="needs --listen"):
        binding(listen=False, auth=None, port=7860, host="0.0.0.0")
    with pytest.raises(UserInputError, match="at least 8"):
        binding(listen=True, auth="short", port=7860)


def test_listen_with_token_or_generated():
    b = binding(listen=True, auth="s3cret-token", port=1)
    assert (b.host, b.token, b.generated) == ("0.0.0.0", "s3cret-token", False)
    g = binding(listen=True, auth="generate", port=1)
    assert g.generated and len(g.token) >= 20 and g.token != binding(listen=True, auth="generate", port=1).token
    check = check_login("s3cret-token")
    assert check("anyone", "s3cret-token") and not check("anyone", "s3cret-tokem")


def test_cli_listen_without_token_exits_with_the_message(capsys):
    from lorafuse.__main__ import main  # the entry point: the CLI plus `lorafuse ui`

    assert main(["ui", "--listen", "--port", "0"]) == 2
    assert "refuses to start without a token" in capsys.readouterr().err
