"""Dataset tab: a world dataset in one click (`lorafuse world dataset`), your own images in kohya's layout
(`lorafuse dataset add`), the caption table (`lorafuse dataset caption`), a subset's trigger / class / repeats
(`lorafuse dataset subset`), and the bucket preview (`lorafuse train --dry-run`)."""

from __future__ import annotations

import re

import gradio as gr

from lorafuse.errors import UserInputError
from lorafuse.ui import datasets
from lorafuse.ui.common import choices_or, error_md, number, run_cli
from lorafuse.ui.workspace import Workspace

# a world dataset is made by the helper process while the page waits (seconds); far more images than any
# personalisation needs would hold every quick command behind it (and 10^12 filled 10 GB of memory before one
# image was written), so the page takes at most this many; `lorafuse world dataset` takes more
MAX_WORLD_IMAGES = 1000


def dataset_choices(ws: Workspace) -> list[str]:
    return ws.list_dirs("datasets")


def build(ws: Workspace, max_upload: int) -> dict:
    gr.Markdown("Datasets live in `datasets/` of the workspace, in kohya's layout: `<repeats>_<trigger> <class>/` "
                "with an image and a `.txt` caption per sample.")  # fmt: skip
    with gr.Accordion("Built-in world: a subject or style dataset in one click", open=True):
        world_made = _world_section(ws)
    with gr.Accordion("Your images", open=False):
        uploaded = _upload_section(ws, max_upload)
    with gr.Accordion("Captions, trigger word, class and repeats", open=True):
        with gr.Row():
            chosen = gr.Dropdown(dataset_choices(ws), label="dataset", elem_id="dataset-pick", allow_custom_value=True)
            refresh = gr.Button("Refresh", size="sm")
        _captions_section(ws, chosen)
    with gr.Accordion("Buckets", open=True):
        _buckets_section(ws, chosen)
    # the picker follows the dataset just made (each section returns its click event and a state holding it)
    for event, made in (world_made, uploaded):
        event.then(lambda made, v: choices_or(dataset_choices(ws), made or v), [made, chosen], chosen)
    refresh.click(lambda v: choices_or(dataset_choices(ws), v), chosen, chosen)
    return {"dataset": chosen}


def _world_section(ws: Workspace) -> tuple:
    from lorafuse.world.catalog import HELD_OUT_STYLES, SEEN_STYLES, all_individuals

    held_out = [x.name for x in all_individuals(held_out=True)]
    with gr.Row():
        kind = gr.Radio(["subject", "style"], value="subject", label="kind", elem_id="world-kind")
        subject = gr.Dropdown(held_out, value=held_out[0], label="subject (held-out individual)", elem_id="world-subject")
        style = gr.Dropdown(list(HELD_OUT_STYLES) + list(SEEN_STYLES), value=HELD_OUT_STYLES[0], label="style",
                            elem_id="world-style")  # fmt: skip
    with gr.Row():
        n = gr.Number(value=0, precision=0, label="images (0: 5 for a subject, 1 for a style)", elem_id="world-n")
        repeats = gr.Number(value=0, precision=0, label="repeats (0: 10 subject, 20 style)", elem_id="world-repeats")
        trigger = gr.Textbox(value="sks", label="trigger word")
        name = gr.Textbox(value="", label="folder name (default: the subject or style)", elem_id="world-name")
    make = gr.Button("Make world dataset", variant="primary", elem_id="world-make")
    out = gr.Markdown(elem_id="world-out")
    made = gr.State("")

    def on_make(kind, subject, style, n, repeats, trigger, name):
        try:
            argv = world_argv(ws, kind, subject, style, n, repeats, trigger, name)
        except UserInputError as e:
            return error_md(e), ""
        folder = argv[2]
        result = run_cli(argv, ws.root)
        return result.markdown() + (f"\n\nwrote `{result.out.strip()}`" if result.ok else ""), folder if result.ok else ""

    event = make.click(on_make, [kind, subject, style, n, repeats, trigger, name], [out, made])
    return event, made


