"""The expert encoder's λ grid on the built-in world: CRAFT fusion scored by the oracle, span wordings, training.

    score(prompt, λ_c, λ_s) = mean over seeds of  2cs / (c + s)      c, s: oracle content / style similarity of
                                                                    the fused image to the individual's / style's
                                                                    clean renders (`eval.metrics.OracleScorer`)

The harmonic mean, not the arithmetic one, so a λ pair that keeps one side and loses the other scores low.

Span wordings (`world_spans`): the world's tokenizer knows only the world's words (`world.catalog.vocabulary`), so
the wordings are built from them. "train" wordings are what the grid is run on to make training examples; "new"
wordings are never shown to the encoder and test the paper's semantic extension (seed 001 App. B.3):
    type I    new content span, trained style span
    type II   trained content span, new style span
    type III  both new
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorafuse.errors import UserInputError
from lorafuse.eval.metrics import OracleScorer, harmonic_mean
from lorafuse.fusion.craft.expert_data import (
    GridSearch,
    Lambda,
    ScoreFn,
    SpanPrompt,
    grid_search,
    lambda_grid,
)
from lorafuse.lora.state import LoraState
from lorafuse.world.catalog import parse_individual, style_phrase

EXTENSION_TYPES = {"I": ("new", "train"), "II": ("train", "new"), "III": ("new", "new")}  # (content, style)


def world_spans(individual: str, style: str) -> dict[str, dict[str, list[str]]]:
    """{"content": {"train": [...], "new": [...]}, "style": {...}} for a world individual and style."""
    ind = parse_individual(individual)
    primary, secondary, accent = ind.colour_names
    cls, phrase = ind.cls, style_phrase(style)
    return {
        "content": {
            "train": [f"a sks {cls}", f"a photo of a sks {cls}", f"a picture of a sks {cls}", f"a {primary} sks {cls}"],
            # an unseen template, an unseen colour word, and no trigger word at all (a plain class noun)
            "new": [f"an image of a sks {cls}", f"a photo of a {secondary} sks {cls}", f"a {accent} {cls}"],
        },
        "style": {
            "train": ["in sks style", "sks style", "in a sks style"],
            # the style's own words instead of (or beside) the trigger: text the encoder never saw
            "new": [f"in {phrase} style", f"{phrase} style", f"in sks {phrase} style"],
        },
    }  # fmt: skip


def span_prompts(
    individual: str, style: str, concept_id: int, content: str, style_part: str
) -> list[SpanPrompt]:
    """Every (content span, style span) of the chosen wording sets ("train" or "new")."""
    spans = world_spans(individual, style)
    for part, which in (("content", content), ("style", style_part)):
        if which not in spans[part]:
            raise UserInputError(f"{part} wordings are 'train' or 'new', got {which!r}")
    return [
        SpanPrompt(concept_id, c, s) for c in spans["content"][content] for s in spans["style"][style_part]
    ]


def parse_pair(text: str) -> tuple[str, str]:
    """'teapot_08:crayon' -> ('teapot_08', 'crayon'), both checked against the world."""
    from lorafuse.world.catalog import check_style

    individual, sep, style = text.partition(":")
    if not sep or not individual or not style:
        raise UserInputError(f"expected INDIVIDUAL:STYLE such as teapot_08:crayon, got {text!r}")
    parse_individual(individual)
    return individual, check_style(style)


def craft_oracle_scores(
    pipe: Any, content: LoraState, style: LoraState, prompts: Sequence[str], scorer: OracleScorer, *,
    lambda_c: float, lambda_s: float, seeds: int = 2, seed: int = 0, steps: int = 15, guidance: float = 4.0,
    **craft_options: Any,
) -> dict[str, np.ndarray]:  # fmt: skip
    """CRAFT-fuse every prompt with `seeds` noises and score each image: {"content", "style", "harmonic"} (and
    "right_individual" / "right_style" when the scorer knows them) of shape (len(prompts), seeds). `prompts` are clean or marked; λ are given explicitly, so markers do not
    decide them."""
    from lorafuse.fusion.api import fuse
    from lorafuse.fusion.craft.prompts import strip_markers

    result = fuse(
        content, style, prompt=[strip_markers(p) for p in prompts], method="craft", base=pipe, num_images=seeds,
        seed=seed, steps=steps, guidance=guidance, progress=False, lambda_c=lambda_c, lambda_s=lambda_s,
        **craft_options,
    )  # fmt: skip
    m = scorer(result.uint8())
    shape = (len(prompts), seeds)  # images are prompt-major: image k of prompt p is row p * seeds + k
    c, s = m["oracle_content"].reshape(shape), m["oracle_style"].reshape(shape)
    out = {"content": c, "style": s, "harmonic": harmonic_mean(c, s)}
    for key in ("right_individual", "right_style"):  # 0/1 per image: the oracle names the intended factor
        if key in m:
            out[key] = m[key].reshape(shape)
    return out


def world_score_fn(
    pipe: Any, content: LoraState, style: LoraState, scorer: OracleScorer, **settings: Any
) -> ScoreFn:
    """A `ScoreFn` for `grid_search`: the seed-mean harmonic score of each prompt at (λ_c, λ_s)."""

    def score(prompts: Sequence[SpanPrompt], lambda_c: float, lambda_s: float) -> np.ndarray:
        texts = [p.clean for p in prompts]
        out = craft_oracle_scores(pipe, content, style, texts, scorer, lambda_c=lambda_c, lambda_s=lambda_s,
                                  **settings)  # fmt: skip
        return out["harmonic"].mean(axis=1)

    return score


def world_grid_search(
    pipe: Any, content: LoraState, style: LoraState, individual: str, style_name: str, prompts: Sequence[SpanPrompt],
    *, oracle: Any = None, grid: Sequence[Lambda] | None = None, progress: Callable[[int, int], None] | None = None,
    **settings: Any,
) -> GridSearch:  # fmt: skip
    """`grid_search` of the world prompts of one (individual, style) LoRA pair, scored by the oracle."""
    from lorafuse.world.oracle import default_oracle

    scorer = OracleScorer(oracle or default_oracle(), individual=individual, style=style_name)
    fn = world_score_fn(pipe, content, style, scorer, **settings)
    return grid_search(prompts, fn, lambda_grid() if grid is None else grid, progress=progress)


def train_world_expert(
    pairs: Sequence[tuple[str, str]], work_dir: str | Path, out: str | Path, *, base: str = "world",
    grid: Sequence[Lambda] | None = None, seeds: int = 2, steps: int = 15, guidance: float = 4.0,
    expert_steps: int = 500, progress: bool = True,
) -> tuple[Path, list[GridSearch]]:  # fmt: skip
    """The whole recipe behind `lorafuse craft expert`: for each (individual, style) pair, train (or reuse) its
    CRAFT LoRAs, run the λ grid on the "train" wordings, then fit the encoder on the best pairs and save it.
    Concept IDs are 1, 2, ... in order of first appearance of each individual."""
    from lorafuse.fusion.craft.expert import pipeline_text_embedder, save_expert, train_expert
    from lorafuse.lora.io import load_lora
    from lorafuse.models.load import load_base_pipeline
    from lorafuse.world.personalize import style_recipe, subject_recipe, train_world_lora

    if not pairs:
        raise UserInputError("give at least one (individual, style) pair to run the λ grid on")
    ids: dict[str, int] = {}
    pipe = load_base_pipeline(base)
    searches = []
    for individual, style_name in pairs:
        concept_id = ids.setdefault(individual, len(ids) + 1)
        c_path = train_world_lora(
            subject_recipe(individual, layers="craft", base=base), work_dir, progress=progress
        )
        s_path = train_world_lora(
            style_recipe(style_name, layers="craft", base=base), work_dir, progress=progress
        )
        prompts = span_prompts(individual, style_name, concept_id, "train", "train")
        if progress:
            print(f"λ grid: {individual} x {style_name}, {len(prompts)} prompts", flush=True)
        c_state, s_state = load_lora(c_path, base=pipe), load_lora(s_path, base=pipe)
        searches.append(world_grid_search(pipe, c_state, s_state, individual, style_name, prompts, grid=grid,
                                          seeds=seeds, steps=steps, guidance=guidance))  # fmt: skip
    examples = [e for s in searches for e in s.examples()]
    model = train_expert(examples, pipeline_text_embedder(pipe), steps=expert_steps)
    return save_expert(model, out), searches
