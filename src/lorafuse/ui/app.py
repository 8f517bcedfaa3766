"""The web UI: one tab per step of the job, each a thin layer over the `lorafuse` commands (see `common.run_cli`
for quick ones, `jobs` for long ones). Gradio, as kohya_ss and fluxgym use: typed form components, galleries,
plots and a login come with it, and its server is the same FastAPI/uvicorn stack a hand-written app would use."""

from __future__ import annotations

import threading

import gradio as gr

from lorafuse.ui.jobs import JobStore
from lorafuse.ui.workspace import Workspace

# system fonts only: the default theme would fetch Google Fonts, and the UI must work offline
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])  # fmt: skip
TABS = ("Dataset", "Train", "LoRA tools", "Fuse", "Compare & report", "Jobs")


def keep_worker(store: JobStore, every_s: float = 5.0, stop: threading.Event | None = None) -> None:
    """While the page runs, a queue never waits for a worker that died (killed, or crashed in a library): one is
    started again when jobs wait and none holds the workspace's worker lock."""
    stop = stop or threading.Event()
    while not stop.wait(every_s):
        try:
            store.ensure_worker()
        except Exception as e:  # noqa: BLE001 - a full disk must not end the page; said in its log
            print(f"lorafuse ui: could not start the job worker: {e}", flush=True)


def build_app(ws: Workspace, *, max_upload: int) -> gr.Blocks:
    from lorafuse.ui import tab_compare, tab_dataset, tab_fuse, tab_jobs, tab_tools, tab_train

    store = JobStore(ws.root)
    store.ensure_worker()  # a queue left from an earlier session continues
    threading.Thread(target=keep_worker, args=(store,), name="lorafuse-ui-keep-worker", daemon=True).start()
    with gr.Blocks(title="lorafuse", analytics_enabled=False) as app:
        gr.Markdown(f"## lorafuse &nbsp; <small>workspace `{ws.root}`</small>")
        with gr.Tabs():
            with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset"):
                ds = tab_dataset.build(ws, max_upload)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                tab_train.build(ws, store, ds["dataset"])
            with gr.Tab("LoRA tools", id="tools", elem_id="tab-tools"):
                tab_tools.build(ws, store)
            with gr.Tab("Fuse", id="fuse", elem_id="tab-fuse"):
                fuse = tab_fuse.build(ws, store)
            with gr.Tab("Compare & report", id="compare", elem_id="tab-compare"):
                compare = tab_compare.build(ws, store)
            with gr.Tab("Jobs", id="jobs", elem_id="tab-jobs"):
                tab_jobs.build(store)
        # the method lists come from the fusion registry, loaded in the helper process (helper.py) once the page is up
        for fill, outputs in (fuse["on_load"], compare["on_load"]):
            app.load(fill, None, outputs)
    return app
