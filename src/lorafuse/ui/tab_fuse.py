"""Fuse tab: a content and a style LoRA, one method or several with the same seeds, side by side, scored by the
oracle on the world base, with K-LoRA's schedule picture. It queues `lorafuse grid` over the method axis (the
CLI's way to sample and score several settings alike); each method's options: `lorafuse fuse --method NAME
--help-options`, shown here from the same registry."""

from __future__ import annotations

import gradio as gr

from lorafuse.errors import UserInputError
from lorafuse.ui import grids, tasks
from lorafuse.ui.common import choices_or, error_md, grid_pages, number, split_list
from lorafuse.ui.helper import HELPER
from lorafuse.ui.jobs import JobStore
from lorafuse.ui.tab_tools import BASES, lora_files
from lorafuse.ui.workspace import Workspace

SCHEDULERS = ["ddim", "euler", "dpmpp"]


def fuse_jobs(store: JobStore, kind: str = "fuse") -> list[str]:
    return [j.id for j in store.jobs() if j.kind == kind][::-1]


def method_catalog() -> tuple[list[str], str]:
    """The registered methods and their one-line summaries (the Fuse and Compare tabs fill their lists from it
    when a page loads), from the registry loaded in the helper process."""
    return HELPER.call(tasks.method_catalog)


def show_options(method: str | None) -> str:
    """`lorafuse fuse --method NAME --help-options`, from the same registry."""
    return HELPER.call(tasks.options_help, method) if method else ""


def build(ws: Workspace, store: JobStore) -> dict:
    inputs, fill = _inputs(ws)
    run = gr.Button("Fuse (queued)", variant="primary", elem_id="fuse-run")
    said = gr.Markdown(elem_id="fuse-said")  # what the button did, or why not (the status below is a timer's)
    pick = _results(ws, store)

    def on_run(content, style, base, chosen, prompt, cw, sw, seeds, steps, guidance, scheduler, ind, sty, singles):
        try:
            if not content or not style:
                raise UserInputError("choose a content and a style LoRA")
            if not chosen:
                raise UserInputError("choose at least one method")
            names = {**grids.world_names(ws, content), **grids.world_names(ws, style)}
            metrics = {"individual": names.get("individual") if ind == "auto" else (None if ind == "none" else ind),
                       "style": names.get("style") if sty == "auto" else (None if sty == "none" else sty),
                       "cross_influence": bool(singles)}  # fmt: skip
            axes = {"base": [base], "checkpoint": [content], "style_checkpoint": [style], "method": list(chosen),
                    "lora_weight": [number(cw, "content weight", kind=float)],
                    "style_weight": [number(sw, "style weight", kind=float)], "steps": [number(steps, "steps")],
                    "guidance": [number(guidance, "guidance", kind=float)],
                    "seed": split_list(seeds, int) or [0]}  # fmt: skip
            job = grids.queue_grid(ws, store, "fuse", "fuse", f"fuse {', '.join(chosen)}", prompt=prompt, axes=axes,
                                   metrics=metrics, scheduler=scheduler, inputs=[content, style, base])  # fmt: skip
        except UserInputError as e:
            return error_md(e), gr.update()
        return f"queued `{job.id}`: `{job.command}`", gr.update(choices=fuse_jobs(store), value=job.id)

    run.click(on_run, inputs, [said, pick])
    return {"content": inputs[0], "style": inputs[1], "on_load": fill}


