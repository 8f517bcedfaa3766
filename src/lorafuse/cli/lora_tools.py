"""`lorafuse inspect | merge | resize | convert`: LoRA file tools, each a thin layer over the lora API.

lorafuse inspect FILE [--base PATH|world|sd15-tiny|sdxl-tiny]
lorafuse merge A B --weights 1 0.5 --out OUT [--mode exact|svd|kohya_legacy --rank R]
lorafuse resize FILE --rank R --out OUT
lorafuse convert FILE --to kohya|diffusers --arch sd15|sdxl|world|flux --out OUT
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections import Counter
from pathlib import Path

from lorafuse.errors import LoraFormatError, UserInputError
from lorafuse.families import FAMILIES, family_of, family_of_lora_keys, family_of_metadata
from lorafuse.lora.archs import REFERENCE_ARCHS
from lorafuse.lora.formats import WRITE_FORMATS
from lorafuse.lora.io import check_lora_file, estimated_size, load_lora, save_lora
from lorafuse.lora.keys import ARCHS
from lorafuse.lora.merge import MERGE_METADATA_KEY, MERGE_MODES, merge_loras
from lorafuse.lora.resize import factorize, resize_lora
from lorafuse.lora.state import LoraState
from lorafuse.lora.validate import fits, validate_lora
from lorafuse.models.load import TINY_BASES, tiny_base
from lorafuse.utils.atomic import check_output

BUILTIN_BASES = ("world", *TINY_BASES)
_LABELS = {name: f.label for name, f in FAMILIES.items()}
_MAX_META_VALUE = 100  # ss_tag_frequency and friends can be kilobytes of JSON


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="show a LoRA file's format, ranks, metadata and coverage")
    p.add_argument("file", type=Path)
    p.add_argument(
        "--base", metavar="PATH|world|" + "|".join(TINY_BASES), help="check key coverage against this base"
    )
    _add_pickle(p)
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser("merge", help="merge LoRAs exactly: ΔW = Σ w_i ΔW_i (rank-concatenated)")
    p.add_argument("files", type=Path, nargs="+", metavar="FILE")
    p.add_argument("--weights", type=float, nargs="+", metavar="W", help="one per file (default: all 1)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--mode",
        choices=MERGE_MODES,
        default="exact",
        help="exact (default), svd (needs --rank), kohya_legacy",
    )
    p.add_argument("--rank", type=int, help="target rank of --mode svd")
    p.add_argument(
        "--conv-rank", type=int, help="target rank of 3x3 conv modules in --mode svd (default --rank)"
    )
    _add_output(p)
    p.set_defaults(func=cmd_merge)

    p = subparsers.add_parser("resize", help="reduce a LoRA to a lower rank by truncated SVD")
    p.add_argument("file", type=Path)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--conv-rank", type=int, help="rank of 3x3 conv modules (default --rank)")
    p.add_argument("--out", type=Path, required=True)
    _add_output(p)
    p.set_defaults(func=cmd_resize)

    p = subparsers.add_parser("convert", help="rewrite a LoRA file as kohya or diffusers/PEFT format")
    p.add_argument("file", type=Path)
    p.add_argument("--to", choices=WRITE_FORMATS, required=True)
    p.add_argument("--arch", choices=ARCHS, required=True)
    p.add_argument("--out", type=Path, required=True)
    _add_pickle(p)
    p.set_defaults(func=cmd_convert)


def _add_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-pickle", action="store_true", help="also read .ckpt/.pt/.bin (torch.load weights_only)"
    )


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=WRITE_FORMATS, default="kohya", help="output format (default kohya)")
    p.add_argument("--arch", choices=ARCHS, help="architecture of the output (default: read from the input)")
    _add_pickle(p)


# --- architecture and base ----------------------------------------------------------------------------


def _reference_fit(state: LoraState, arch: str) -> tuple[int, int]:
    """(keys whose module name exists, keys that also fit its shape) in the real-size `arch`."""
    from lorafuse.lora.targets import reference_modules

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # partial coverage is what is being measured here
        try:
            report = validate_lora(state, reference_modules(arch), arch=arch, check_shapes=False)
        except LoraFormatError:
            return 0, 0
    shapes = sum(fits(state.modules[k], ref.shape) for k, ref in report.targets.items())
    return report.matched, shapes


def arch_by_shapes(state: LoraState) -> str | None:
    """The reference architecture at least half of the modules fit by name and shape, or None (e.g. a LoRA for a
    scaled-down test model, or for the built-in world model)."""
    fit = {arch: _reference_fit(state, arch)[1] for arch in REFERENCE_ARCHS}
    best = max(fit, key=lambda a: fit[a])
    return best if fit[best] * 2 >= len(state.modules) > 0 else None


def claimed_arch(state: LoraState) -> tuple[str, str] | None:
    """(architecture, the metadata entry that says so), or None when the metadata names none."""
    family = family_of_metadata(state.metadata)
    if family is None:
        return None
    key = "modelspec.architecture" if state.metadata.get("modelspec.architecture") else "ss_base_model_version"
    return family.name, f"metadata {key} = {state.metadata[key]!r}"


def check_claim(state: LoraState, arch: str, claim: str) -> None:
    """Tensors over claims: an architecture named by metadata or --arch that the shapes contradict is an error
    naming both, because writing keys for the claimed one gives a file that loads nowhere."""
    by_shapes = arch_by_shapes(state)
    if by_shapes is None or by_shapes == arch:
        return
    n = len(state.modules)
    fit_claim = _reference_fit(state, arch)[1] if arch in REFERENCE_ARCHS else 0
    fit_shapes = _reference_fit(state, by_shapes)[1]
    raise UserInputError(
        f"{state.source_path}: {claim} says {_LABELS[arch]}, but the tensors say {_LABELS[by_shapes]}: "
        f"{fit_shapes} of {n} modules have {_LABELS[by_shapes]} shapes, {fit_claim} have {_LABELS[arch]} shapes. "
        f"Pass --arch {by_shapes} if the tensors are right; if the metadata is right, the file is damaged."
    )


def guess_arch(state: LoraState) -> str | None:
    """The architecture a LoRA was made for: its metadata, checked against its tensors' shapes; else module
    names only one family has; else shapes; None if unclear."""
    claim = claimed_arch(state)
    if claim is not None:
        check_claim(state, *claim)
        return claim[0]
    family = family_of_lora_keys(list(state.modules))
    if family is not None:
        return family.name
    return arch_by_shapes(state)


def _output_arch(args: argparse.Namespace, states: list[LoraState]) -> str:
    if args.arch:
        for state in states:
            check_claim(state, args.arch, f"--arch {args.arch}")
            claim = claimed_arch(state)
            if claim is not None:
                check_claim(state, *claim)
        return args.arch
    guesses = {str(s.source_path): guess_arch(s) for s in states}
    unknown = [p for p, a in guesses.items() if a is None]
    if unknown:
        raise UserInputError(
            f"{unknown[0]}: cannot tell which base model this LoRA is for; pass --arch sd15|sdxl|world|flux"
        )
    if len(set(guesses.values())) > 1:
        seen = ", ".join(f"{p}: {_LABELS[a]}" for p, a in guesses.items())
        raise UserInputError(f"the LoRAs are for different base models ({seen}); they cannot be merged")
    return next(iter(guesses.values()))  # type: ignore[return-value]


def _meta_components(path: Path) -> tuple[dict, str]:
    """A diffusers pipeline folder's denoiser and text encoders built from their configs on the meta device:
    module names and shapes without reading gigabytes of weights."""
    import torch
    import transformers
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    index = json.loads((path / "model_index.json").read_text())
    comps = {}
    with torch.device("meta"):
        if "unet" in index:
            comps["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path / "unet"))
        if index.get("transformer", [None, None])[1] == "FluxTransformer2DModel":
            config = FluxTransformer2DModel.load_config(path / "transformer")
            comps["transformer"] = FluxTransformer2DModel.from_config(config)
        for name in ("text_encoder", "text_encoder_2"):
            entry = index.get(name)
            if isinstance(entry, list) and entry[1]:
                cls = getattr(transformers, entry[1])
                comps[name] = cls(cls.config_class.from_pretrained(path / name))
    if "unet" not in comps and "transformer" not in comps:
        raise UserInputError(f"{path}: the pipeline has neither a unet nor a FLUX.1 transformer")
    return comps, family_of(comps).name


def load_base(spec: str) -> tuple[object, str, bool]:
    """(base, arch, check_shapes) for --base: a built-in name, a diffusers pipeline folder, or a checkpoint file
    (or a TOML naming one) checked against its family's released shapes."""
    if spec == "world":
        from lorafuse.models.world import load_world_pipeline

        return load_world_pipeline(), "world", True
    if spec in TINY_BASES:
        pipe = tiny_base(spec)
        return pipe, family_of(pipe).name, False  # tiny widths: a real LoRA can only match by name
    path = Path(spec)
    if path.is_file():  # a checkpoint, or a TOML naming FLUX.1's separate files: its family's released shapes
        from lorafuse.models.meta import meta_components

        comps = meta_components(spec)
        return comps, family_of(comps).name, True
    if not (path / "model_index.json").is_file():
        raise UserInputError(
            f"--base {spec}: not a diffusers pipeline folder (no model_index.json), a checkpoint file nor one of "
            f"{', '.join(BUILTIN_BASES)}"
        )
    comps, arch = _meta_components(path)
    return comps, arch, True


