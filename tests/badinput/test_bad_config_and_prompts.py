"""Bad config files and values, and malformed CRAFT markers: one clear error each, before any work."""

from __future__ import annotations

import pytest

TRAIN = ["train", "--dry-run", "--pretrained_model_name_or_path", "world-random"]


@pytest.fixture
def data(tmp_path_factory):
    from lorafuse.world.dataset import write_subject_dataset

    folder = tmp_path_factory.mktemp("ds")
    write_subject_dataset("robot_09", folder, n=1, repeats=2)
    return folder


def _toml(tmp_path, data, extra: str) -> object:
    path = tmp_path / "run.toml"
    path.write_text(
        f'[model]\npretrained_model_name_or_path = "world-random"\n[dataset]\ntrain_data_dir = "{data}"\n'
        f'resolution = 64\n[training]\noutput_dir = "{tmp_path / "out"}"\n{extra}'
    )
    return path


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        ("network", "network_alpha", "inf"),
        ("network", "network_alpha", "nan"),
        ("optimizer", "learning_rate", "nan"),
        ("optimizer", "learning_rate", "-inf"),
        ("loss", "min_snr_gamma", "inf"),
    ],
)
def test_non_finite_config_numbers(cli, tmp_path, data, table, key, value):
    path = _toml(tmp_path, data, f"[{table}]\n{key} = {value}\n")
    cli.refused(["train", path, "--dry-run"], str(path), f"{table}.{key}", "must be a finite number", watch=tmp_path)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_cli_override(cli, tmp_path, data, value):
    argv = [*TRAIN, "--train_data_dir", data, "--output_dir", tmp_path / "out", f"--learning_rate={value}"]
    cli.refused(argv, "optimizer.learning_rate", "must be a finite number", watch=tmp_path)


