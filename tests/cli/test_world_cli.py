from lorafuse.cli.main import main


def test_dataset_subcommand_writes_folder(tmp_path, capsys):
    assert main(["world", "dataset", str(tmp_path / "d"), "--subject", "cat_08", "--n", "2"]) == 0
    assert (tmp_path / "d" / "10_sks cat").is_dir()


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
