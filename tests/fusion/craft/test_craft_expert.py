"""The expert encoder: fits a small λ table, generalises to a held-out span, round trips, drives the plan."""

from __future__ import annotations

import itertools

import pytest
import torch

from lorafuse.errors import UserInputError
from lorafuse.fusion.craft.expert import (
    ExpertEncoder,
    ExpertExample,
    load_expert,
    pipeline_text_embedder,
    save_expert,
    train_expert,
)

NOUN_C = {"dog": 1.0, "cat": 0.6, "car": 0.2}  # λ_c depends on the content noun
STYLE_S = {"watercolor": 0.9, "sketch": 0.4, "pixel": 0.1}  # λ_s on the style word
COLOURS = ("red", "blue", "green")


def bag_of_words(dim: int = 24):
    """A text embedder whose vectors are means of fixed random word vectors (so unseen combinations are
    combinations of seen words, as CLIP embeddings of new prompts are of known concepts)."""
    vocab: dict[str, torch.Tensor] = {}

    def embed(texts):
        rows = []
        for text in texts:
            words = text.split() or [""]
            for w in words:
                if w not in vocab:
                    vocab[w] = torch.randn(dim, generator=torch.Generator().manual_seed(len(vocab) + 1))
            rows.append(torch.stack([vocab[w] for w in words]).mean(0))
        return torch.stack(rows)

    return embed


def table(held_out: tuple[str, str]):
    train, test = [], []
    for (colour, noun), style in itertools.product(itertools.product(COLOURS, NOUN_C), STYLE_S):
        ex = ExpertExample(1, f"a {colour} {noun}", f"{style} style", NOUN_C[noun], STYLE_S[style])
        (test if (f"{colour} {noun}", style) == held_out else train).append(ex)
    return train, test


def test_fits_the_table_and_generalises_to_a_held_out_span() -> None:
    embed = bag_of_words()
    train, test = table(held_out=("green cat", "sketch"))
    # the held-out content span "a green cat" appears in no training example at all
    train = [e for e in train if e.content_span != "a green cat"]
    model = train_expert(train, embed, steps=400, seed=0)
    fit = max(max(abs(a - e.lambda_c), abs(b - e.lambda_s))
              for e in train for a, b in [model.predict(embed, e.concept_id, e.content_span, e.style_span)])  # fmt: skip
    assert fit < 0.08
    (held,) = test
    for concept_id in (1, 0, 99):  # the trained ID, "unknown", and an ID never seen (mapped to unknown)
        lc, ls = model.predict(embed, concept_id, held.content_span, held.style_span)
        assert abs(lc - held.lambda_c) < 0.1 and abs(ls - held.lambda_s) < 0.1, (concept_id, lc, ls)
        assert lc >= 0 and ls >= 0


def test_save_load_round_trip(tmp_path) -> None:
    embed = bag_of_words()
    model = train_expert(table(("", ""))[0][:5], embed, steps=5)
    loaded = load_expert(save_expert(model, tmp_path / "expert.safetensors"))
    assert loaded.predict(embed, 1, "a red dog", "pixel style") == model.predict(
        embed, 1, "a red dog", "pixel style"
    )
    with pytest.raises(UserInputError, match="expects 24-d"):
        loaded.predict(lambda texts: torch.zeros(len(texts), 8), 1, "a", "b")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserInputError, match="not a readable"):
        load_expert(tmp_path / "bad.safetensors")
    with pytest.raises(UserInputError, match="λ >= 0"):
        train_expert([ExpertExample(0, "a", "b", -1.0, 0.0)], embed)


def test_plan_takes_lambda_from_the_expert(tmp_path) -> None:
    from lorafuse.fusion.craft import Craft, CraftConfig
    from lorafuse.lora.presets import resolve_layers
    from lorafuse.lora.state import LoraModule, LoraState
    from lorafuse.lora.targets import base_modules
    from lorafuse.models.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(0)
    embed = pipeline_text_embedder(pipe)
    assert embed(["a dog", "a photo of a dog"]).shape == (2, pipe.text_encoder.config.hidden_size)
    model = ExpertEncoder(pipe.text_encoder.config.hidden_size)
    path = save_expert(model, tmp_path / "expert.safetensors")
    want = model.predict(embed, 0, "a sks dog", "in watercolor style")

    def lora(preset: str) -> LoraState:
        refs = {r.path: (k, r) for k, r in base_modules(pipe).modules.items() if r.component == "unet"}
        mods = {}
        for p in resolve_layers(pipe, preset, "sd15")[:2]:
            key, ref = refs[p]
            kernel = (1, 1) if len(ref.shape) == 4 else ()  # conv LoRAs: B is a 1x1 conv
            mods[key] = LoraModule(
                down=torch.ones(1, *ref.shape[1:]), up=torch.ones(ref.shape[0], 1, *kernel)
            )
        return LoraState(modules=mods)

    cfg = CraftConfig(
        prompt="a sks dog <c> in watercolor style <s>",
        expert=path,
        content_layers="lora",
        style_layers="lora",
    )
    plan = Craft().plan(pipe, lora("craft_content"), lora("craft_style"), cfg)
    plan.close()
    assert plan.record["lambda_source"] == "expert encoder x markers"
    assert (plan.record["lambda_c"], plan.record["lambda_s"]) == pytest.approx(want)
