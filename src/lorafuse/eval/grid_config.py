"""The typed TOML config of `lorafuse grid` and its expansion into cells; every check that can fail runs here,
before anything samples.

    prompt = "a photo of a sks teapot, in ink style"
    [axes]                       # each key is one axis; a key left out keeps its one default value
    checkpoint = ["lora-1.safetensors", "lora-2.safetensors"]   # e.g. one LoRA per epoch
    lora_weight = [0.0, 0.25, 0.5, 1.0]
    steps = [20, 30]
    base = ["world", "/models/other-base"]
    [axes.options]               # fusion-method options, one axis per option
    k = [4, 8]
    [metrics]
    individual = "teapot_08"     # world names: oracle references and right-individual/class/style accuracy
    clip = "/models/clip-vit-large-patch14"

Three kinds of grid, by which LoRA axes are given: none (the base alone), `checkpoint` (one LoRA injected at
`lora_weight`), `checkpoint` + `style_checkpoint` (fused by `method` with `lora_weight` / `style_weight` as
content_weight / style_weight). Relative paths are relative to the config file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafuse.config.toml_io import load_config
from lorafuse.errors import ConfigError, UserInputError
from lorafuse.utils.devices import resolve_device, resolve_dtype

OptionValue = bool | int | float | str
DEFAULTS: dict[str, list[Any]] = {"base": ["world"], "lora_weight": [1.0], "style_weight": [1.0], "method": ["direct"],
                                  "steps": [25], "guidance": [7.5], "seed": [0]}  # fmt: skip
# Canonical axis order: outermost first (a base loads once; a checkpoint's LoRA is read once per base).
AXIS_ORDER = ("base", "checkpoint", "style_checkpoint", "method", "lora_weight", "style_weight", "steps",
              "guidance", "seed")  # fmt: skip
WORLD_BASES = ("world", "world-random")


@dataclass
class AxesConfig:
    """Grid axes: each a list of values. Left out: not an axis (the default in DEFAULTS, or no LoRA)."""

    base: list[str] | None = (
        None  # "world", "world-random", "sd15-tiny", a diffusers folder, a checkpoint file
    )
    checkpoint: list[Path] | None = None  # LoRA files, e.g. one per epoch; the content LoRA when fusing
    style_checkpoint: list[Path] | None = None  # style LoRA files: with these, cells fuse the two
    lora_weight: list[float] | None = None  # the (content) LoRA's weight
    style_weight: list[float] | None = None
    method: list[str] | None = None  # fusion methods (lorafuse.fusion registry)
    steps: list[int] | None = None
    guidance: list[float] | None = None
    seed: list[int] | None = None
    options: dict[str, list[OptionValue]] = field(default_factory=dict)  # fusion-method option axes


@dataclass
class MetricsConfig:
    individual: str | None = None  # world individual of the content LoRA ('teapot_08')
    style: str | None = None  # world style of the style LoRA ('ink')
    content_references: Path | None = None  # a folder of images; default: world renders of `individual`
    style_references: Path | None = None
    oracle: bool | None = None  # None: oracle metrics for world bases if its weights are installed
    oracle_path: Path | None = None
    clip: str | None = None  # CLIP folder or cached hub id: CLIP-I and CLIP-T; with clip_arch, a weights file
    # an open_clip architecture ('ViT-B-32'): metrics.clip is then its local weights file (lorafuse[metrics])
    clip_arch: str | None = None
    dino: str | None = None  # DINO ViT-S/16 (or DINOv2) folder or cached hub id
    triggers: list[str] = field(default_factory=lambda: ["sks"])  # removed from the prompt for CLIP-T
    cross_influence: bool = True  # fusion grids: also sample each LoRA alone, for the cross-influence score
    device: str = "cpu"


@dataclass
class LayoutConfig:
    rows: str | None = None  # an axis name ("checkpoint", "option.k", ...); default: chosen from the axes
    cols: str | None = None
    max_rows: int = 8  # larger grids are split into pages
    max_cols: int = 10
    scale: int | None = None  # tile upscaling; default 2 for images up to 128 px, else 1


@dataclass
class GridConfig:
    prompt: str
    negative_prompt: str | None = None
    out: Path | None = None  # default: <config folder>/<config name>_grid
    scheduler: str = "ddim"  # ddim, euler or dpmpp
    height: int | None = None  # default: the base's native size
    width: int | None = None
    allow_pickle: bool = False
    device: str | None = None  # where the bases run: cpu (default), cuda, cuda:1, mps
    dtype: str | None = None  # the bases' precision: fp32 (default), bf16, fp16; part of every cell's id
    axes: AxesConfig = field(default_factory=AxesConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)


def load_grid_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> GridConfig:
    """Read the TOML file; relative paths become relative to its folder (so a config travels with its LoRAs)."""
    path = Path(path)
    cfg = load_config(GridConfig, path, overrides)
    return resolve_paths(cfg, path.parent, default_out=path.parent / f"{path.stem}_grid")


def resolve_paths(cfg: GridConfig, root: Path, default_out: Path | None = None) -> GridConfig:
    def rel(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else root / p)

    def rel_name(s: str | None) -> str | None:  # a built-in name or hub id stays as it is
        return s if s is None or not (root / s).exists() or Path(s).is_absolute() else str(root / s)

    axes, metrics = cfg.axes, cfg.metrics
    axes = dataclasses.replace(
        axes, base=None if axes.base is None else [rel_name(b) for b in axes.base],
        checkpoint=None if axes.checkpoint is None else [rel(p) for p in axes.checkpoint],
        style_checkpoint=None if axes.style_checkpoint is None else [rel(p) for p in axes.style_checkpoint],
    )  # fmt: skip
    metrics = dataclasses.replace(
        metrics, content_references=rel(metrics.content_references), style_references=rel(metrics.style_references),
        oracle_path=rel(metrics.oracle_path), clip=rel_name(metrics.clip), dino=rel_name(metrics.dino),
    )  # fmt: skip
    out = rel(cfg.out) if cfg.out is not None else default_out
    return dataclasses.replace(cfg, axes=axes, metrics=metrics, out=out)


@dataclass(frozen=True)
class Cell:
    """What decides one image. content/style None: that LoRA is absent; method None: no fusion."""

    base: str
    content: str | None
    style: str | None
    content_weight: float
    style_weight: float
    method: str | None
    options: tuple[tuple[str, OptionValue], ...]
    steps: int
    guidance: float
    seed: int

    @property
    def kind(self) -> str:
        if self.method is not None:
            return "fused"
        return "content_only" if self.content else "style_only" if self.style else "base"

    def settings(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "options": dict(self.options), "kind": self.kind}


@dataclass
class GridPlan:
    cfg: GridConfig
    coords: list[dict[str, Any]]  # per grid cell: axis name -> value (the grid's coordinates)
    cells: list[
        Cell
    ]  # per grid cell: what is sampled (equal cells, e.g. an option a method lacks, share an id)
    singles: dict[Cell, tuple[Cell, Cell]]  # fused cell -> (content alone, style alone), for cross-influence
    varying: list[str]  # axes with more than one value, in AXIS_ORDER (options as "option.NAME")
    sizes: dict[str, tuple[int, int]]  # base -> (height, width); (0, 0): the base's own, known once loaded
    _ids: dict[Cell, str] = field(default_factory=dict, repr=False)  # computed once: ids stat the LoRA files

    def all_cells(self) -> list[Cell]:
        extra = [c for pair in self.singles.values() for c in pair]
        ordered = list(dict.fromkeys(self.cells + extra))
        return sorted(ordered, key=lambda c: (c.base, c.content or "", c.style or "", c.method or ""))

    def cell_id(self, cell: Cell) -> str:
        """Stable id of everything that decides the image, LoRA files by path, size and mtime (a retrained file
        of the same name is a new cell)."""
        if cell in self._ids:
            return self._ids[cell]
        h, w = self.sizes[cell.base]
        key = {**cell.settings(), "prompt": self.cfg.prompt, "negative_prompt": self.cfg.negative_prompt,
               "scheduler": self.cfg.scheduler, "height": h, "width": w,
               **_precision(self.cfg.dtype),
               "files": [_fingerprint(p) for p in (cell.content, cell.style) if p]}  # fmt: skip
        self._ids[cell] = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self._ids[cell]


def _precision(dtype: str | None) -> dict[str, str]:
    """The id's dtype entry: none for fp32, so the ids of grids made before `dtype` existed stay valid."""
    resolved = resolve_dtype(dtype)
    return {} if resolved in (None, torch.float32) else {"dtype": str(resolved).removeprefix("torch.")}


