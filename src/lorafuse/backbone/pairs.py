"""Contrastive content–style pairs for the backbone (CRAFT-LoRA §3.3.2, App. A.1; docs/algorithms.md §7.2).

N_c content references x N_s style references (10 x 10 -> 100 pairs). Pair (i, j) has two images:
    content-fixed  x_c^{ij}: content i kept (low frequencies), style j varies it (high frequencies)
    style-fixed    x_s^{ij}: style j kept (high frequencies), content i varies it (low frequencies)

Generated mode (any base model): two denoising branches a, b share one latent; after every step
    z_{t−1} = D⁻¹( M_low ⊙ D(z^a_{t−1}) + M_high ⊙ D(z^b_{t−1}) )
with D the orthonormal 2-D DCT-II over each latent channel's (h, w), `M_low` a Gaussian low-pass
exp(−(f_u² + f_v²) / (2 σ²)) with f = k / n the normalised DCT frequency and σ = 0.35, `M_high = 1 − M_low`.
    content-fixed: a = content prompt c_i,               b = c_i + style modifier s_j
    style-fixed:   a = content modifier c_i + style s_j,  b = style prompt s_j
Both are captioned "c_i, s_j" (each shows content i in style j; they differ in which factor is held exact).
Initial noise is seeded by i for content-fixed images and by j for style-fixed ones, so a row of the grid keeps
its content layout and a column its style texture (our choice; the paper does not say).

Render mode (built-in world only): the same grid from the generator with known factors, exactly: content-fixed
images take pose and background from a stream seeded by i, style-fixed ones from a stream seeded by j.

Notation map: `cutoff` is σ; `mask` is M_low; `dct2` / `idct2` are D / D⁻¹.
Folder written by `write_pairs`: pairs.json (manifest), content/IJ.png, style/IJ.png, contact_sheet.png.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lorafuse.errors import UserInputError
from lorafuse.utils.images import to_uint8

MANIFEST = "pairs.json"
CUTOFF = 0.35
RENDER_SIDE = 64  # pixels of a rendered pair's images (the world base's size)
_MANIFEST_PER_PAIR = 1 << 10  # a pair's entry in pairs.json: its indices, image paths and caption


# --- frequency split --------------------------------------------------------------------------------------


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """C (n x n), the orthonormal DCT-II: X = C x, x = Cᵀ X (scipy.fft.dct(x, norm="ortho"))."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * m + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D DCT-II over the last two dims, orthonormal (computed in float64, returned in x's dtype)."""
    ch, cw = dct_matrix(x.shape[-2]).to(x.device), dct_matrix(x.shape[-1]).to(x.device)
    return (ch @ x.double() @ cw.T).to(x.dtype)


def idct2(x: torch.Tensor) -> torch.Tensor:
    ch, cw = dct_matrix(x.shape[-2]).to(x.device), dct_matrix(x.shape[-1]).to(x.device)
    return (ch.T @ x.double() @ cw).to(x.dtype)


def gaussian_lowpass(h: int, w: int, cutoff: float = CUTOFF) -> torch.Tensor:
    """M_low (h, w) in (0, 1]: 1 at DC, falling with the normalised frequency radius; e^{-1/2} at radius σ."""
    if not 0 < cutoff:
        raise UserInputError(f"the low-pass cutoff must be > 0, got {cutoff}")
    fu = torch.arange(h, dtype=torch.float64)[:, None] / h
    fv = torch.arange(w, dtype=torch.float64)[None, :] / w
    return torch.exp(-(fu**2 + fv**2) / (2 * cutoff**2))


def frequency_mix(z_low: torch.Tensor, z_high: torch.Tensor, cutoff: float = CUTOFF) -> torch.Tensor:
    """D⁻¹(M_low ⊙ D(z_low) + (1 − M_low) ⊙ D(z_high)) over (…, h, w)."""
    mask = gaussian_lowpass(z_low.shape[-2], z_low.shape[-1], cutoff).to(z_low.device)
    mixed = mask * dct2(z_low).double() + (1 - mask) * dct2(z_high).double()
    return idct2(mixed).to(z_low.dtype)


# --- generation ---------------------------------------------------------------------------------------------


