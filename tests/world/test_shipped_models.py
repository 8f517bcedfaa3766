"""The shipped built-in base model and oracle: plain-diffusers loading, layout, size, and that they work."""

from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline

from lorafuse.models.world import default_base_path, load_world_pipeline
from lorafuse.world.catalog import SEEN_STYLES, all_individuals
from lorafuse.world.oracle import default_oracle, default_oracle_path
from lorafuse.world.render import render


def test_weights_are_shipped_and_small():
    base = default_base_path()
    assert (base / "model_index.json").exists(), "the built-in base model is missing from the package"
    assert default_oracle_path().exists(), "the oracle weights are missing from the package"
    size = sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) + default_oracle_path().stat().st_size
    assert size <= 40 * 2**20, f"built-in weights take {size / 2**20:.1f} MB (budget 40 MB)"


def test_base_loads_in_plain_diffusers_and_samples():
    pipe = StableDiffusionPipeline.from_pretrained(default_base_path())  # no lorafuse code involved
    names = {n for n, _ in pipe.unet.named_modules()}
    # SDXL's block layout at tiny scale: B-LoRA's blocks exist, the first down block has no attention
    assert {"up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "down_blocks.1.attentions.0"} <= names
    assert not any(n.startswith("down_blocks.0.attentions") for n in names)
    assert (default_base_path() / "tokenizer" / "vocab.json").exists()
    assert (default_base_path() / "tokenizer" / "merges.txt").exists()
    out = pipe("a photo of a teapot, in flat color style", num_inference_steps=3, height=64, width=64,
               output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_oracle_names_clean_renders():
    oracle = default_oracle()
    people = all_individuals()
    rng = np.random.default_rng(4242)
    picks = [people[int(i)] for i in rng.choice(len(people), 48, replace=False)]
    styles = [SEEN_STYLES[k % len(SEEN_STYLES)] for k in range(48)]
    imgs = np.stack([render(p, s, np.random.default_rng([4242, k])) for k, (p, s) in enumerate(zip(picks, styles, strict=True))])
    v = oracle.judge(imgs)
    assert np.mean([a == p.cls for a, p in zip(v.cls, picks, strict=True)]) >= 0.9
    assert np.mean([a == s for a, s in zip(v.style_name, styles, strict=True)]) >= 0.9
    assert np.mean([a == p.name for a, p in zip(v.individual, picks, strict=True)]) >= 0.8
    # cosine similarity ranks the same individual above another one of the same class
    same = oracle.content_similarity(imgs[:1], render(picks[0], "ink", 1)[None]).item()
    other = next(x for x in people if x.cls == picks[0].cls and x != picks[0])
    diff = oracle.content_similarity(imgs[:1], render(other, styles[0], 1)[None]).item()
    assert same > diff


def test_bad_pipeline_folder_is_a_clear_error(tmp_path: Path):
    from lorafuse.errors import UserInputError

    with pytest.raises(UserInputError, match="not a diffusers pipeline folder"):
        load_world_pipeline(tmp_path)