def _inputs(ws: Workspace) -> tuple[list, tuple]:
    """The LoRAs, base, methods (with their options), prompt, sampling and oracle settings; and the page-load
    filler of the method lists (from the registry, in the helper process)."""
    from lorafuse.world.catalog import HELD_OUT_STYLES, SEEN_STYLES, all_individuals

    files = lora_files(ws)
    with gr.Row():
        content = gr.Dropdown(files, label="content (subject) LoRA", allow_custom_value=True, elem_id="fuse-content")
        style = gr.Dropdown(files, label="style LoRA", allow_custom_value=True, elem_id="fuse-style")
        base = gr.Dropdown(BASES, value="world", label="base", allow_custom_value=True)
        refresh = gr.Button("Refresh", size="sm")
    with gr.Row():
        chosen = gr.CheckboxGroup([], label="methods (same seeds, side by side)", elem_id="fuse-methods", scale=8)
        every = gr.Button("all methods", size="sm", scale=1)
    with gr.Accordion("methods and their options", open=False):
        summaries = gr.Markdown()
        which = gr.Dropdown([], label="options of")
        opts_text = gr.Code(language=None)
    prompt = gr.Textbox(value="a photo of a sks teapot <c> in sks style <s>", elem_id="fuse-prompt",
                        label="prompt: <c> ends the content span, <s> the style span (CRAFT reads them; other "
                        "methods see the prompt without them)")  # fmt: skip
    with gr.Row():
        cw = gr.Number(value=1.0, label="content weight")
        sw = gr.Number(value=1.0, label="style weight")
        seeds = gr.Textbox(value="0 1", label="seeds", elem_id="fuse-seeds")
        steps = gr.Number(value=25, precision=0, label="steps", elem_id="fuse-steps")
        guidance = gr.Number(value=7.5, label="guidance")
        scheduler = gr.Dropdown(SCHEDULERS, value="ddim", label="scheduler")
    held = [x.name for x in all_individuals(held_out=True)]
    with gr.Row():
        individual = gr.Dropdown(["auto", "none", *held], value="auto", label="oracle: content individual")
        world_style = gr.Dropdown(["auto", "none", *HELD_OUT_STYLES, *SEEN_STYLES], value="auto",
                                  label="oracle: style")  # fmt: skip
        singles = gr.Checkbox(value=False, label="also each LoRA alone (cross-influence score)")

    def fill():
        names, text = method_catalog()
        first = [m for m in ("direct", "klora") if m in names] or names[:1]
        return (gr.update(choices=names, value=first), f"```\n{text}\n```",
                gr.update(choices=names, value=first[-1]))  # fmt: skip

    def on_refresh(c, s):
        names = lora_files(ws)
        return choices_or(names, c), choices_or(names, s)

    every.click(lambda: gr.update(value=method_catalog()[0]), None, chosen)
    which.change(show_options, which, opts_text)
    refresh.click(on_refresh, [content, style], [content, style])
    inputs = [content, style, base, chosen, prompt, cw, sw, seeds, steps, guidance, scheduler, individual,
              world_style, singles]  # fmt: skip
    return inputs, (fill, [chosen, summaries, which])


def _results(ws: Workspace, store: JobStore) -> gr.Dropdown:
    """The fuse job picker and what it made: methods x seeds, oracle scores, K-LoRA's schedule, the report."""
    with gr.Row():
        pick = gr.Dropdown(fuse_jobs(store), label="fuse job", elem_id="fuse-pick", allow_custom_value=True)
    status = gr.Markdown(elem_id="fuse-status")
    pages = gr.Gallery(label="methods x seeds", columns=1, height=420, object_fit="contain", elem_id="fuse-grid")
    scores = gr.Dataframe(label="oracle scores", interactive=False, elem_id="fuse-scores", wrap=True)
    with gr.Row():
        schedule = gr.Image(label="K-LoRA schedule (layers x steps)", elem_id="fuse-schedule", height=260)
        report = gr.HTML(elem_id="fuse-report")
    shown = gr.State(None)  # the pages the gallery holds, so a tick sends them only when they change

    def on_tick(job_id, last):
        text, page_list, table, schedule_png, html = show_grid(ws, store, job_id)
        return text, grid_pages(page_list, last), table, schedule_png, html, page_list

    gr.Timer(2.0).tick(on_tick, [pick, shown], [status, pages, scores, schedule, report, shown])
    return pick


def show_grid(ws: Workspace, store: JobStore, job_id: str | None):
    import pandas as pd

    if not job_id:
        return "", [], pd.DataFrame(), None, ""
    try:
        view = store.view(store.load(job_id))
        found = grids.results(ws, view.job.outputs["dir"])
    except UserInputError as e:
        return f"error: {e}", [], pd.DataFrame(), None, ""
    text = f"**{view.status}** {view.progress}  \n`{view.job.command}`" + (f"  \n{error_md(view.error)}" if view.error else "")
    table = pd.DataFrame(found["table"], columns=found["header"]) if found["header"] else pd.DataFrame()
    schedule = str(found["schedule"]) if found["schedule"] else None
    return text, [str(p) for p in found["pages"]], table, schedule, grids.report_link(ws, found["report"])
