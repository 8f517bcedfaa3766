"""Dataset tab: a world dataset in one click (`lorafuse world dataset`), your own images in kohya's layout, the
caption table, and the bucket preview (`lorafuse train --dry-run`)."""

from __future__ import annotations

import re

import gradio as gr

from lorafuse.errors import UserInputError
from lorafuse.ui import datasets
from lorafuse.ui.common import choices_or, error_md, run_cli
from lorafuse.ui.workspace import Workspace


def dataset_choices(ws: Workspace) -> list[str]:
    return ws.list_dirs("datasets")


def build(ws: Workspace, max_upload: int) -> dict:
    from lorafuse.world.catalog import HELD_OUT_STYLES, SEEN_STYLES, all_individuals

    held_out = [x.name for x in all_individuals(held_out=True)]
    gr.Markdown("Datasets live in `datasets/` of the workspace, in kohya's layout: `<repeats>_<trigger> <class>/` "
                "with an image and a `.txt` caption per sample.")  # fmt: skip
    with gr.Accordion("Built-in world: a subject or style dataset in one click", open=True):
        with gr.Row():
            kind = gr.Radio(["subject", "style"], value="subject", label="kind", elem_id="world-kind")
            subject = gr.Dropdown(held_out, value=held_out[0], label="subject (held-out individual)",
                                  elem_id="world-subject")  # fmt: skip
            style = gr.Dropdown(list(HELD_OUT_STYLES) + list(SEEN_STYLES), value=HELD_OUT_STYLES[0],
                                label="style", elem_id="world-style")  # fmt: skip
        with gr.Row():
            n = gr.Number(value=0, precision=0, label="images (0: 5 for a subject, 1 for a style)", elem_id="world-n")
            repeats = gr.Number(value=0, precision=0, label="repeats (0: 10 subject, 20 style)",
                                elem_id="world-repeats")  # fmt: skip
            trigger = gr.Textbox(value="sks", label="trigger word")
            name = gr.Textbox(value="", label="folder name (default: the subject or style)", elem_id="world-name")
        make = gr.Button("Make world dataset", variant="primary", elem_id="world-make")
        world_out = gr.Markdown(elem_id="world-out")
    with gr.Accordion("Your images", open=False):
        files = gr.File(file_count="multiple", file_types=["image"], label="upload images", elem_id="upload")
        with gr.Row():
            up_name = gr.Textbox(label="dataset name", value="my_subject", elem_id="upload-name")
            up_trigger = gr.Textbox(label="trigger word", value="sks")
            up_class = gr.Textbox(label="class", value="dog")
            up_repeats = gr.Number(label="repeats", value=10, precision=0)
        add = gr.Button("Add to dataset", elem_id="upload-add")
        up_out = gr.Markdown(elem_id="upload-out")
    with gr.Accordion("Captions and buckets", open=True):
        with gr.Row():
            chosen = gr.Dropdown(dataset_choices(ws), label="dataset", elem_id="dataset-pick", allow_custom_value=True)
            refresh = gr.Button("Refresh", size="sm")
        gallery = gr.Gallery(label="images", columns=8, height=180, elem_id="dataset-gallery")
        table = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], interactive=True,
                             label="captions (edit, then save)", elem_id="caption-table", wrap=True)  # fmt: skip
        save = gr.Button("Save captions", elem_id="caption-save")
        saved = gr.Markdown()
        with gr.Row():
            resolution = gr.Number(value=64, precision=0, label="resolution")
            batch = gr.Number(value=4, precision=0, label="batch size")
            bucket = gr.Checkbox(value=True, label="enable_bucket")
            min_reso = gr.Number(value=64, precision=0, label="min_bucket_reso")
            max_reso = gr.Number(value=1024, precision=0, label="max_bucket_reso")
            preview = gr.Button("Preview buckets", elem_id="bucket-preview")
        buckets = gr.Textbox(label="lorafuse train --dry-run", lines=8, elem_id="bucket-out")

    def on_make(kind, subject, style, n, repeats, trigger, name):
        target = (name or "").strip() or (subject if kind == "subject" else style)
        folder = f"datasets/{target}"
        ws.resolve(folder)  # refuse paths that leave the workspace before the CLI sees them
        argv = ["world", "dataset", folder, f"--{kind}", subject if kind == "subject" else style,
                "--trigger", trigger or "sks"]  # fmt: skip
        argv += ["--n", str(int(n))] if n else []
        argv += ["--repeats", str(int(repeats))] if repeats else []
        result = run_cli(argv, ws.root)
        listing = dataset_choices(ws)
        text = result.markdown() + (f"\n\nwrote `{result.out.strip()}`" if result.ok else "")
        return text, gr.update(choices=listing, value=folder if result.ok else None)

    def on_upload(files, name, trig, cls, reps):
        try:
            folder = datasets.write_uploads(ws, name.strip(), [f if isinstance(f, str) else f.name for f in files or []],
                                            trigger=trig, cls=cls, repeats=int(reps or 0), max_bytes=max_upload)  # fmt: skip
        except UserInputError as e:
            return error_md(e), gr.update()
        target = ws.relative(folder.parent)
        return f"wrote `{ws.relative(folder)}`", gr.update(choices=dataset_choices(ws), value=target)

    def on_pick(dataset):
        if not dataset:
            return [], []
        try:
            rows = datasets.caption_rows(ws, dataset)
        except UserInputError as e:
            gr.Warning(f"error: {e}")
            return [], []
        return [str(ws.resolve(r[0])) for r in rows], rows

    def on_save(rows):
        values = rows.values.tolist() if hasattr(rows, "values") else rows
        try:
            return f"saved {datasets.save_captions(ws, values)} captions"
        except UserInputError as e:
            return error_md(e)

    def on_preview(dataset, res, bs, enable_bucket, min_reso, max_reso):
        if not dataset:
            return "choose a dataset first"
        ws.resolve(dataset, must_exist=True)
        argv = ["train", "--dry-run", "--pretrained_model_name_or_path", "world", "--train_data_dir", dataset,
                "--resolution", str(int(res)),
                "--train_batch_size", str(int(bs)), "--enable_bucket", str(bool(enable_bucket)).lower(),
                "--min_bucket_reso", str(int(min_reso)), "--max_bucket_reso", str(int(max_reso))]  # fmt: skip
        result = run_cli(argv, ws.root)
        if not result.ok:
            return f"{result.command}\n{result.error}"
        # the plan kohya prints before training (indented), not the config TOML the dry run prints first
        plan = [ln for ln in result.out.splitlines() if re.match(r"  \S", ln) or "ignored" in ln]
        return result.command + "\n" + "\n".join(plan)

    make.click(on_make, [kind, subject, style, n, repeats, trigger, name], [world_out, chosen])
    add.click(on_upload, [files, up_name, up_trigger, up_class, up_repeats], [up_out, chosen])
    chosen.change(on_pick, chosen, [gallery, table])
    refresh.click(lambda v: choices_or(dataset_choices(ws), v), chosen, chosen)
    save.click(on_save, table, saved)
    preview.click(on_preview, [chosen, resolution, batch, bucket, min_reso, max_reso], buckets)
    return {"dataset": chosen}
