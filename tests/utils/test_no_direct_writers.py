"""Every file lorafuse writes goes through `lorafuse.utils.atomic`: a source scan finds the writers that bypass it.

`safetensors.torch.save_file` writes through its own `.tmpXXXXXX` file (a kill leaves it behind, under a name no
sweep claims, and it is renamed over ours with mode 0600), so it is never called outside utils/atomic.
`torch.save`, diffusers' `save_pretrained`, `Path.write_text` / `write_bytes` and PIL's `Image....save` write in
place; they are allowed only inside a `with atomic_path(...)` / `with atomic_folder(...)` block, whose temporary
they write into (elsewhere: `atomic_write_text`, `save_image`, `atomic_save_safetensors`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "lorafuse"
ATOMIC = SRC / "utils" / "atomic.py"
NEVER = {"save_file"}
ONLY_IN_ATOMIC_BLOCK = {"save", "save_pretrained", "write_text", "write_bytes"}
ATOMIC_BLOCKS = {"atomic_path", "atomic_folder"}


def _call_name(node: ast.Call) -> tuple[str, str]:
    """(owner, name) of a call: ("torch", "save") for torch.save(...), ("", "save_file") for save_file(...)."""
    f = node.func
    if isinstance(f, ast.Attribute):
        owner = f.value.id if isinstance(f.value, ast.Name) else ""
        return owner, f.attr
    return "", f.id if isinstance(f, ast.Name) else ""


def _in_atomic_block(parents: list[ast.AST]) -> bool:
    for p in parents:
        if isinstance(p, ast.With):
            for item in p.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and _call_name(call)[1] in ATOMIC_BLOCKS:
                    return True
    return False


def _is_file_writer(node: ast.Call, owner: str, name: str) -> bool:
    """torch.save and PIL image saves; `save` of other objects (a grid store, a LoRA network) is their own
    method, which writes through the helpers itself."""
    if name != "save":
        return True
    receiver = ast.unparse(node.func.value) if isinstance(node.func, ast.Attribute) else ""
    return owner == "torch" or receiver.startswith(("Image.", "img", "image"))


def direct_writers(path: Path) -> list[str]:
    """`file:line call` for each write that bypasses the atomic helpers."""
    found: list[str] = []

    def visit(node: ast.AST, parents: list[ast.AST]) -> None:
        if isinstance(node, ast.Call):
            owner, name = _call_name(node)
            if name in NEVER or (
                name in ONLY_IN_ATOMIC_BLOCK and _is_file_writer(node, owner, name) and not _in_atomic_block(parents)
            ):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {ast.unparse(node.func)}")
        for child in ast.iter_child_nodes(node):
            visit(child, [*parents, node])

    visit(ast.parse(path.read_text(), str(path)), [])
    return found


def test_no_writer_bypasses_utils_atomic():
    offenders = [hit for p in sorted(SRC.rglob("*.py")) if p != ATOMIC for hit in direct_writers(p)]
    assert offenders == [], "write these through lorafuse.utils.atomic:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    ("code", "hits"),
    [
        ("from safetensors.torch import save_file\nsave_file(t, 'x.safetensors')\n", 1),
        ("import torch\ntorch.save(s, 'state.pt')\n", 1),
        ("pipe.save_pretrained(out)\n", 1),
        ("with atomic_folder(out) as tmp:\n    pipe.save_pretrained(tmp)\n    torch.save(s, tmp / 'a.pt')\n", 0),
        ("with atomic_path(out) as tmp:\n    save_file(t, str(tmp))\n", 1),  # its own temp file: never
        ("model.save(path)\nstore.save()\n", 0),  # their own methods
        ("Image.fromarray(a).save(path)\nimg.save(path)\n", 2),
        ("(folder / 'x.json').write_text(s)\npath.write_bytes(b)\n", 2),
        ("with atomic_path(out) as tmp:\n    tmp.write_text(s)\n", 0),
    ],
)
def test_the_scan_finds_what_it_should(tmp_path, monkeypatch, code, hits):
    """The scan itself can fail: each bypass pattern is caught, writes into an atomic temporary are not."""
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    path = tmp_path / "m.py"
    path.write_text(code)
    assert len(direct_writers(path)) == hits
