from lorafuse.demo import DemoConfig, run_demo


def test_demo_writes_report_with_grid_and_scores(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), steps=2, classes=("teapot", "car"), styles=("flat", "neon"))
    report = run_demo(cfg)
    page = report.read_text()
    assert report.name == "report.html"
    assert '<img src="class_style_grid.png"' in page and "correct class" in page
    assert (tmp_path / "demo" / "class_style_grid.png").stat().st_size > 1000