# --- commands -----------------------------------------------------------------------------------------


def _histogram(values: list) -> str:
    def show(v: object) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{show(v)} x{n}" for v, n in sorted(Counter(values).items()))


def _tensor_count(path: Path) -> str:
    if path.suffix.lower() != ".safetensors":
        return ""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f" ({len(list(f.keys()))} tensors)"


def cmd_inspect(args: argparse.Namespace) -> int:
    base = arch = None
    check_shapes = True
    if args.base:
        check_lora_file(args.file, allow_pickle=args.allow_pickle)  # a broken file fails before the base loads
        base, arch, check_shapes = load_base(args.base)
    state = load_lora(args.file, allow_pickle=args.allow_pickle, base=base)
    mods = state.modules
    low = [m for m in mods.values() if m.down is not None]
    conv = [m for m in low if math.prod(m.down.shape[2:]) > 1]
    by_comp = Counter(k.split(".", 1)[0] for k in mods)
    dtypes = Counter(
        str((m.down if m.down is not None else m.delta).dtype).removeprefix("torch.") for m in mods.values()
    )
    print(f"{args.file}")
    print(f"  format: {state.source_format}{_tensor_count(args.file)}")
    print(
        f"  modules: {len(mods)} ({', '.join(f'{c} {n}' for c, n in sorted(by_comp.items()))}); "
        f"linear {len(low) - len(conv)}, conv {len(conv)}, dense LoHa/LoKr {len(mods) - len(low)}"
    )
    print(f"  ranks: {_histogram([m.rank for m in low]) or '-'}")
    print(f"  alphas: {_histogram([float(m.alpha if m.alpha is not None else m.rank) for m in low]) or '-'}")
    print(f"  dtype: {_histogram(list(dtypes.elements()))}")
    print(f"  metadata: {len(state.metadata)} entries")
    for key in sorted(state.metadata):
        value = state.metadata[key].replace("\n", " ")
        cut = value[:_MAX_META_VALUE] + ("…" if len(value) > _MAX_META_VALUE else "")
        print(f"    {key} = {cut}")
    if base is None:
        fits_text = []
        for ref_arch in REFERENCE_ARCHS:
            names, shapes = _reference_fit(state, ref_arch)
            fits_text.append(f"{_LABELS[ref_arch]} {names}/{len(mods)} names, {shapes}/{len(mods)} shapes")
        print(f"  fits: {'; '.join(fits_text)} (use --base to check a specific model)")
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # printed below from report.warnings
        report = validate_lora(state, base, arch=arch, check_shapes=check_shapes)
    how = "" if check_shapes else " (names only: the tiny base has smaller widths)"
    print(
        f"  coverage against {args.base}{how}: {report.matched} of {report.total} modules ({report.coverage:.1%})"
    )
    for message in report.warnings:
        print(f"  warning: {message}")
    return 0