def world_argv(ws: Workspace, kind: str, subject: str, style: str, n, repeats, trigger: str, name: str) -> list[str]:
    """`lorafuse world dataset ...` for the form, its values checked first: the folder is one name in datasets/,
    and the trigger and repeats follow `lorafuse dataset`'s rules (the world command takes any, and a trigger
    'a/b' made a nested folder; a style takes at most as many images as there are seen individuals to draw)."""
    from lorafuse.train.dataset_folders import subset_name
    from lorafuse.world.catalog import all_individuals

    folder = "datasets/" + ws.folder_name(name or (subject if kind == "subject" else style), "folder name")
    ws.resolve(folder)  # a symlink out of the workspace as datasets/NAME
    most = MAX_WORLD_IMAGES if kind == "subject" else len(all_individuals(held_out=False))
    count = number(n or 0, "images", minimum=0, maximum=most)  # 0: the command's default
    times = number(repeats or 0, "repeats", minimum=0)
    trigger = (trigger or "").strip() or "sks"
    subset_name(times or 1, trigger, "class")  # the trigger's characters, the repeats' range
    argv = ["world", "dataset", folder, f"--{kind}", subject if kind == "subject" else style, "--trigger", trigger]
    return argv + (["--n", str(count)] if count else []) + (["--repeats", str(times)] if times else [])


def _upload_section(ws: Workspace, max_upload: int) -> tuple:
    files = gr.File(file_count="multiple", file_types=["image"], label="upload images", elem_id="upload")
    source = gr.Textbox(label="and/or a folder of images in the workspace", placeholder="e.g. photos/dog",
                        elem_id="upload-folder")  # fmt: skip
    with gr.Row():
        name = gr.Textbox(label="dataset name", value="my_subject", elem_id="upload-name")
        trigger = gr.Textbox(label="trigger word", value="sks", elem_id="upload-trigger")
        cls = gr.Textbox(label="class", value="dog", elem_id="upload-class")
        repeats = gr.Number(label="repeats", value=10, precision=0, elem_id="upload-repeats")
    add = gr.Button("Add to dataset", elem_id="upload-add")
    out = gr.Markdown(elem_id="upload-out")
    made = gr.State("")

    def on_upload(files, source, name, trigger, cls, repeats):
        paths = [f if isinstance(f, str) else f.name for f in files or []]
        try:
            if not paths and not (source or "").strip():
                raise UserInputError(f"no images uploaded (a file over the {max_upload / 2**20:g} MB limit is not "
                                     "uploaded), and no folder given")  # fmt: skip
            folder, command = datasets.add_uploads(ws, name, paths, trigger=trigger, cls=cls, folder=source or "",
                                                   repeats=number(repeats, "repeats"), max_bytes=max_upload)  # fmt: skip
        except UserInputError as e:
            return error_md(e), ""
        return f"`{command}`\n\nwrote `{ws.relative(folder)}`", ws.relative(folder.parent)

    event = add.click(on_upload, [files, source, name, trigger, cls, repeats], [out, made])
    return event, made