def _fingerprint(path: str) -> list[Any]:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def _axis_values(cfg: GridConfig) -> dict[str, list[Any]]:
    axes = cfg.axes
    values: dict[str, list[Any]] = {}
    for name in AXIS_ORDER:
        given = getattr(axes, name)
        if given is not None and len(given) == 0:
            raise ConfigError(f"axes.{name} has no values: give at least one, or leave the key out")
        if given is not None and len(set(map(str, given))) != len(given):
            raise ConfigError(f"axes.{name} lists a value twice: {given}")
        values[name] = list(given) if given is not None else list(DEFAULTS.get(name, [None]))
    for name, opts in axes.options.items():
        if len(opts) == 0:
            raise ConfigError(f"axes.options.{name} has no values: give at least one, or leave the key out")
        values[f"option.{name}"] = list(opts)
    if axes.style_checkpoint is None:  # not a fusion grid: no method, no style weight in the coordinates
        values["method"] = values["style_weight"] = [None]
    if axes.checkpoint is None:
        values["lora_weight"] = [None]
    return values


def _check_mode(cfg: GridConfig) -> None:
    a = cfg.axes
    if a.style_checkpoint is not None and a.checkpoint is None:
        raise ConfigError("axes.style_checkpoint needs axes.checkpoint (the content LoRA) to fuse with")
    fusion_only = {"method": a.method, "style_weight": a.style_weight, "options": a.options or None}
    if a.style_checkpoint is None:
        given = [f"axes.{k}" for k, v in fusion_only.items() if v is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: only for fusion grids; add axes.style_checkpoint (style LoRA files)"
            )
    if a.lora_weight is not None and a.checkpoint is None:
        raise ConfigError("axes.lora_weight needs axes.checkpoint (the LoRA files to weight)")
    for name in ("checkpoint", "style_checkpoint"):
        for p in getattr(a, name) or []:
            if not p.is_file():
                raise UserInputError(f"axes.{name}: {p}: no such LoRA file")