@torch.no_grad()
def mixed_sample(
    pipe: Any, prompts_low: Sequence[str], prompts_high: Sequence[str], seeds: Sequence[int], *,
    steps: int = 25, guidance: float = 7.5, cutoff: float = CUTOFF, scheduler: str = "ddim",
) -> np.ndarray:  # fmt: skip
    """Images (N, H, W, 3) uint8: image k denoises branches a = prompts_low[k], b = prompts_high[k] from noise
    seeded seeds[k], mixing after every step (module docstring). CFG per branch; one forward of 4N rows."""
    from lorafuse.fusion.prompts import encode_prompts
    from lorafuse.fusion.sampling import decode_latents
    from lorafuse.fusion.schedulers import make_scheduler
    from lorafuse.guidance.base import GuidanceCond, UNetDenoiser
    from lorafuse.guidance.cfg import ClassifierFreeGuidance

    n, unet = len(prompts_low), pipe.unet
    if not n == len(prompts_high) == len(seeds):
        raise UserInputError("mixed_sample needs as many high-branch prompts and seeds as low-branch prompts")
    factor = pipe.vae_scale_factor
    size = unet.config.sample_size
    conds = encode_prompts(pipe, [*prompts_low, *prompts_high], None, num_images=1, clip_skip=0,
                           height=size * factor, width=size * factor)  # fmt: skip
    cond = GuidanceCond(conds.cond, conds.uncond)  # rows: N low-branch prompts, then N high-branch ones
    sched_a, sched_b = make_scheduler(pipe, scheduler), make_scheduler(pipe, scheduler)
    for s in (sched_a, sched_b):
        s.set_timesteps(steps, device=unet.device)
    shape = (1, unet.config.in_channels, size, size)
    z = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(
        unet.dtype
    )
    z = z * sched_a.init_noise_sigma
    cfg, model_fn = ClassifierFreeGuidance(guidance), UNetDenoiser(unet)
    for i, t in enumerate(sched_a.timesteps):
        x = torch.cat(
            [sched_a.scale_model_input(z, t), sched_b.scale_model_input(z, t)]
        )  # (N) -> (2N) branches
        eps_a, eps_b = cfg(model_fn, x, t, i, len(sched_a.timesteps), cond).chunk(2)
        z_a = sched_a.step(eps_a, t, z, return_dict=False)[0]
        z_b = sched_b.step(eps_b, t, z, return_dict=False)[0]
        z = frequency_mix(z_a, z_b, cutoff)
    images = decode_latents(pipe, z, "np")
    return to_uint8(images)


@dataclass(frozen=True)
class Pair:
    i: int
    j: int
    content_image: str  # relative to the dataset folder
    style_image: str
    caption: str


def _join(content: str, style: str) -> str:
    return f"{content.rstrip(' ,')}, {style.lstrip(' ,')}"


def check_generate_args(seed: int, steps: int) -> None:
    """Steps >= 1 and seeds torch can take: the pairs draw noise seeded seed·1000 + k, k < 1000."""
    from lorafuse.fusion.sampling import SEED_RANGE, check_counts

    check_counts(1, steps)
    if not SEED_RANGE[0] <= seed * 1000 <= SEED_RANGE[1] - 1000:
        raise UserInputError(
            f"seed {seed}: the pairs use seeds seed·1000 + k, which must lie in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]; "
            "give a smaller seed"
        )


