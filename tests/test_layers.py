"""Packages import only downward: every `lorafuse.X` import in src/, at module level or inside a function, goes
to a package on a lower layer (or stays inside its own package). The order is written once, here, and
docs/architecture.md explains it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorafuse"

# Bottom to top. A package may import the packages of the layers below it, never one above or beside it.
# The root `lorafuse/__init__.py` only holds `__version__` (its lazy `lorafuse.fuse` names no import).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "lorafuse"),  # the exception family; the version
    ("utils",),  # atomic writes, images, memory, optional extras
    ("config",),  # typed dataclasses <-> TOML
    ("families",),  # what differs between base-model families (SD1.5, SDXL, world, FLUX.1)
    ("world",),  # the procedural world: shapes, styles, datasets, the oracle
    ("models",),  # pipelines: tiny test models, the built-in world base model, loading by name or path
    ("lora",),  # the LoRA layer, files, injection, exact merges
    ("guidance",),  # CFG, asymmetric CFG, schedules
    ("train",),  # the LoRA trainer, and training on the world (LoRA recipes, base pretraining)
    ("fusion",),  # fusion methods, their registry and the one sampling loop
    ("eval",),  # metrics, grids, reports, method comparisons on the world
    ("backbone",),  # the rank-constrained backbone (CRAFT), trained and measured
    ("demo_report",),
    ("demo",),
    ("cli",),
    ("ui",),  # the web UI runs CLI command lines
    ("__main__",),  # the `lorafuse` command: the CLI plus `lorafuse ui`
)
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# Below, yet never imported: the LoRA layer is the same for every base, built-in world or not.
APART = {("lora", "world")}


def package_of(module: str) -> str:
    """'lorafuse.fusion.craft.host' -> 'fusion'; 'lorafuse' -> 'lorafuse'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute lorafuse import in the file, however deeply nested."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lorafuse"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; write it absolute"
            if node.module and node.module.split(".")[0] == "lorafuse":
                found.append((node.lineno, node.module))
    return found


def _package(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "lorafuse"


def package_edges(src: Path = SRC) -> dict[tuple[str, str], int]:
    """(importer, imported) package -> number of import statements, for docs/architecture.md's picture."""
    edges: dict[tuple[str, str], int] = {}
    for path in sorted(src.rglob("*.py")):
        own = _package(path.relative_to(src))
        for _, module in imports(path):
            if package_of(module) != own:
                edges[own, package_of(module)] = edges.get((own, package_of(module)), 0) + 1
    return edges


def upward_imports(src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        own = _package(rel)
        if own not in LEVEL:
            bad.append(f"{rel}: package {own!r} has no layer; add it to LAYERS in tests/test_layers.py")
            continue
        for line, module in imports(path):
            target = package_of(module)
            if target == own:
                continue
            if target not in LEVEL:
                bad.append(f"{rel}:{line}: imports {module}, whose package has no layer")
            elif LEVEL[target] >= LEVEL[own]:
                bad.append(f"{rel}:{line}: {own} imports {module} ({target} is not below {own})")
            elif (own, target) in APART:
                bad.append(f"{rel}:{line}: {own} imports {module} ({own} must know nothing of {target})")
    return bad


def test_packages_import_only_downward() -> None:
    bad = upward_imports()
    assert not bad, "imports against the layer order (docs/architecture.md):\n" + "\n".join(bad)


def test_the_check_sees_imports_inside_functions(tmp_path) -> None:
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "inject.py").write_text(
        "import lorafuse.errors\n\ndef f():\n    if True:\n        from lorafuse.fusion import sampling\n"
        "        import lorafuse.world.catalog\n"
    )
    (tmp_path / "lora" / "ok.py").write_text("from lorafuse.lora import inject\nfrom lorafuse.config import x\n")
    assert upward_imports(tmp_path) == [
        "lora/inject.py:5: lora imports lorafuse.fusion (fusion is not below lora)",
        "lora/inject.py:6: lora imports lorafuse.world.catalog (lora must know nothing of world)",
    ]


@pytest.mark.parametrize("layer", LAYERS)
def test_each_package_named_once(layer) -> None:
    assert all(sum(name in other for other in LAYERS) == 1 for name in layer)


if __name__ == "__main__":  # python tests/test_layers.py: the package graph, top layer first
    edges = package_edges()
    for layer in reversed(LAYERS):
        for name in layer:
            out = sorted((LEVEL.get(b, -1), b, n) for (a, b), n in edges.items() if a == name)
            print(f"{name:12s} -> " + ", ".join(f"{b} ({n})" for _, b, n in reversed(out)))
    print(f"{len(edges)} edges between {len({x for e in edges for x in e})} packages, "
          f"{len(upward_imports())} against the order")
