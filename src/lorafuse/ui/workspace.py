"""The web UI's workspace: the one folder it reads and writes, and the checks that keep it there.

Every path typed into the page or sent by the browser goes through `Workspace.resolve`, which takes paths
relative to the workspace only: an absolute path, a `..` component, or a symlink whose target lies outside
is refused with a message naming the path. Uploads go through `lorafuse.train.dataset_folders.check_image`: a
size limit and a real image decode (the file's bytes, not its name, decide its type).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lorafuse.errors import UserInputError

DEFAULT_WORKSPACE = Path("lorafuse-workspace")
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # a training image larger than this is almost surely not one
# the folders the UI creates; users may add their own
LAYOUT = ("datasets", "runs", "fuse", "grids", "loras", "jobs", "bases")
# base models by name (`lorafuse.models.load.BUILTIN_BASES`, which imports torch: the page does not; a test
# keeps the two equal); any other base is a folder or file in the workspace
BUILTIN_BASES = ("world", "world-random", "sd15-tiny", "sdxl-tiny", "flux-tiny", "flux-schnell-tiny")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def hidden(path: Path, below: Path | None = None) -> bool:
    """A dot-name on the way from `below` to `path`: an atomic write's `.lorafuse-tmp-*` file or folder (gone
    again a moment later), or a file the user hid."""
    parts = path.relative_to(below).parts if below is not None else (path.name,)
    return any(part.startswith(".") for part in parts)


class WorkspacePathError(UserInputError):
    """A path that would leave the workspace."""


@dataclass(frozen=True)
class Workspace:
    root: Path
    allow_pickle: bool = False

    @classmethod
    def create(cls, root: str | os.PathLike, *, allow_pickle: bool = False) -> Workspace:
        root = Path(root).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise UserInputError(f"--workspace {root}: exists and is not a folder")
        for name in LAYOUT:
            (root / name).mkdir(parents=True, exist_ok=True)
        return cls(root, allow_pickle)

    def resolve(self, path: str | os.PathLike, *, must_exist: bool = False) -> Path:
        """`path` (relative to the workspace) as an absolute path inside it; refuses anything that leaves it."""
        text = os.fspath(path).strip()
        if not text:
            raise WorkspacePathError("empty path: give a path relative to the workspace")
        if "\x00" in text:
            raise WorkspacePathError(f"{text!r}: a path cannot contain a NUL character")
        pure = PurePosixPath(text.replace("\\", "/"))
        if pure.is_absolute() or Path(text).is_absolute() or (len(text) > 1 and text[1] == ":"):
            raise WorkspacePathError(
                f"{text}: absolute paths are refused; give a path relative to the workspace {self.root}"
            )
        if ".." in pure.parts:
            raise WorkspacePathError(f"{text}: '..' is refused; paths stay inside the workspace {self.root}")
        candidate = self.root.joinpath(*pure.parts)
        # resolve() follows every symlink on the way, also of a parent folder; strict=False for new outputs
        real = candidate.resolve()
        if real != self.root and self.root not in real.parents:
            raise WorkspacePathError(
                f"{text}: a symlink leads outside the workspace (to {real}); refused"
            )
        if must_exist and not real.exists():
            raise UserInputError(f"{text}: no such file or folder in the workspace {self.root}")
        return real

    @staticmethod
    def folder_name(text: str | None, what: str) -> str:
        """One folder name typed into the page (a dataset, a run), not a path: a '/' would nest it where the page's
        lists do not look (and '/etc' would quietly become datasets/etc), a leading dot hides it from them, and an
        empty name would write into the parent folder itself."""
        name = (text or "").strip()
        if not name:
            raise UserInputError(f"{what}: give a name")
        if any(c in name for c in "/\\\x00") or name in (".", ".."):
            raise WorkspacePathError(f"{what} {name!r}: give one folder name, not a path (no '/')")
        if name.startswith("."):
            raise UserInputError(f"{what} {name!r}: a name starting with '.' would be hidden from the page's lists")
        if len(name.encode()) > 200:
            raise UserInputError(f"{what}: a name of {len(name.encode())} bytes is too long (at most 200)")
        return name

    def relative(self, path: str | os.PathLike) -> str:
        """How a path inside the workspace is shown on the page and written into configs."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def list_files(self, folder: str, suffixes: tuple[str, ...], *, recursive: bool = True) -> list[str]:
        """Workspace-relative paths of files under `folder` with one of `suffixes`, newest first. Jobs write
        while the page lists: hidden names (an atomic write's `.lorafuse-tmp-*` file) are not listed, and a file
        that vanishes between the listing and its stat is left out instead of failing the page."""
        base = self.resolve(folder)
        if not base.is_dir():
            return []
        found = base.rglob("*") if recursive else base.iterdir()
        dated = []
        for p in found:
            if p.suffix.lower() not in suffixes or hidden(p, base):
                continue
            with contextlib.suppress(OSError):  # gone, or unreadable: not listed
                if p.is_file() and self._inside(p):
                    dated.append((p.stat().st_mtime, p))
        dated.sort(key=lambda t: t[0], reverse=True)
        return [self.relative(p) for _, p in dated]

    def list_dirs(self, folder: str, *, containing: str | None = None) -> list[str]:
        """Workspace-relative sub-folders of `folder` (those holding a file named `containing`, if given)."""
        base = self.resolve(folder)
        if not base.is_dir():
            return []
        dirs = [p for p in sorted(base.iterdir()) if not p.name.startswith(".") and p.is_dir() and self._inside(p)]
        if containing:
            dirs = [p for p in dirs if (p / containing).exists()]
        return [self.relative(p) for p in dirs]

    def _inside(self, path: Path) -> bool:
        real = path.resolve()
        return self.root in real.parents

    def check_pickle(self, path: Path) -> None:
        """Pickle-based weights run code when read: refused unless `lorafuse ui --allow-pickle` was given."""
        if path.suffix.lower() in PICKLE_SUFFIXES and not self.allow_pickle:
            raise UserInputError(
                f"{self.relative(path)}: pickle files can run code when loaded; refused (start "
                "`lorafuse ui --allow-pickle` to read them, as the CLI's --allow-pickle)"
            )

    def input_file(self, path: str, what: str) -> str:
        """A file or folder the CLI will read, as a workspace-relative path: inside the workspace, present, and not
        a pickle without the opt-in. `what` names the field in the message."""
        if not (path or "").strip():
            raise UserInputError(f"{what}: choose a file first")
        try:
            resolved = self.resolve(path, must_exist=True)
            self.check_tree(resolved)
        except UserInputError as e:
            raise type(e)(f"{what}: {e}") from None
        self.check_pickle(resolved)
        return self.relative(resolved)

    def check_tree(self, folder: Path, _seen: set[Path] | None = None) -> None:
        """A folder a job will read (a dataset, a model folder): no symlink inside it may lead out of the workspace.
        The command that reads it follows symlinks and knows nothing of the workspace, so this is checked when the
        job is queued and again as it starts (`runner.recheck`); a symlink made while the command runs is not."""
        seen = _seen if _seen is not None else set()
        if not folder.is_dir() or folder in seen:
            return
        seen.add(folder)
        for dirpath, dirnames, filenames in os.walk(folder):  # symlinked folders are listed, not walked into
            for name in (*dirnames, *filenames):
                entry = Path(dirpath) / name
                if not entry.is_symlink():
                    continue
                real = entry.resolve()
                if real != self.root and self.root not in real.parents:
                    raise WorkspacePathError(
                        f"{entry.relative_to(self.root).as_posix()}: a symlink leads outside the workspace (to {real}); "
                        "refused"
                    )
                self.check_tree(real, seen)  # a symlink to another folder of the workspace: check what it holds

    def base_model(self, name_or_path: str, what: str = "base") -> str:
        """A base model for the CLI: a built-in name, or a folder / checkpoint inside the workspace (not a Hugging
        Face id: that would read the cache outside the workspace; put the model under bases/ instead)."""
        text = (name_or_path or "").strip()
        if text in BUILTIN_BASES:
            return text
        return self.input_file(text, f"{what} (one of {', '.join(BUILTIN_BASES)}, or a path in the workspace)")