def _save(state: LoraState, args: argparse.Namespace, arch: str, fmt: str) -> None:
    # our own records (merge mode, weights, svd error) travel as explicit metadata; ss_* are derived on save
    extra = {k: v for k, v in state.metadata.items() if k.startswith("lorafuse.")}
    save_lora(state, args.out, format=fmt, arch=arch, metadata=extra)


def cmd_merge(args: argparse.Namespace) -> int:
    weights = args.weights if args.weights is not None else [1.0] * len(args.files)
    if len(weights) != len(args.files):
        raise UserInputError(
            f"{len(args.files)} files but {len(weights)} --weights; give one weight per file"
        )
    if args.mode != "svd" and (args.rank is not None or args.conv_rank is not None):
        raise UserInputError(f"--rank only applies to --mode svd (an {args.mode} merge keeps every rank)")
    states = [load_lora(f, allow_pickle=args.allow_pickle) for f in args.files]
    arch = _output_arch(args, states)
    check_output(args.out, estimate=sum(estimated_size(s) for s in states) * 2)
    merged = merge_loras(states, weights, mode=args.mode, rank=args.rank, conv_rank=args.conv_rank)
    _save(merged, args, arch, args.format)
    ranks = _histogram([m.rank for m in merged.modules.values()])
    print(
        f"{args.out}: {len(merged.modules)} modules, {args.mode} merge, ranks {ranks}, {_LABELS[arch]} {args.format}"
    )
    record = json.loads(merged.metadata[MERGE_METADATA_KEY])
    if "svd_rel_error" in record:
        print(f"  svd relative Frobenius error of the merged ΔW: {record['svd_rel_error']:.4g}")
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    state = load_lora(args.file, allow_pickle=args.allow_pickle)
    arch = _output_arch(args, [state])
    check_output(args.out, estimate=estimated_size(state))
    resized, report = resize_lora(state, args.rank, conv_rank=args.conv_rank)
    _save(resized, args, arch, args.format)
    print(f"{args.out}: {report.summary()}")
    for key, m in report.worst(3):
        print(f"  {key}: rank {m.rank_before} -> {m.rank_after}, error {m.rel_error:.4g}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    state = load_lora(args.file, allow_pickle=args.allow_pickle)
    _output_arch(args, [state])  # --arch against the tensors (and the metadata)
    check_output(args.out, estimate=estimated_size(state) * 2)
    if args.arch in REFERENCE_ARCHS:
        from lorafuse.lora.targets import reference_modules

        # names only: the right architecture at another width (our tiny test models) is still convertible
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # partial coverage is an error here, raised below
            report = validate_lora(state, reference_modules(args.arch), arch=args.arch, check_shapes=False)
        if report.unmatched:
            raise UserInputError(
                f"{report.warnings[0]} Converting would write keys no {_LABELS[args.arch]} tool applies; "
                "pass the --arch this LoRA was made for."
            )
    dense = [k for k, m in state.modules.items() if m.down is None]
    for key in dense:
        state.modules[key] = factorize(state.modules[key].delta)
    _save(state, args, args.arch, args.to)
    print(f"{args.out}: {len(state.modules)} modules, {args.to} format for {_LABELS[args.arch]}")
    if dense:
        ranks = _histogram([state.modules[k].rank for k in dense])
        print(
            f"  {len(dense)} dense LoHa/LoKr modules stored as exact-rank SVD factorisations (ranks {ranks})"
        )
    return 0
