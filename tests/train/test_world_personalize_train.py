"""train.world_personalize end to end with a one-step recipe: the dataset and LoRA land where the recipe says, a second
call reuses the file, and `layers="craft"` trains a different, disjoint set of modules."""

from pathlib import Path

from lorafuse.lora.io import load_lora
from lorafuse.train.world_personalize import recipe_paths, subject_recipe, train_world_lora


def test_train_world_lora_trains_once_then_reuses_and_craft_layers_differ(tmp_path: Path) -> None:
    recipe = subject_recipe("teapot_08", epochs=1, repeats=1, rank=2, alpha=2.0)
    lora = train_world_lora(recipe, tmp_path, progress=False)
    data, run = recipe_paths(recipe, tmp_path)
    assert lora == run / f"{recipe.stem}.safetensors" and lora.stat().st_size > 0
    assert len(list(data.glob("1_sks teapot/*.png"))) == 5  # the recipe's 5 images, 1 repeat
    assert list((run / "logs").glob("*.csv"))  # the loss curve the demo's report draws
    stamp = lora.stat().st_mtime_ns
    assert train_world_lora(recipe, tmp_path, progress=False) == lora
    assert lora.stat().st_mtime_ns == stamp  # reused, not trained again

    craft = subject_recipe("teapot_08", epochs=1, repeats=1, rank=2, alpha=2.0, layers="craft")
    assert craft.stem != recipe.stem and craft.layer_preset == "craft_content"
    attn_modules = set(load_lora(lora).modules)
    craft_modules = set(load_lora(train_world_lora(craft, tmp_path, progress=False)).modules)
    assert craft_modules and craft_modules != attn_modules
    # the attention LoRA covers every attention projection; CRAFT's content set only some transformer blocks
    assert any(k.startswith("unet.down_blocks.1.") for k in attn_modules) and not any(
        k.startswith("unet.down_blocks.1.") for k in craft_modules
    )
