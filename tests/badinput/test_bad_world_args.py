"""`lorafuse world ...` arguments: counts out of range, names that are not one path component, and a style dataset
asking for more individuals than the world has. Each is one usage error naming the option, before any render."""

from __future__ import annotations

import pytest

SUBJECT = ["world", "dataset", "--subject", "teapot_08"]
STYLE = ["world", "dataset", "--style", "crayon"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # built every caption in memory first (hung); now refused with the limit
        (SUBJECT + ["--n", "1000000000000"], ["--n 1000000000000", "at most 100000 images"]),
        # numpy's "Cannot take a larger sample than population" traceback
        (STYLE + ["--n", "500"], ["--n 500", "at most 96 images", "96 seen individuals"]),
        (STYLE + ["--n", "97"], ["--n 97", "at most 96"]),
        # `args.n or 5` silently made 5 images
        (SUBJECT + ["--n", "0"], ["argument --n", "0 is out of range", "at least 1"]),
        # made '-1_sks teapot/' and, through `or`, '10_sks teapot/'
        (SUBJECT + ["--repeats", "-1"], ["argument --repeats", "-1 is out of range"]),
        (STYLE + ["--repeats", "0"], ["argument --repeats", "0 is out of range"]),
        (SUBJECT + ["--repeats", "10001"], ["10001 repeats is more than 10000"]),
        # made the nested folders '10_a/b teapot/' and the nameless '10_ teapot/'
        (SUBJECT + ["--trigger", "a/b"], ["trigger 'a/b'", "use letters, digits"]),
        (SUBJECT + ["--trigger="], ["trigger ''", "use letters, digits"]),
        (STYLE + ["--trigger", ".."], ["trigger '..'", "use letters, digits"]),
        (SUBJECT + ["--repeats", "x"], ["argument --repeats", "invalid number 'x'"]),
    ],
)
def test_world_dataset_arguments(cli, tmp_path, args, expected):
    cli.refused([*args[:2], tmp_path / "out", *args[2:]], *expected, watch=tmp_path)


@pytest.mark.parametrize(("n", "expected"), [("-1", "-1 is out of range"), ("0", "0 is out of range"),
                                             ("100000000", "give a number from 1 to 256")])  # fmt: skip
def test_world_render_rows(cli, tmp_path, n, expected):
    """--n -1 / 0 ended in an IndexError traceback; 10**8 rendered every tile before drawing the grid."""
    cli.refused(["world", "render", "teapot_08", "--n", n, "--out", tmp_path / "r.png"], "argument --n", expected,
                watch=tmp_path)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train-oracle", "--steps", "0"], "argument --steps: 0 is out of range"),  # OneCycleLR's traceback, late
        (["train-oracle", "--extra-pools", "-1"], "argument --extra-pools: -1 is out of range"),
        (["train-oracle", "--lr", "nan"], "argument --lr: nan is out of range: give a finite number above 0"),
        (["pretrain", "--batch", "0"], "argument --batch: 0 is out of range"),
        (["pretrain", "--decoder-steps", "0"], "argument --decoder-steps: 0 is out of range"),
        (["pretrain", "--caption-ft-steps", "-1"], "argument --caption-ft-steps: -1 is out of range"),
    ],
)
def test_world_training_counts(cli, tmp_path, args, expected):
    cli.refused(["world", *args, "--work", tmp_path / "w", "--out", tmp_path / "o"], expected, watch=tmp_path)


def test_world_dataset_limits_at_the_edge(cli, tmp_path):
    """The largest style dataset is made, with a trigger of two words stripped like its folder name."""
    import json

    code, out, err = cli("world", "dataset", tmp_path / "out", "--style", "crayon", "--n", "96", "--trigger",
                         " my style ")  # fmt: skip
    assert code == 0, err
    folder = tmp_path / "out" / "20_my style style"
    assert sorted(p.name for p in folder.glob("*.txt"))[-1] == "095.txt"
    assert (folder / "000.txt").read_text().endswith(", in my style style")
    assert len(set(json.loads((tmp_path / "out" / "world_dataset.json").read_text())["individuals"])) == 96
