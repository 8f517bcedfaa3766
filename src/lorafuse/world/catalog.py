"""What exists in the world: classes, individuals, styles, which of them the base model has seen, captions.

Everything is deterministic from `WORLD_SEED`: an individual's traits and colours come from a generator seeded
by (world seed, class index, individual index), so `Individual("teapot", 8)` is the same teapot everywhere.
Held-out individuals and styles are never shown to the base model: they are what users personalise with LoRAs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np

from lorafuse.errors import UserInputError
from lorafuse.world.classes import CLASSES
from lorafuse.world.styles import STYLES

WORLD_SEED = 20261123
INDIVIDUALS_PER_CLASS = 10
SEEN_INDIVIDUALS = 8  # indices 0..7 train the base model; 8..9 are held out
HELD_OUT_STYLES = ("crayon", "blueprint", "mosaic")

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.15),
    "orange": (0.95, 0.55, 0.1),
    "yellow": (0.95, 0.85, 0.15),
    "green": (0.2, 0.65, 0.25),
    "teal": (0.1, 0.6, 0.6),
    "blue": (0.15, 0.35, 0.85),
    "purple": (0.55, 0.25, 0.75),
    "pink": (0.95, 0.5, 0.7),
    "brown": (0.5, 0.3, 0.15),
    "grey": (0.55, 0.55, 0.58),
}
FIXED_ROLES = {"dark": (0.12, 0.1, 0.1), "light": (0.92, 0.95, 0.98)}

CLASS_NAMES: tuple[str, ...] = tuple(CLASSES)
STYLE_NAMES: tuple[str, ...] = tuple(STYLES)
SEEN_STYLES: tuple[str, ...] = tuple(s for s in STYLE_NAMES if s not in HELD_OUT_STYLES)


@dataclass(frozen=True)
class Individual:
    """One particular object: class + index within the class. Traits and palette derive from these two."""

    cls: str
    index: int
    traits: dict = field(compare=False, hash=False, repr=False)
    palette: dict = field(compare=False, hash=False, repr=False)  # role -> RGB
    colour_names: tuple[str, str, str] = field(compare=False, hash=False, repr=False, default=("", "", ""))

    @property
    def name(self) -> str:
        return f"{self.cls}_{self.index:02d}"

    @property
    def held_out(self) -> bool:
        return self.index >= SEEN_INDIVIDUALS


@cache
def individual(cls: str, index: int) -> Individual:
    if cls not in CLASSES:
        raise UserInputError(f"unknown class {cls!r}; the world has: {', '.join(CLASS_NAMES)}")
    if not 0 <= index < INDIVIDUALS_PER_CLASS:
        raise UserInputError(f"individual index {index} out of range 0..{INDIVIDUALS_PER_CLASS - 1} for {cls!r}")
    rng = np.random.default_rng([WORLD_SEED, CLASS_NAMES.index(cls), index])
    traits = CLASSES[cls][0](rng)
    names = list(COLOURS)
    primary, secondary, accent = (names[i] for i in rng.choice(len(names), size=3, replace=False))
    palette = {"primary": COLOURS[primary], "secondary": COLOURS[secondary], "accent": COLOURS[accent], **FIXED_ROLES}
    return Individual(cls, index, traits, palette, (primary, secondary, accent))


def parse_individual(name: str) -> Individual:
    """'teapot_08' -> Individual. Errors name the bad part."""
    cls, _, idx = name.rpartition("_")
    if not cls or not idx.isdigit():
        raise UserInputError(f"{name!r} is not an individual name; expected CLASS_NN such as 'teapot_08'")
    return individual(cls, int(idx))


def check_style(style: str) -> str:
    if style not in STYLES:
        raise UserInputError(f"unknown style {style!r}; the world has: {', '.join(STYLE_NAMES)}")
    return style


def all_individuals(held_out: bool | None = None) -> list[Individual]:
    out = [individual(c, i) for c in CLASS_NAMES for i in range(INDIVIDUALS_PER_CLASS)]
    return out if held_out is None else [x for x in out if x.held_out == held_out]


def style_phrase(style: str) -> str:
    return STYLES[check_style(style)][1]


_TEMPLATES = ("a photo of a {obj}, in {style} style", "a picture of a {obj}, {style} style",
              "an image of a {obj} in {style} style", "a {obj}, {style} style")


def caption(ind: Individual, style: str, template: int = 0, *, with_colour: bool = True, subject: str | None = None) -> str:
    """Natural-language caption from the factors: 'a photo of a red teapot, in hatched ink style'.

    `subject` replaces the object words (e.g. 'sks teapot' for a personalisation dataset).
    """
    obj = subject or (f"{ind.colour_names[0]} {ind.cls}" if with_colour else ind.cls)
    return _TEMPLATES[template % len(_TEMPLATES)].format(obj=obj, style=style_phrase(style))


def vocabulary() -> list[str]:
    """Every word the world's captions use: the tokenizer makes each one a single token."""
    words: set[str] = set()
    texts = [t.format(obj="x", style="x") for t in _TEMPLATES]
    texts += list(CLASS_NAMES) + list(COLOURS) + [p for _, p in STYLES.values()]
    texts += ["style", "photo", "of", "in", "sks", "a", "an"]
    for t in texts:
        words.update(w.strip(",.").lower() for w in t.split())
    return sorted(w for w in words if w and w != "x")
