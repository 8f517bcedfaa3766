from lorafuse.cli.main import main


def test_dataset_subcommand_writes_folder(tmp_path, capsys):
    assert main(["world", "dataset", str(tmp_path / "d"), "--subject", "cat_08", "--n", "2"]) == 0
    assert (tmp_path / "d" / "10_sks cat").is_dir()


def test_subject_dataset_cycles_through_styles(tmp_path):
    import json

    from lorafuse.train.world_personalize import SUBJECT_STYLES

    assert main(["world", "dataset", str(tmp_path / "a"), "--subject", "cat_08", "--n", "3"]) == 0
    captions = [(tmp_path / "a" / "10_sks cat" / f"{k:03d}.txt").read_text() for k in range(3)]
    from lorafuse.world.catalog import style_phrase

    assert all(style_phrase(s) in c for s, c in zip(SUBJECT_STYLES, captions, strict=False))
    assert main(["world", "dataset", str(tmp_path / "b"), "--subject", "cat_08", "--n", "2",
                 "--subject-styles", "flat"]) == 0
    info = next((tmp_path / "b").glob("*.json"))
    assert json.loads(info.read_text())["styles"] == ["flat"]


def test_subject_styles_needs_a_subject(tmp_path, capsys):
    assert main(["world", "dataset", str(tmp_path / "d"), "--style", "crayon", "--subject-styles", "flat"]) == 2
    assert "--subject-styles goes with --subject" in capsys.readouterr().err


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    assert main(["world", "dataset", str(tmp_path / "d"), "--subject", "dragon_01"]) == 2
    err = capsys.readouterr().err
    assert "unknown class 'dragon'" in err and "Traceback" not in err


def test_needs_subject_or_style(tmp_path, capsys):
    assert main(["world", "dataset", str(tmp_path / "d")]) == 2
    assert "exactly one of --subject" in capsys.readouterr().err


def test_render_writes_png(tmp_path):
    out = tmp_path / "r.png"
    assert main(["world", "render", "teapot_08", "--styles", "flat", "ink", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