def _captions_section(ws: Workspace, chosen: gr.Dropdown) -> None:
    gallery = gr.Gallery(label="images", columns=8, height=180, elem_id="dataset-gallery")
    table = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], interactive=True,
                         label="captions (edit, then save)", elem_id="caption-table", wrap=True)  # fmt: skip
    save = gr.Button("Save captions", elem_id="caption-save")
    saved = gr.Markdown(elem_id="caption-saved")
    with gr.Row():
        subset = gr.Dropdown([], label="subset folder", elem_id="subset-pick", allow_custom_value=True)
        trigger = gr.Textbox(label="trigger word", elem_id="subset-trigger")
        cls = gr.Textbox(label="class", elem_id="subset-class")
        repeats = gr.Number(label="repeats", precision=0, elem_id="subset-repeats")
        rename = gr.Button("Set", elem_id="subset-set")
    renamed = gr.Markdown(elem_id="subset-out")

    def on_pick(dataset, keep=None):
        """gallery, table, subset choices, and a line for the page (a dataset typed in that cannot be read)"""
        if not dataset:
            return [], [], gr.update(choices=[], value=None), ""
        try:
            rows, names = datasets.caption_rows(ws, dataset), datasets.subsets(ws, dataset)
        except UserInputError as e:
            return [], [], gr.update(choices=[], value=None), error_md(e)
        return [str(ws.resolve(r[0])) for r in rows], rows, choices_or(names, keep), ""

    def on_save(rows):
        try:
            count, command = datasets.save_captions(ws, rows.values.tolist() if hasattr(rows, "values") else rows)
        except UserInputError as e:
            return error_md(e)
        return f"saved {count} captions (as `{command}`)"

    def on_subset(name):
        m = re.match(r"^(\d+)_(?:(.*) )?(\S+)$", name or "")
        return (m.group(2) or "", m.group(3), int(m.group(1))) if m else ("", "", None)

    def on_rename(dataset, name, trigger, cls, repeats):
        try:
            if not dataset or not name:
                raise UserInputError(f"choose {'a dataset' if not dataset else 'a subset folder'} first")
            times = number(repeats, "repeats") if repeats not in (None, "") else None
            new, command = datasets.set_subset(ws, dataset, name, trigger=trigger, cls=cls, repeats=times)
        except UserInputError as e:
            return (error_md(e), *on_pick(dataset, name)[:3])
        return (f"`{command}`: now `{new}`", *on_pick(dataset, new)[:3])

    chosen.change(on_pick, chosen, [gallery, table, subset, saved])
    save.click(on_save, table, saved)
    subset.change(on_subset, subset, [trigger, cls, repeats])
    rename.click(on_rename, [chosen, subset, trigger, cls, repeats], [renamed, gallery, table, subset])


def _buckets_section(ws: Workspace, chosen: gr.Dropdown) -> None:
    with gr.Row():
        resolution = gr.Number(value=64, precision=0, label="resolution")
        batch = gr.Number(value=4, precision=0, label="batch size")
        bucket = gr.Checkbox(value=True, label="enable_bucket")
        min_reso = gr.Number(value=64, precision=0, label="min_bucket_reso")
        max_reso = gr.Number(value=1024, precision=0, label="max_bucket_reso")
        preview = gr.Button("Preview buckets", elem_id="bucket-preview")
    buckets = gr.Textbox(label="lorafuse train --dry-run", lines=8, elem_id="bucket-out")

    def on_preview(dataset, res, bs, enable_bucket, min_reso, max_reso):
        if not dataset:
            return "choose a dataset first"
        try:
            dataset = ws.input_file(dataset, "dataset")
            # their ranges are the training config's, checked by the command; here only that each is a number
            sizes = [str(number(v, label)) for v, label in ((res, "resolution"), (bs, "batch size"),
                                                             (min_reso, "min_bucket_reso"), (max_reso, "max_bucket_reso"))]  # fmt: skip
        except UserInputError as e:
            return f"error: {e}"
        argv = ["train", "--dry-run", "--pretrained_model_name_or_path", "world", "--train_data_dir", dataset,
                "--resolution", sizes[0], "--train_batch_size", sizes[1],
                "--enable_bucket", str(bool(enable_bucket)).lower(),
                "--min_bucket_reso", sizes[2], "--max_bucket_reso", sizes[3]]  # fmt: skip
        result = run_cli(argv, ws.root)
        if not result.ok:
            return f"{result.command}\n{result.error}"
        # the plan kohya prints before training (indented), not the config TOML the dry run prints first
        plan = [ln for ln in result.out.splitlines() if re.match(r"  \S", ln) or "ignored" in ln]
        return result.command + "\n" + "\n".join(plan)

    preview.click(on_preview, [chosen, resolution, batch, bucket, min_reso, max_reso], buckets)