def generate_pairs(
    pipe: Any, contents: Sequence[str], styles: Sequence[str], *, seed: int = 0, steps: int = 25,
    guidance: float = 7.5, cutoff: float = CUTOFF, scheduler: str = "ddim", batch: int = 10,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(content-fixed, style-fixed) images, each (N_c, N_s, H, W, 3) uint8, by two-branch frequency mixing."""
    check_generate_args(seed, steps)
    jobs = []  # (kind, i, j, low prompt, high prompt, seed)
    for i, c in enumerate(contents):
        for j, s in enumerate(styles):
            jobs.append(("c", i, j, c, _join(c, s), seed * 1000 + i))
            jobs.append(("s", i, j, _join(c, s), s, seed * 1000 + 500 + j))
    out = {k: [[None] * len(styles) for _ in contents] for k in "cs"}
    for k in range(0, len(jobs), batch):
        chunk = jobs[k : k + batch]
        images = mixed_sample(pipe, [jb[3] for jb in chunk], [jb[4] for jb in chunk], [jb[5] for jb in chunk],
                              steps=steps, guidance=guidance, cutoff=cutoff, scheduler=scheduler)  # fmt: skip
        for (kind, i, j, *_), image in zip(chunk, images, strict=True):
            out[kind][i][j] = image
    return np.array(out["c"]), np.array(out["s"])


def world_references(n_contents: int = 10, n_styles: int = 10) -> tuple[list[str], list[str]]:
    """Default world references: individual 0 of the first n classes (seen by the base), the first n seen styles."""
    from lorafuse.world.catalog import CLASS_NAMES, SEEN_STYLES

    if n_contents > len(CLASS_NAMES) or n_styles > len(SEEN_STYLES):
        raise UserInputError(f"the world has {len(CLASS_NAMES)} classes and {len(SEEN_STYLES)} seen styles")
    return [f"{c}_00" for c in CLASS_NAMES[:n_contents]], list(SEEN_STYLES[:n_styles])


def world_prompts(individuals: Sequence[str], styles: Sequence[str]) -> tuple[list[str], list[str]]:
    """Content prompts "a photo of a red teapot" and style prompts "in watercolor style" in world words."""
    from lorafuse.world.catalog import parse_individual, style_phrase

    contents = []
    for name in individuals:
        ind = parse_individual(name)
        contents.append(f"a photo of a {ind.colour_names[0]} {ind.cls}")
    return contents, [f"in {style_phrase(s)} style" for s in styles]


def render_pairs(individuals: Sequence[str], styles: Sequence[str], seed: int = 0, size: int = RENDER_SIDE
                 ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(content-fixed, style-fixed) exact world renders, each (N_c, N_s, size, size, 3) uint8."""
    from lorafuse.world.catalog import check_style, parse_individual
    from lorafuse.world.render import render

    inds = [parse_individual(n) for n in individuals]
    styles = [check_style(s) for s in styles]
    content = [
        [render(ind, s, np.random.default_rng([seed, 0, i]), size) for s in styles]
        for i, ind in enumerate(inds)
    ]
    style = [
        [render(ind, s, np.random.default_rng([seed, 1, j]), size) for j, s in enumerate(styles)]
        for ind in inds
    ]
    return np.array(content), np.array(style)


# --- the dataset folder -------------------------------------------------------------------------------------


def write_pairs(
    folder: str | Path, content_fixed: np.ndarray, style_fixed: np.ndarray, captions: Sequence[Sequence[str]],
    row_names: Sequence[str], col_names: Sequence[str], settings: dict[str, Any],
) -> Path:  # fmt: skip
    """Write images, pairs.json and contact_sheet.png (rows: content i, content-fixed then style-fixed)."""
    from lorafuse.utils.atomic import atomic_folder

    final = _check_pairs_folder(Path(folder))
    with atomic_folder(final) as folder:  # a previous pairs set is replaced whole; a failed write keeps it
        _write_pairs_into(folder, content_fixed, style_fixed, captions, row_names, col_names, settings)
    return final


def estimate_pairs_bytes(rows: Sequence[str], cols: Sequence[str], side: int, caption: int) -> int:
    """An upper bound of a pairs folder of contents `rows` x styles `cols` at `side` pixels, captions of at most
    `caption` characters: two PNGs and a manifest entry per pair, and the contact sheet."""
    from lorafuse.utils.atomic import png_bytes
    from lorafuse.utils.images import grid_size

    pairs = len(rows) * len(cols)
    captions = pairs * 12 * caption  # json.dumps writes a non-ASCII character as up to 12 bytes (\ud83d\ude00)
    labels = [f"{name} c-fix" for name in rows]
    sheet = grid_size(2 * len(rows), len(cols), (side, side), labels, 1 if side >= 128 else 2, title="t")
    return pairs * (2 * png_bytes(side, side) + _MANIFEST_PER_PAIR) + captions + png_bytes(*sheet)


def _check_pairs_folder(folder: Path, estimate: int = 0) -> Path:
    """A new, empty or previous pairs folder (replaced whole); anything else is refused, not overwritten."""
    from lorafuse.utils.atomic import check_output

    folder = check_output(folder, kind="folder", what="pairs dataset folder", estimate=estimate)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
        raise UserInputError(f"{folder}: exists, is not empty and holds no {MANIFEST} (not a pairs dataset); "
                             "choose a new folder")  # fmt: skip
    return folder


def _write_pairs_into(
    folder: Path, content_fixed: np.ndarray, style_fixed: np.ndarray, captions: Sequence[Sequence[str]],
    row_names: Sequence[str], col_names: Sequence[str], settings: dict[str, Any],
) -> None:  # fmt: skip
    from lorafuse.utils.atomic import atomic_write_text
    from lorafuse.utils.images import labelled_grid, save_image

    for sub in ("content", "style"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(content_fixed.shape[0]):
        for j in range(content_fixed.shape[1]):
            name = f"{i:02d}_{j:02d}.png"
            save_image(Image.fromarray(content_fixed[i, j]), folder / "content" / name)
            save_image(Image.fromarray(style_fixed[i, j]), folder / "style" / name)
            pairs.append(Pair(i, j, f"content/{name}", f"style/{name}", captions[i][j]))
    manifest = {"version": 1, "contents": list(row_names), "styles": list(col_names), "settings": settings,
                "pairs": [asdict(p) for p in pairs]}  # fmt: skip
    # written atomically after every image: a killed run leaves no manifest that names half-written images
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    rows, labels = [], []
    for i, name in enumerate(row_names):
        rows += [list(content_fixed[i]), list(style_fixed[i])]
        labels += [f"{name} c-fix", f"{name} s-fix"]
    scale = 1 if content_fixed.shape[2] >= 128 else 2
    sheet = labelled_grid(
        rows, labels, list(col_names), scale=scale, title="content-fixed / style-fixed pairs"
    )
    save_image(sheet, folder / "contact_sheet.png")


def read_pairs(folder: str | Path) -> list[Pair]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserInputError(
            f"{folder}: no {MANIFEST}; write a pairs dataset with `lorafuse craft pairs` first"
        )
    pairs = [Pair(**p) for p in json.loads(path.read_text())["pairs"]]
    for p in pairs:
        for image in (p.content_image, p.style_image):
            if not (folder / image).is_file():
                raise UserInputError(f"{path}: pair ({p.i}, {p.j}) names {image}, which does not exist")
    if not pairs:
        raise UserInputError(f"{path}: the dataset holds no pairs")
    return pairs


def _pairs_estimate(mode: str, base: Any, contents: Sequence[str] | None, styles: Sequence[str] | None) -> int:
    """The disk estimate before any image is made or a base loads: rendered pairs are named by individual and
    style and captioned in world words; generated ones are named by their prompts (the world references' when
    none are given) and made at the base's size."""
    names = world_references()
    if mode == "render":
        names = (list(contents or names[0]), list(styles or names[1]))
        prompts, side = world_prompts(*names), RENDER_SIDE
    else:
        world = world_prompts(*names)
        names = prompts = (list(contents or world[0]), list(styles or world[1]))
        if isinstance(base, str | Path):
            from lorafuse.models.meta import sample_side

            side = sample_side(str(base))
        else:
            from lorafuse.families import family_of

            side = family_of(base).sample_size(base)
    caption = max(map(len, prompts[0]), default=0) + max(map(len, prompts[1]), default=0) + 8
    return estimate_pairs_bytes(*names, side, caption)


def build_pairs_dataset(
    folder: str | Path, *, mode: str = "render", base: Any = "world", contents: Sequence[str] | None = None,
    styles: Sequence[str] | None = None, seed: int = 0, steps: int = 25, guidance: float = 7.5,
    cutoff: float = CUTOFF, scheduler: str = "ddim", progress: bool = True,
) -> Path:  # fmt: skip
    """The one call behind `lorafuse craft pairs`: references -> images -> dataset folder with a contact sheet.

    mode "render" (world only): contents are individual names ("teapot_00"), styles world style names; default
    the first 10 classes' individual 0 and the 10 seen styles. mode "generate": contents / styles are prompts
    ("a photo of a red car", "in the style of Van Gogh"); on the world base they default to the world references'
    prompts. `base` is a pipeline or a name/folder for `models.load.load_base_pipeline`.
    """
    if mode not in ("render", "generate"):
        raise UserInputError(
            f"unknown pairs mode {mode!r}; choose render (world, exact) or generate (any base)"
        )
    # before any image is rendered or a base loads
    _check_pairs_folder(Path(folder), _pairs_estimate(mode, base, contents, styles))
    settings: dict[str, Any] = {"mode": mode, "seed": seed}
    if mode == "render":
        default_c, default_s = world_references()
        names_c, names_s = list(contents or default_c), list(styles or default_s)
        content_fixed, style_fixed = render_pairs(names_c, names_s, seed)
        prompts_c, prompts_s = world_prompts(names_c, names_s)
    else:
        check_generate_args(seed, steps)  # before the base loads
        if isinstance(base, str | Path):
            from lorafuse.models.load import load_base_pipeline

            settings["base"] = str(base)
            base = load_base_pipeline(str(base))
        if contents is None or styles is None:
            from lorafuse.lora.inject import pipeline_arch

            if pipeline_arch(base) != "world":
                raise UserInputError("generate mode on a non-world base needs content and style prompts")
            prompts_c, prompts_s = world_prompts(*world_references())
        prompts_c = list(contents) if contents is not None else prompts_c
        prompts_s = list(styles) if styles is not None else prompts_s
        names_c, names_s = prompts_c, prompts_s
        settings.update(steps=steps, guidance=guidance, cutoff=cutoff, scheduler=scheduler)
        content_fixed, style_fixed = generate_pairs(base, prompts_c, prompts_s, seed=seed, steps=steps,
                                                    guidance=guidance, cutoff=cutoff, scheduler=scheduler)  # fmt: skip
    captions = [[_join(c, s) for s in prompts_s] for c in prompts_c]
    return write_pairs(folder, content_fixed, style_fixed, captions, names_c, names_s, settings)