def test_binary_config_file(cli, tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    cli.refused(["train", path, "--dry-run"], str(path), "binary file", watch=tmp_path)


def test_config_not_utf8(cli, tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes('[training]\noutput_name = "caf\xe9"\n'.encode("latin-1"))
    cli.refused(["train", path, "--dry-run"], str(path), "not valid UTF-8", "line 2", watch=tmp_path)


def test_config_path_is_a_folder(cli, tmp_path):
    (tmp_path / "conf.toml").mkdir()
    cli.refused(["train", tmp_path / "conf.toml", "--dry-run"], "conf.toml: is a folder, not a config file")


def test_config_missing(cli, tmp_path):
    cli.refused(["train", tmp_path / "none.toml", "--dry-run"], "none.toml: config file not found", watch=tmp_path)


def test_config_unreadable(cli, tmp_path, monkeypatch):
    path = tmp_path / "run.toml"
    path.write_text("")
    real_open = open

    def no_read(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("lorafuse.utils.inputs.open", no_read, raising=False)
    cli.refused(["train", path, "--dry-run"], str(path), "permission denied")


def test_config_bad_toml(cli, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[network\nnetwork_dim = 4\n")
    cli.refused(["train", path, "--dry-run"], str(path), "not valid TOML", watch=tmp_path)


def test_fuse_method_config_binary(cli, tmp_path, lora_files):
    path = tmp_path / "m.toml"
    path.write_bytes(b"\x00\x01\x02")
    argv = ["fuse", "--content", lora_files["sd15"], "--style", lora_files["sd15b"], "--prompt", "a dog",
            "--method", "all", "--config", path, "--out", tmp_path / "out"]  # fmt: skip
    cli.refused(argv, str(path), "binary file", watch=tmp_path)


@pytest.mark.parametrize(
    ("prompt", "shown"),
    [
        ("a sks teapot <c, in sks style <s>", "'<c'"),
        ("a sks teapot <c> in sks style <s", "'<s'"),
        ("a sks teapot c> in sks style <s>", "'c>'"),
        ("a sks teapot <c/> in sks style <s>", "'<c/>'"),
        ("a sks teapot <<c>> in sks style <s>", "'<<c>>'"),
        ("a sks teapot <c> in sks style <s>>", "'<s>>'"),
        ("a sks teapot <c1> in sks style <s>", "'<c1>'"),
        ("a sks teapot <c:0.5> in sks style <s>", "'<c:0.5>'"),
        ("a sks teapot <content> in sks style <s>", "'<content>'"),
        ("a sks teapot ‹c› in sks style <s>", "'‹c›'"),
        ("a sks teapot &lt;c&gt; in sks style <s>", "'&lt;c&gt;'"),
        ("a sks teapot <c> in sks style {S}", "'{S}'"),
        ("a sks teapot [c] in sks style <s>", "'[c]'"),
        ("a sks teapot <c> in sks style {s}", "'{s}'"),
        ("a sks teapot <C> in sks style <s>", "markers are lowercase"),
        ("a sks teapot </c> in sks style <s>", "not open/close pairs"),
        ("a sks teapot <x> in sks style <s>", "unknown marker"),
        ("a sks teapot <c><c> in sks style <s>", "given twice"),
    ],
)
def test_malformed_markers(cli, tmp_path, lora_files, prompt, shown):
    argv = ["fuse", "--content", lora_files["sd15"], "--style", lora_files["sd15b"], "--prompt", prompt,
            "--method", "craft", "--out", tmp_path / "out"]  # fmt: skip
    msg = cli.refused(argv, repr(prompt), shown, watch=tmp_path)
    assert "character" in msg


def test_lookalike_marker_no_longer_zeroes_a_weight():
    """The example from the issue: this used to parse with no content span, i.e. λ_c = 0 without a word."""
    from lorafuse.errors import UserInputError
    from lorafuse.fusion.markers import parse_prompt

    with pytest.raises(UserInputError, match="looks like a marker"):
        parse_prompt("a sks teapot <c, in sks style <s>")
    ok = parse_prompt("a <cat-toy> sks teapot <c>, in sks style <s>")  # textual-inversion words stay text
    assert ok.content_span == "a <cat-toy> sks teapot" and ok.style_span == "in sks style"


@pytest.mark.parametrize(
    "prompt",
    ["a <<c>> b <s>", "a <c>> b <s>", "a <<s> b <c>", "a <c-> b <s>", "a <c_> b <s>", "a <'c'> b <s>",
     "a <cs> b", "a <c s> b", "a <style> b <c>", "a ＜c＞ b <s>", "a 〈s〉 b <c>", "a [C] b <s>", "a < <s>s"],
)  # fmt: skip
def test_every_marker_lookalike_is_refused(prompt):
    """Anything that reads as a marker but is not exactly <c> or <s> is an error, never a silently lost span."""
    from lorafuse.errors import UserInputError
    from lorafuse.fusion.markers import parse_prompt

    with pytest.raises(UserInputError, match="looks like a marker"):
        parse_prompt(prompt)


@pytest.mark.parametrize(
    ("prompt", "content", "style", "clean"),
    [
        ("two dog(s) <c> in sks style <s>", "two dog(s)", "in sks style", "two dog(s) in sks style"),
        ("a <sks> toy <c> b <s> at <sunset>", "a <sks> toy", "b", "a <sks> toy b at <sunset>"),
    ],
)
def test_exact_markers_and_ordinary_brackets_still_parse(prompt, content, style, clean):
    from lorafuse.fusion.markers import parse_prompt

    parsed = parse_prompt(prompt)
    assert (parsed.content_span, parsed.style_span, parsed.clean) == (content, style, clean)


@pytest.mark.parametrize("marker", ["< c >", "<c >", "< s>", "<\tc\n>"])
def test_spaces_inside_a_marker_are_refused(marker):
    from lorafuse.errors import UserInputError
    from lorafuse.fusion.markers import parse_prompt

    prompt = f"a teapot {marker} in sks style <s>" if "c" in marker else f"a teapot <c> in sks style {marker}"
    letter = "c" if "c" in marker else "s"
    with pytest.raises(UserInputError, match=rf"has spaces inside the brackets; write exactly <{letter}>") as e:
        parse_prompt(prompt)
    assert repr(prompt) in str(e.value)
