"""The expert encoder's λ grid on the built-in world: CRAFT fusion scored by the oracle, span wordings, training.

    score(prompt, λ_c, λ_s) = mean over seeds of  2cs / (c + s)      c, s: oracle content / style similarity of
                                                                    the fused image to what the prompt ASKS for

The harmonic mean, not the arithmetic one, so a λ pair that keeps one side and loses the other scores low.

What the spans can tell the encoder. If every prompt asks for the LoRAs' own subject and style, the right λ hardly
depends on the wording (measured: labels were seed noise, λ MAE equal to a constant's). So the wordings
(`world_spans`) differ in what they ask for, as in the paper's semantic-extension table (the CRAFT-LoRA paper, App. B.3,
"a red car" -> "a blue car" / "a bicycle", "Van Gogh style" -> "sketch style"):
    content span  "subject": names the content LoRA's individual ("a photo of a sks teapot") -> scored against it
                  "other":   names another class ("a red car") -> scored against seen individuals of that class
    style span    "trigger": the style LoRA's trigger ("in sks style") -> scored against the LoRA's style
                  "name":    the LoRA's style by its own words, no trigger ("in wax crayon style"); only in "new"
                  "other":   a style the base model knows ("in hatched ink style") -> scored against that style
so a style LoRA should be on for "in sks style" and off for "in hatched ink style". The world's tokenizer knows
only the world's words (`world.catalog.vocabulary`), so every wording is built from them. "train" wordings are
what the grid is run on to make training examples; "new" wordings (new templates, new colours, classes and style
names) are never shown to the encoder and test the semantic extension:
    type I    new content span, trained style span
    type II   trained content span, new style span
    type III  both new
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorafuse.errors import UserInputError
from lorafuse.eval.metrics import OracleScorer, harmonic_mean, mean_cosine, world_references
from lorafuse.fusion.craft.expert_data import (
    GridSearch,
    Lambda,
    ScoreFn,
    SpanPrompt,
    grid_search,
    lambda_grid,
)
from lorafuse.lora.state import LoraState
from lorafuse.world.catalog import CLASS_NAMES, parse_individual, style_phrase

EXTENSION_TYPES = {"I": ("new", "train"), "II": ("train", "new"), "III": ("new", "new")}  # (content, style)
# other classes / styles the base model knows; the "new" ones never appear in a training wording
TRAIN_OTHER_CLASSES, NEW_OTHER_CLASSES = ("car", "house", "tree"), ("fish", "lamp", "bird")
TRAIN_OTHER_STYLES = ("hatched", "neon", "pixel", "flat", "dotted")
NEW_OTHER_STYLES = ("pastel", "watercolor", "outlined", "ink", "striped")
TRAIN_STYLE_TEMPLATES = ("in {} style", "{} style", "in a {} style")
NEW_STYLE_TEMPLATES = ("a {} style", "in {}")


@dataclass(frozen=True)
class Span:
    """One span wording: its text, what kind of request it is, and the world name it asks for."""

    text: str
    kind: str  # content: "subject" | "other"; style: "trigger" | "name" | "other"
    target: str  # an individual ('teapot_08'), a class ('car') or a style ('ink')


@dataclass(frozen=True)
class WorldPrompt(SpanPrompt):
    """A `SpanPrompt` that knows what its spans ask for, so the oracle scores the right thing."""

    content_kind: str = "subject"
    style_kind: str = "trigger"
    content_target: str = ""
    style_target: str = ""


def world_spans(individual: str, style: str) -> dict[str, dict[str, list[Span]]]:
    """{"content": {"train": [Span...], "new": [...]}, "style": {...}} for a world individual and LoRA style."""
    ind = parse_individual(individual)
    primary, secondary, accent = ind.colour_names
    cls, name = ind.cls, ind.name
    o1, o2 = [c for c in TRAIN_OTHER_CLASSES if c != cls][:2]
    n1, n2 = [c for c in NEW_OTHER_CLASSES if c != cls][:2]
    content = {
        "train": [Span(f"a sks {cls}", "subject", name), Span(f"a photo of a sks {cls}", "subject", name),
                  Span(f"a {primary} {o1}", "other", o1), Span(f"a photo of a {o2}", "other", o2)],
        # an unseen template, an unseen colour word beside the trigger, unseen classes
        "new": [Span(f"an image of a sks {cls}", "subject", name),
                Span(f"a picture of a {secondary} sks {cls}", "subject", name),
                Span(f"an image of a {n1}", "other", n1), Span(f"a {accent} {n2}", "other", n2)],
    }  # fmt: skip
    phrase, k = style_phrase(style), len(TRAIN_STYLE_TEMPLATES)
    train_style = [Span(t.format("sks"), "trigger", style) for t in TRAIN_STYLE_TEMPLATES]
    for i, other in enumerate(TRAIN_OTHER_STYLES):  # two templates each, so no template means "other" alone
        for j in range(2):
            train_style.append(
                Span(TRAIN_STYLE_TEMPLATES[(i + j) % k].format(style_phrase(other)), "other", other)
            )
    every_template = TRAIN_STYLE_TEMPLATES + NEW_STYLE_TEMPLATES
    new_style = [Span(t.format("sks"), "trigger", style) for t in NEW_STYLE_TEMPLATES]
    new_style += [Span(f"in sks {phrase} style", "trigger", style)]
    new_style += [Span(f"in {phrase} style", "name", style), Span(f"{phrase} style", "name", style)]
    new_style += [Span(every_template[i % len(every_template)].format(style_phrase(other)), "other", other)
                  for i, other in enumerate(NEW_OTHER_STYLES)]  # fmt: skip
    return {"content": content, "style": {"train": train_style, "new": new_style}}


def world_prompts(
    individual: str, style: str, concept_id: int, content: str, style_part: str, *, per_style: int = 1,
    offset: int = 0, limit: int = 0, seed: int = 0,
) -> list[WorldPrompt]:  # fmt: skip
    """Prompts of the chosen wording sets ("train" or "new"): each style wording `per_style` times, with the content
    wordings taken in turn from `offset` (the full product is 4x the grid's cost for little more: λ_s follows the
    style span, λ_c barely moves). `limit` > 0 keeps a random subset of that size (seeded), in order."""
    spans = world_spans(individual, style)
    for part, which in (("content", content), ("style", style_part)):
        if which not in spans[part]:
            raise UserInputError(f"{part} wordings are 'train' or 'new', got {which!r}")
    if per_style < 1:
        raise UserInputError(f"per_style must be >= 1, got {per_style}")
    cs, ss = spans["content"][content], spans["style"][style_part]
    out = []
    for i, s in enumerate(ss):
        for j in range(per_style):
            c = cs[(offset + i * per_style + j) % len(cs)]
            out.append(WorldPrompt(concept_id, c.text, s.text, c.kind, s.kind, c.target, s.target))
    if 0 < limit < len(out):
        keep = np.sort(
            np.random.default_rng([seed, concept_id, len(out)]).choice(len(out), limit, replace=False)
        )
        out = [out[k] for k in keep]
    return out


def span_prompts(
    individual: str, style: str, concept_id: int, content: str, style_part: str
) -> list[WorldPrompt]:
    """Every (content span, style span) of the chosen wording sets: the full product."""
    spans = world_spans(individual, style)
    for part, which in (("content", content), ("style", style_part)):
        if which not in spans[part]:
            raise UserInputError(f"{part} wordings are 'train' or 'new', got {which!r}")
    return [
        WorldPrompt(concept_id, c.text, s.text, c.kind, s.kind, c.target, s.target)
        for c in spans["content"][content] for s in spans["style"][style_part]
    ]  # fmt: skip


def class_references(cls: str, count: int = 16, seed: int = 0) -> np.ndarray:
    """Clean renders of the class's seen individuals across the seen styles: what "a car" should look like.
    (count, 64, 64, 3) uint8."""
    from lorafuse.world.catalog import SEEN_INDIVIDUALS, SEEN_STYLES, individual
    from lorafuse.world.render import render

    if cls not in CLASS_NAMES:
        raise UserInputError(f"unknown world class {cls!r}; classes: {', '.join(CLASS_NAMES)}")
    rng = np.random.default_rng([seed, 998])
    return np.stack([render(individual(cls, k % SEEN_INDIVIDUALS), SEEN_STYLES[k % len(SEEN_STYLES)], rng)
                     for k in range(count)])  # fmt: skip


class WorldJudge:
    """Oracle scores of images against what each prompt asks for; reference embeddings computed once per target."""

    def __init__(self, oracle: Any):
        self.oracle = oracle
        self._content: dict[str, Any] = {}
        self._style: dict[str, Any] = {}

    def _content_ref(self, target: str):
        if target not in self._content:
            refs = world_references(individual=target) if "_" in target else class_references(target)
            self._content[target] = self.oracle.judge(refs).content
        return self._content[target]

    def _style_ref(self, target: str):
        if target not in self._style:
            self._style[target] = self.oracle.judge(world_references(style=target)).style
        return self._style[target]

    def __call__(
        self, images: np.ndarray, prompts: Sequence[WorldPrompt], seeds: int
    ) -> dict[str, np.ndarray]:
        """images prompt-major (image k of prompt p is row p * seeds + k) -> {"content", "style", "harmonic"},
        each (len(prompts), seeds)."""
        verdict = self.oracle.judge(images)
        c, s = np.zeros((len(prompts), seeds)), np.zeros((len(prompts), seeds))
        for p, prompt in enumerate(prompts):
            rows = slice(p * seeds, (p + 1) * seeds)
            c[p] = mean_cosine(verdict.content[rows], self._content_ref(prompt.content_target))
            s[p] = mean_cosine(verdict.style[rows], self._style_ref(prompt.style_target))
        return {"content": c, "style": s, "harmonic": harmonic_mean(c, s)}


def parse_pair(text: str) -> tuple[str, str]:
    """'teapot_08:crayon' -> ('teapot_08', 'crayon'), both checked against the world."""
    from lorafuse.world.catalog import check_style

    individual, sep, style = text.partition(":")
    if not sep or not individual or not style:
        raise UserInputError(f"expected INDIVIDUAL:STYLE such as teapot_08:crayon, got {text!r}")
    parse_individual(individual)
    return individual, check_style(style)


def craft_images(
    pipe: Any, content: LoraState, style: LoraState, prompts: Sequence[str], *, lambda_c: float, lambda_s: float,
    seeds: int = 2, seed: int = 0, steps: int = 15, guidance: float = 4.0, **craft_options: Any,
) -> np.ndarray:  # fmt: skip
    """CRAFT-fuse every prompt with `seeds` noises: (len(prompts) * seeds, H, W, 3) uint8, prompt-major. Image k
    of every prompt starts from noise `seed + k`, so two calls differing only in λ see the same noises."""
    from lorafuse.fusion.api import fuse
    from lorafuse.fusion.markers import strip_markers

    result = fuse(
        content, style, prompt=[strip_markers(p) for p in prompts], method="craft", base=pipe, num_images=seeds,
        seed=seed, steps=steps, guidance=guidance, progress=False, lambda_c=lambda_c, lambda_s=lambda_s,
        **craft_options,
    )  # fmt: skip
    return result.uint8()


def craft_oracle_scores(
    pipe: Any, content: LoraState, style: LoraState, prompts: Sequence[str], scorer: OracleScorer, *,
    lambda_c: float, lambda_s: float, seeds: int = 2, **settings: Any,
) -> dict[str, np.ndarray]:  # fmt: skip
    """CRAFT-fuse every prompt with `seeds` noises and score each image against ONE scorer's references:
    {"content", "style", "harmonic"} (and "right_individual" / "right_style" when the scorer knows them) of shape
    (len(prompts), seeds). `prompts` are clean or marked; λ are given explicitly, so markers do not decide them."""
    images = craft_images(pipe, content, style, prompts, lambda_c=lambda_c, lambda_s=lambda_s, seeds=seeds,
                          **settings)  # fmt: skip
    m = scorer(images)
    shape = (len(prompts), seeds)  # images are prompt-major: image k of prompt p is row p * seeds + k
    c, s = m["oracle_content"].reshape(shape), m["oracle_style"].reshape(shape)
    out = {"content": c, "style": s, "harmonic": harmonic_mean(c, s)}
    for key in ("right_individual", "right_style"):  # 0/1 per image: the oracle names the intended factor
        if key in m:
            out[key] = m[key].reshape(shape)
    return out


def world_score_fn(
    pipe: Any, content: LoraState, style: LoraState, judge: WorldJudge, *, seeds: int = 2, **settings: Any
) -> ScoreFn:
    """A `ScoreFn` for `grid_search` over `WorldPrompt`s: the seed-mean harmonic score of each prompt against
    what it asks for, at (λ_c, λ_s); all prompts in one sampling run."""

    def score(prompts: Sequence[SpanPrompt], lambda_c: float, lambda_s: float) -> np.ndarray:
        bad = [p for p in prompts if not isinstance(p, WorldPrompt)]
        if bad:
            raise UserInputError(
                f"the world scorer needs WorldPrompts (what each span asks for), got {bad[0]}"
            )
        images = craft_images(pipe, content, style, [p.clean for p in prompts], lambda_c=lambda_c,
                              lambda_s=lambda_s, seeds=seeds, **settings)  # fmt: skip
        return judge(images, prompts, seeds)["harmonic"].mean(axis=1)

    return score


def world_grid_search(
    pipe: Any, content: LoraState, style: LoraState, prompts: Sequence[WorldPrompt], *, oracle: Any = None,
    judge: WorldJudge | None = None, grid: Sequence[Lambda] | None = None, temperature: float = 0.0,
    progress: Callable[[int, int], None] | None = None, **settings: Any,
) -> GridSearch:  # fmt: skip
    """`grid_search` of world prompts of one LoRA pair, each scored by the oracle against what it asks for."""
    from lorafuse.world.oracle import default_oracle

    judge = judge or WorldJudge(oracle or default_oracle())
    fn = world_score_fn(pipe, content, style, judge, **settings)
    return grid_search(prompts, fn, lambda_grid() if grid is None else grid, temperature=temperature,
                       progress=progress)  # fmt: skip


def train_world_expert(
    pairs: Sequence[tuple[str, str]], work_dir: str | Path, out: str | Path, *, base: str = "world",
    grid: Sequence[Lambda] | None = None, seeds: int = 2, steps: int = 15, guidance: float = 4.0,
    expert_steps: int = 500, temperature: float = 0.05, per_style: int = 2, progress: bool = True,
) -> tuple[Path, list[GridSearch]]:  # fmt: skip
    """The whole recipe behind `lorafuse craft expert`: for each (individual, style) pair, train (or reuse) its
    CRAFT LoRAs, run the λ grid on the "train" wordings (`world_prompts`), then fit the encoder on the labels
    (soft at `temperature`, see `expert_data`) and save it. Concept IDs are 1, 2, ... in order of first appearance
    of each individual."""
    from lorafuse.fusion.craft.expert import pipeline_text_embedder, save_expert, train_expert
    from lorafuse.lora.io import load_lora
    from lorafuse.models.load import load_base_pipeline
    from lorafuse.train.world_personalize import style_recipe, subject_recipe, train_world_lora
    from lorafuse.world.oracle import default_oracle

    if not pairs:
        raise UserInputError("give at least one (individual, style) pair to run the λ grid on")
    ids: dict[str, int] = {}
    pipe, judge = load_base_pipeline(base), WorldJudge(default_oracle())
    searches = []
    for individual, style_name in pairs:
        concept_id = ids.setdefault(individual, len(ids) + 1)
        c_path = train_world_lora(
            subject_recipe(individual, layers="craft", base=base), work_dir, progress=progress
        )
        s_path = train_world_lora(
            style_recipe(style_name, layers="craft", base=base), work_dir, progress=progress
        )
        prompts = world_prompts(individual, style_name, concept_id, "train", "train", per_style=per_style,
                                offset=concept_id - 1)  # fmt: skip
        if progress:
            print(f"λ grid: {individual} x {style_name}, {len(prompts)} prompts", flush=True)
        c_state, s_state = load_lora(c_path, base=pipe), load_lora(s_path, base=pipe)
        searches.append(world_grid_search(pipe, c_state, s_state, prompts, judge=judge, grid=grid,
                                          temperature=temperature, seeds=seeds, steps=steps, guidance=guidance))  # fmt: skip
    examples = [e for s in searches for e in s.examples()]
    model = train_expert(examples, pipeline_text_embedder(pipe), steps=expert_steps)
    return save_expert(model, out), searches
