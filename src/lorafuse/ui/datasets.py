"""The Dataset tab's calls of `lorafuse.train.dataset_folders` (the API of `lorafuse dataset ...`), with every
path the page sends resolved inside the workspace first. Each returns the equivalent CLI command too."""

from __future__ import annotations

import shlex
from pathlib import Path

from lorafuse.errors import UserInputError
from lorafuse.train import dataset_folders as api
from lorafuse.ui.workspace import Workspace


def command(*argv: object) -> str:
    return "lorafuse " + shlex.join(str(a) for a in argv)


def add_uploads(ws: Workspace, name: str, files: list[str], *, trigger: str, cls: str, repeats: int,
                max_bytes: int, folder: str = "") -> tuple[Path, str]:  # fmt: skip
    """Uploaded files, and the images of a workspace folder, into datasets/NAME/<repeats>_<trigger> <class>/
    (`lorafuse dataset add`)."""
    root = ws.resolve(f"datasets/{ws.folder_name(name, 'dataset name')}")
    sources = [*files, *([ws.resolve(folder, must_exist=True)] if folder.strip() else [])]
    # inside: the images of a workspace folder are read only if they really lie in the workspace (a symlinked
    # image, or a symlink swapped in after `resolve`, is refused on the open file)
    added = api.add_images(root, sources, trigger=trigger, cls=cls, repeats=repeats, max_bytes=max_bytes,
                           inside=ws.root)  # fmt: skip
    shown = command("dataset", "add", ws.relative(root), *[Path(f).name for f in files],
                    *([ws.relative(sources[-1])] if folder.strip() else []), "--trigger", trigger, "--class", cls,
                    "--repeats", repeats, "--max-mb", f"{max_bytes / 2**20:g}")  # fmt: skip
    return added.folder, shown


def caption_rows(ws: Workspace, dataset: str) -> list[list[str]]:
    """[image (workspace-relative), caption] rows for the caption table (`lorafuse dataset caption DATASET`)."""
    return [[ws.relative(image), caption] for image, caption in api.caption_rows(ws.resolve(dataset, must_exist=True))]


def save_captions(ws: Workspace, rows: list[list[str]]) -> tuple[int, str]:
    """The edited table written back (`lorafuse dataset caption DATASET --from TABLE`)."""
    rows = [(image, caption) for image, caption in rows if str(image or "").strip()]
    if not rows:
        raise UserInputError("no captions to save: choose a dataset first")
    resolved = [(ws.resolve(str(image), must_exist=True), caption) for image, caption in rows]
    return api.write_captions(resolved), command("dataset", "caption", "DATASET", "--from", "TABLE.tsv")


def subsets(ws: Workspace, dataset: str) -> list[str]:
    return [p.name for p in api.subset_folders(ws.resolve(dataset, must_exist=True))]


def set_subset(ws: Workspace, dataset: str, subset: str, *, trigger: str, cls: str, repeats: int) -> tuple[str, str]:
    """Rename a subset folder to new trigger / class / repeats (`lorafuse dataset subset`)."""
    folder = ws.resolve(f"{dataset}/{subset}", must_exist=True)
    new = api.set_subset(folder, trigger=trigger or None, cls=cls or None, repeats=int(repeats) if repeats else None)
    given = {"--trigger": trigger, "--class": cls, "--repeats": int(repeats) if repeats else ""}
    shown = command("dataset", "subset", dataset, subset, *[x for k, v in given.items() if v for x in (k, v)])
    return new.name, shown
