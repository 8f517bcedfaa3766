"""`lorafuse dataset ...`: build a training dataset in kohya's folder layout (`<repeats>_<trigger> <class>/` with
an image and a `.txt` caption per sample) from your own images; `lorafuse world dataset` makes one from the
built-in world. Each subcommand is one call of `lorafuse.train.dataset_folders`, as the web UI's Dataset tab."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafuse.errors import UserInputError


def _cmd_add(args: argparse.Namespace) -> int:
    from lorafuse.train.dataset_folders import add_images

    if args.max_mb is not None and not args.max_mb > 0:  # also nan
        raise UserInputError(f"--max-mb {args.max_mb}: give a size in MB above 0")
    max_bytes = int(args.max_mb * 2**20) if args.max_mb else None
    added = add_images(args.dataset, args.images, trigger=args.trigger, cls=args.cls, repeats=args.repeats,
                       caption=args.caption, max_bytes=max_bytes)  # fmt: skip
    for image in added.images:
        print(image)
    return 0


def _cmd_caption(args: argparse.Namespace) -> int:
    from lorafuse.train.dataset_folders import caption_rows, write_captions
    from lorafuse.utils.inputs import read_text

    root = Path(args.dataset)
    if args.set or args.from_file:
        lines = read_text(args.from_file, "caption list").splitlines() if args.from_file else []
        rows = [_split(line, args.from_file, "\t") for line in lines if line.strip()]
        rows += [_split(text, "--set", "=") for text in args.set or []]  # after the file: --set wins
        print(f"{write_captions((root / image, caption) for image, caption in rows)} captions written")
        return 0
    for image, caption in caption_rows(root):  # the form --from reads back
        print(f"{image.relative_to(root).as_posix()}\t{caption}")
    return 0


def _split(text: str, where: str, sep: str) -> tuple[str, str]:
    image, found, caption = text.partition(sep)
    if not found or not image.strip():
        shown = "IMAGE<TAB>CAPTION" if sep == "\t" else "IMAGE=CAPTION"
        raise UserInputError(f"{where}: {text.strip()!r} is not {shown} (IMAGE relative to the dataset folder)")
    return image.strip(), caption


def _cmd_subset(args: argparse.Namespace) -> int:
    from lorafuse.train.dataset_folders import set_subset

    print(set_subset(Path(args.dataset) / args.subset, trigger=args.trigger, cls=args.cls, repeats=args.repeats))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="build a training dataset (kohya folder layout) from your images; captions",
                       description=__doc__.split("\n\n")[0])  # fmt: skip
    ds = p.add_subparsers(dest="dataset_command", metavar="DATASET_COMMAND")

    q = ds.add_parser("add", help="copy images into DATASET/<repeats>_<trigger> <class>/ with a caption each",
                      description="Copy images (checked: PNG, JPEG, WEBP or BMP, decoded) into a subset folder. "
                      "Each gets a caption file: --caption, else the .txt beside the image, else "
                      "'a photo of a <trigger> <class>'.")  # fmt: skip
    q.add_argument("dataset", help="dataset folder (created if new)")
    q.add_argument("images", nargs="+", help="image files, or folders of them")
    q.add_argument("--trigger", default="sks", help="trigger word (default sks)")
    q.add_argument("--class", dest="cls", required=True, help="class word, e.g. dog")
    q.add_argument("--repeats", type=int, default=10, help="kohya repeats: times per epoch (default 10)")
    q.add_argument("--caption", default=None, help="one caption for all of them")
    q.add_argument("--max-mb", type=float, default=None, help="refuse images larger than this (MB)")
    q.set_defaults(func=_cmd_add)

    q = ds.add_parser("caption", help="print the captions (IMAGE<TAB>CAPTION), or write some",
                      description="Without --set/--from: print every image of DATASET with its caption, one "
                      "IMAGE<TAB>CAPTION line each (IMAGE relative to DATASET). --from reads that form back.")  # fmt: skip
    q.add_argument("dataset", help="dataset folder")
    q.add_argument("--set", action="append", metavar="IMAGE=CAPTION", help="write one caption; repeatable")
    q.add_argument("--from", dest="from_file", metavar="FILE", help="IMAGE<TAB>CAPTION lines to write")
    q.set_defaults(func=_cmd_caption)

    q = ds.add_parser("subset", help="set a subset folder's trigger word, class or repeats (renames it)")
    q.add_argument("dataset", help="dataset folder")
    q.add_argument("subset", help="subset folder name, e.g. '10_sks dog'")
    q.add_argument("--trigger", default=None)
    q.add_argument("--class", dest="cls", default=None)
    q.add_argument("--repeats", type=int, default=None)
    q.set_defaults(func=_cmd_subset)