def _check_numbers(cfg: GridConfig) -> None:
    """What `sample` would refuse, refused now rather than at the first cell that has it."""
    import math

    a = cfg.axes
    if any(s < 1 for s in a.steps or []):
        raise ConfigError(f"axes.steps: every value must be >= 1, got {a.steps}")
    if any(not math.isfinite(g) or g < 0 for g in a.guidance or []):
        raise ConfigError(f"axes.guidance: every value must be a finite number >= 0, got {a.guidance}")
    for name in ("lora_weight", "style_weight"):
        if any(not math.isfinite(w) for w in getattr(a, name) or []):
            raise ConfigError(f"axes.{name}: every value must be a finite number, got {getattr(a, name)}")
    for name in ("height", "width"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be a positive number of pixels, got {value}")
    from lorafuse.fusion.sampling import SEED_RANGE

    if any(not SEED_RANGE[0] <= s <= SEED_RANGE[1] for s in a.seed or []):
        raise ConfigError(f"axes.seed: every value must lie in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {a.seed}")


def _check_files(cfg: GridConfig, bases: list[str]) -> None:
    """Every base named and every LoRA file readable, before the output folder is made or a base loads."""
    from lorafuse.lora.io import check_lora_file
    from lorafuse.models.load import check_base_name

    for base in bases:
        check_base_name(base)
    for path in dict.fromkeys([*(cfg.axes.checkpoint or []), *(cfg.axes.style_checkpoint or [])]):
        check_lora_file(path, allow_pickle=cfg.allow_pickle)


def _check_methods(cfg: GridConfig, values: dict[str, list[Any]]) -> None:
    from lorafuse.fusion.registry import get_method, make_config

    methods = values["method"]
    fields = {m: set(get_method(m).config_cls.__dataclass_fields__) for m in methods}
    for name in cfg.axes.options:
        if not any(name in f for f in fields.values()):
            raise ConfigError(f"axes.options.{name}: none of the methods {methods} has an option '{name}'")
    for m in methods:
        own = [k for k in cfg.axes.options if k in fields[m]]
        for combo in itertools.product(*(cfg.axes.options[k] for k in own)):
            make_config(m, None, **dict(zip(own, combo, strict=True)))  # the method's own range checks


def native_size(base: str) -> tuple[int, int] | None:
    """(height, width) a base samples at by default, read from configs without loading weights; None if unknown
    (single-file checkpoints, hub ids)."""
    if base in WORLD_BASES:
        from lorafuse.models.world import IMAGE_SIZE

        return IMAGE_SIZE, IMAGE_SIZE
    if base in ("sd15-tiny", "sdxl-tiny"):
        from lorafuse.models import tiny

        arch = base.removesuffix("-tiny")
        s = tiny.unet_config(arch)["sample_size"] * 2 ** (
            len(tiny.vae_config(arch)["block_out_channels"]) - 1
        )
        return s, s
    folder = Path(base)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    s = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return s, s


def base_limits(base: str) -> tuple[int | None, int | None]:
    """(timesteps the base was trained with, the multiple its image sides must be), read from configs without
    loading weights, so `sample`'s checks on steps, height and width run for every cell before the first one
    samples; None where a base does not say (single-file checkpoints, hub ids)."""
    if base in WORLD_BASES:
        from lorafuse.models import world

        return world.scheduler_config()["num_train_timesteps"], 2 ** (len(world.vae_config()["block_out_channels"]) - 1)
    if base in ("sd15-tiny", "sdxl-tiny"):
        from lorafuse.models import tiny

        arch = base.removesuffix("-tiny")
        factor = 2 ** (len(tiny.vae_config(arch)["block_out_channels"]) - 1)
        return tiny.scheduler_config(arch)["num_train_timesteps"], factor
    folder = Path(base)
    timesteps = factor = None
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        timesteps = int(json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"])
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        factor = 2 ** (len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
        factor *= 2 if (folder / "transformer").is_dir() else 1  # FLUX packs latents in 2x2 patches
    return timesteps, factor


def _check_base_limits(cfg: GridConfig, bases: list[str]) -> None:
    """Every steps value against every base's trained timesteps (diffusers' set_timesteps refuses more), and a
    set height/width against the base's VAE: refused now, not at the first cell that has them."""
    for base in bases:
        timesteps, factor = base_limits(base)
        too_many = [s for s in cfg.axes.steps or [] if timesteps is not None and s > timesteps]
        if too_many:
            raise ConfigError(f"axes.steps: {too_many[0]} steps for base {base}: give at most {timesteps}, the "
                              "timesteps it was trained with")  # fmt: skip
        for name in ("height", "width"):
            value = getattr(cfg, name)
            if value is not None and factor is not None and value % factor:
                raise ConfigError(f"{name} {value}: base {base} needs a multiple of {factor} (its VAE's scale)")


def _sizes(cfg: GridConfig, bases: list[str]) -> dict[str, tuple[int, int]]:
    if cfg.height is not None and cfg.width is not None:
        return {b: (cfg.height, cfg.width) for b in bases}
    if (cfg.height is None) != (cfg.width is None):
        raise ConfigError("give both height and width, or neither")
    sizes = {b: native_size(b) for b in bases}
    unknown = [b for b, s in sizes.items() if s is None]
    if unknown and len(bases) > 1:
        raise ConfigError(
            f"cannot tell the image size of {', '.join(unknown)} before loading it; set height and width"
        )
    known = {s for s in sizes.values() if s is not None}
    if len(known) > 1:
        listing = ", ".join(f"{b}: {s[1]}x{s[0]}" for b, s in sizes.items())
        raise ConfigError(
            f"the bases sample at different sizes ({listing}); set height and width for one grid"
        )
    if unknown:  # one base of unknown size: sample at its default, which we learn when it loads
        return {unknown[0]: (0, 0)}
    return {b: s for b, s in sizes.items() if s is not None}


def plan_grid(cfg: GridConfig) -> GridPlan:
    """Every grid cell (and, for cross-influence, each LoRA alone), after checking axes, files and options."""
    from lorafuse.fusion.schedulers import check_scheduler_name

    _check_mode(cfg)
    _check_numbers(cfg)
    values = _axis_values(cfg)
    _check_files(cfg, values["base"])
    _check_base_limits(cfg, values["base"])
    check_scheduler_name(cfg.scheduler)
    resolve_device(cfg.device)
    resolve_dtype(cfg.dtype)
    fusion = cfg.axes.style_checkpoint is not None
    if fusion:
        _check_methods(cfg, values)
    sizes = _sizes(cfg, values["base"])
    names = list(values)
    method_fields: dict[str, set[str]] = {}
    if fusion:
        from lorafuse.fusion.registry import get_method

        method_fields = {m: set(get_method(m).config_cls.__dataclass_fields__) for m in values["method"]}
    coords, cells, singles = [], [], {}
    for combo in itertools.product(*(values[n] for n in names)):
        c = dict(zip(names, combo, strict=True))
        content = str(c["checkpoint"]) if c["checkpoint"] is not None else None
        style = str(c["style_checkpoint"]) if c["style_checkpoint"] is not None else None
        method = c["method"] if fusion else None
        opts = tuple(sorted((k.removeprefix("option."), v) for k, v in c.items()
                            if k.startswith("option.") and k.removeprefix("option.") in method_fields.get(method, ())))  # fmt: skip
        common = dict(base=c["base"], steps=c["steps"], guidance=float(c["guidance"]), seed=c["seed"])
        cw = float(c["lora_weight"]) if content else 0.0
        sw = float(c["style_weight"]) if fusion else 0.0
        cell = Cell(content=content, style=style, content_weight=cw, style_weight=sw, method=method, options=opts,
                    **common)  # fmt: skip
        if fusion and cfg.metrics.cross_influence:
            singles[cell] = (
                Cell(content=content, style=None, content_weight=cw, style_weight=0.0, method=None, options=(), **common),
                Cell(content=None, style=style, content_weight=0.0, style_weight=sw, method=None, options=(), **common),
            )  # fmt: skip
        coords.append({k: (str(v) if isinstance(v, Path) else v) for k, v in c.items()})
        cells.append(cell)
    varying = [n for n in names if len(values[n]) > 1]
    return GridPlan(cfg=cfg, coords=coords, cells=cells, singles=singles, varying=varying, sizes=sizes)
