"""train.world_personalize: the intermediate-epoch files a run keeps, and that saving them is no part of the cache key."""

from pathlib import Path

from lorafuse.train.world_personalize import epoch_checkpoints, style_recipe, subject_recipe, train_config


def test_epoch_checkpoints_lists_epoch_saves_and_the_final_file(tmp_path: Path) -> None:
    recipe = subject_recipe("teapot_08", epochs=6)
    run = tmp_path / "runs" / recipe.stem
    run.mkdir(parents=True)
    for name in (f"{recipe.stem}-000004.safetensors", f"{recipe.stem}-000002.safetensors",
                 f"{recipe.stem}-step00000040.safetensors", f"{recipe.stem}.safetensors",
                 "other-000002.safetensors"):  # fmt: skip
        (run / name).write_bytes(b"")
    found = epoch_checkpoints(recipe, tmp_path)
    assert list(found) == [2, 4, 6]
    assert found[6].name == f"{recipe.stem}.safetensors"
    assert found[2].name == f"{recipe.stem}-000002.safetensors"


def test_epoch_checkpoints_without_a_run_is_empty(tmp_path: Path) -> None:
    assert epoch_checkpoints(style_recipe("crayon"), tmp_path) == {}


def test_save_every_n_epochs_reaches_the_trainer_and_not_the_cache_key(tmp_path: Path) -> None:
    recipe = style_recipe("crayon")
    plain = train_config(recipe, tmp_path / "d", tmp_path / "r")
    saving = train_config(recipe, tmp_path / "d", tmp_path / "r", save_every_n_epochs=5)
    assert plain.training.save_every_n_epochs is None
    assert saving.training.save_every_n_epochs == 5
    assert saving.training.output_name == plain.training.output_name == recipe.stem


def test_base_fingerprint_follows_the_weights(tmp_path):
    from lorafuse.train.world_personalize import base_fingerprint

    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"one")
    first = base_fingerprint.__wrapped__(str(tmp_path))  # unwrapped: the cache would hide the change
    weights.write_bytes(b"two")
    assert base_fingerprint.__wrapped__(str(tmp_path)) != first
    (tmp_path / "notes.md").write_text("not a weight or config file")
    assert base_fingerprint.__wrapped__(str(tmp_path)) == base_fingerprint.__wrapped__(str(tmp_path))
    assert len(base_fingerprint("world")) == 16


def test_subject_dataset_styles_are_seen_styles_and_part_of_the_key() -> None:
    import pytest

    from lorafuse.errors import UserInputError

    two = subject_recipe("robot_09", styles=["ink", "neon"])  # a JSON list becomes a hashable tuple
    assert two.styles == ("ink", "neon") and hash(two)
    assert subject_recipe("robot_09", styles=("neon", "ink")).stem != two.stem
    with pytest.raises(UserInputError, match="held-out style"):
        subject_recipe("robot_09", styles=("crayon",))
    with pytest.raises(UserInputError, match="only a subject recipe"):
        style_recipe("crayon", styles=("ink",))
