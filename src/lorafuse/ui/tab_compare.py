"""Compare and report tab: a grid over weight x epoch (checkpoint) x steps x base x method, queued as
`lorafuse grid --report` with its progress; the HTML reports of earlier runs and of the demo."""

from __future__ import annotations

import html

import gradio as gr

from lorafuse.errors import UserInputError
from lorafuse.ui import grids
from lorafuse.ui.common import choices_or, error_md, grid_pages, split_list
from lorafuse.ui.jobs import JobStore
from lorafuse.ui.tab_fuse import fuse_jobs, method_catalog, show_grid
from lorafuse.ui.tab_tools import BASES, lora_files
from lorafuse.ui.workspace import Workspace


def reports(ws: Workspace) -> list[str]:
    return ws.list_files(".", (".html",))


def build(ws: Workspace, store: JobStore) -> dict:
    methods = _grid_section(ws, store)
    with gr.Accordion("Reports of earlier runs and the demo", open=True):
        _reports_section(ws, store)

    def fill():
        names = method_catalog()[0]
        return gr.update(choices=names, value=[m for m in ("direct",) if m in names])

    return {"on_load": (fill, [methods])}


def _grid_section(ws: Workspace, store: JobStore) -> gr.Dropdown:
    """A grid's axes, queued as `lorafuse grid --report`, and its progress, pages, scores and report link."""
    files = lora_files(ws)
    gr.Markdown("Each axis takes several values (commas or spaces); checkpoints are e.g. one LoRA per epoch.")
    with gr.Row():
        ckpts = gr.Dropdown(files, multiselect=True, label="content checkpoints (epochs)", allow_custom_value=True,
                            elem_id="cmp-ckpts")  # fmt: skip
        style_ckpts = gr.Dropdown(files, multiselect=True, label="style checkpoints (optional: fuse)",
                                  allow_custom_value=True)  # fmt: skip
        refresh = gr.Button("Refresh", size="sm")
    with gr.Row():
        weights = gr.Textbox(value="0.5 1", label="LoRA weight", elem_id="cmp-weights")
        steps = gr.Textbox(value="10", label="steps", elem_id="cmp-steps")
        bases = gr.Dropdown(BASES, value=["world"], multiselect=True, label="bases", allow_custom_value=True)
        methods = gr.Dropdown([], multiselect=True, label="methods (when fusing)")
        seeds = gr.Textbox(value="0", label="seeds")
    prompt = gr.Textbox(value="a photo of a sks teapot", label="prompt", elem_id="cmp-prompt")
    run = gr.Button("Build grid (queued)", variant="primary", elem_id="cmp-run")
    said = gr.Markdown(elem_id="cmp-said")  # what the button did, or why not (the status below is a timer's)
    pick = gr.Dropdown(fuse_jobs(store, "grid"), label="grid job", allow_custom_value=True, elem_id="cmp-pick")
    status = gr.Markdown(elem_id="cmp-status")
    pages = gr.Gallery(label="grid pages", columns=1, height=420, object_fit="contain", elem_id="cmp-grid")
    scores = gr.Dataframe(label="scores", interactive=False, elem_id="cmp-scores")
    link = gr.HTML(elem_id="cmp-report")

    def on_run(ckpts, style_ckpts, weights, steps, bases, methods, seeds, prompt):
        try:
            if not ckpts:
                raise UserInputError("choose at least one checkpoint")
            axes = {"base": list(bases or ["world"]), "checkpoint": list(ckpts),
                    "lora_weight": split_list(weights, float) or [1.0], "steps": split_list(steps, int) or [25],
                    "seed": split_list(seeds, int) or [0]}  # fmt: skip
            if style_ckpts:
                axes.update(style_checkpoint=list(style_ckpts), method=list(methods or ["direct"]))
            names = grids.world_names(ws, ckpts[0])
            metrics = {**names, **(grids.world_names(ws, style_ckpts[0]) if style_ckpts else {}),
                       "cross_influence": False}  # fmt: skip
            job = grids.queue_grid(ws, store, "grid", "grids", f"grid {len(ckpts)} checkpoint(s)", prompt=prompt,
                                   axes=axes, metrics=metrics, inputs=[*ckpts, *(style_ckpts or []), *(bases or [])])  # fmt: skip
        except UserInputError as e:
            return error_md(e), gr.update()
        return f"queued `{job.id}`: `{job.command}`", gr.update(choices=fuse_jobs(store, "grid"), value=job.id)

    shown = gr.State(None)  # the pages the gallery holds, so a tick sends them only when they change

    def on_tick(job_id, last):
        text, page_list, table, _schedule, html = show_grid(ws, store, job_id)
        return text, grid_pages(page_list, last), table, html, page_list

    def on_refresh():
        names = lora_files(ws)
        return gr.update(choices=names), gr.update(choices=names)

    run.click(on_run, [ckpts, style_ckpts, weights, steps, bases, methods, seeds, prompt], [said, pick])
    gr.Timer(2.0).tick(on_tick, [pick, shown], [status, pages, scores, link, shown])
    refresh.click(on_refresh, None, [ckpts, style_ckpts])
    return methods


def _reports_section(ws: Workspace, store: JobStore) -> None:
    with gr.Row():
        report = gr.Dropdown(reports(ws), label="report", allow_custom_value=True, elem_id="report-pick")
        refresh_reports = gr.Button("Refresh", size="sm", elem_id="report-refresh")
        demo = gr.Button("Run the demo (queued: about 3 min on 2 cores)", elem_id="demo-run")
    open_link = gr.HTML(elem_id="report-open")

    def on_report(path):
        if not path:
            return ""
        try:
            if not path.strip().lower().endswith((".html", ".htm")):
                raise UserInputError(f"{path}: not an HTML report; choose one from the list")
            return grids.report_link(ws, ws.resolve(path, must_exist=True))
        except UserInputError as e:
            return f"<b>{html.escape(f'error: {e}')}</b>"

    def on_demo():
        job = store.submit("demo", "lorafuse demo", ["demo", "--out", "demo"], {"dir": "demo"})
        store.ensure_worker()
        return f"queued `{job.id}`: `{job.command}`; its report appears here as demo/report.html"

    report.change(on_report, report, open_link)
    refresh_reports.click(lambda v: choices_or(reports(ws), v), report, report)
    demo.click(on_demo, None, open_link)
