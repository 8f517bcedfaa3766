"""`record_heatmap`: the K-LoRA schedule a plan recorded, drawn; nothing for records without one."""

from PIL import Image

from lorafuse.fusion.klora_schedule import record_heatmap


def test_record_heatmap_draws_the_recorded_table_and_skips_records_without_one(tmp_path) -> None:
    plan = {"schedule": {"content": [[True, False, True], [False, False, True]], "layers": ["unet.a", "unet.b"]}}
    path = record_heatmap(plan, tmp_path / "k.png", title="t")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100
    assert record_heatmap({"method": "direct"}, tmp_path / "none.png") is None
    assert record_heatmap({}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
