"""kohya's subset folder names, `<repeats>_<trigger> <class>` (e.g. `10_sks dog`): made and read in one place.

Both the dataset builder (`lorafuse dataset`, in `train`) and the built-in world's dataset writer (`world`, below
`train`) name folders this way, so the rule lives here, below both: a name that is not one path component, or a
repeats count out of range, is refused the same way wherever a folder is named.
"""

from __future__ import annotations

import re
from pathlib import Path

from lorafuse.errors import UserInputError

FOLDER_PATTERN = "<repeats>_<trigger> <class>"
FOLDER_RE = re.compile(r"^([0-9]+)_(\S.*)$")
# `lorafuse world dataset` writes this file beside its kohya folder and a references/ folder of clean renders
# (not training data): a dataset scan that finds it skips references/ without a warning
WORLD_DATASET_INFO = "world_dataset.json"
REFERENCES_FOLDER = "references"
# An epoch lists every image `repeats` times; real datasets use 1 to a few hundred. Far above that is a typo,
# and a number like 99999999999999999999 would otherwise build a list of that length and hang the run.
MAX_REPEATS = 10_000
# One path component a caption can carry: no '/', no '..', no empty name, no leading space or dot
_WORD = re.compile(r"^\w[\w .-]*$")


def parse_subset_folder(folder: Path) -> tuple[int, str]:
    """'10_sks dog' -> (10, 'sks dog'); anything else is an error naming the folder and the pattern."""
    m = FOLDER_RE.match(folder.name)
    if m is None or int(m.group(1)) < 1:
        raise UserInputError(
            f"{folder}: folder name must be '{FOLDER_PATTERN}' with repeats >= 1 (e.g. '10_sks dog'), got '{folder.name}'"
        )
    check_repeats(int(m.group(1)), str(folder))
    return int(m.group(1)), m.group(2).strip()


def check_repeats(repeats: int, where: str) -> None:
    if repeats > MAX_REPEATS:
        raise UserInputError(
            f"{where}: {repeats} repeats is more than {MAX_REPEATS}, which no dataset needs (an epoch shows each image "
            "that many times); use a smaller number and set max_train_epochs or max_train_steps for a longer run"
        )


def subset_name(repeats: int, trigger: str, cls: str) -> str:
    """kohya's folder name: (10, 'sks', 'dog') -> '10_sks dog'. Trigger and class become the caption's subject."""
    if int(repeats) < 1:
        raise UserInputError(f"repeats must be >= 1, got {repeats}")
    check_repeats(int(repeats), "repeats")
    for label, value in (("trigger", trigger), ("class", cls)):
        if not _WORD.match(value.strip()):
            raise UserInputError(f"{label} {value!r}: use letters, digits, spaces, '.', '-' or '_'")
    return f"{int(repeats)}_{trigger.strip()} {cls.strip()}"
