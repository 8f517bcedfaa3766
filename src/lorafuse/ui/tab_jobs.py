"""Jobs tab: the queue, the running job with its progress (from the command's own tqdm bars), finished runs
and their logs; stop or cancel. Everything is read from WORKSPACE/jobs, so it survives a restart."""

from __future__ import annotations

import re
import time

import gradio as gr

from lorafuse.errors import UserInputError
from lorafuse.ui.common import error_md
from lorafuse.ui.jobs import JobStore

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HEADERS = ["id", "status", "progress", "title", "command", "started"]


def table(store: JobStore) -> list[list[str]]:
    rows = []
    for v in reversed(store.views()):
        started = time.strftime("%H:%M:%S", time.localtime(v.started)) if v.started else ""
        title = "(unreadable job file)" if v.status == "unreadable" else v.job.title
        command = "" if v.status == "unreadable" else v.job.command
        rows.append([v.job.id, v.status, v.progress or v.error, title, command, started])
    return rows


def build(store: JobStore) -> dict:
    gr.Markdown("Jobs run one at a time in a worker process; closing the browser does not stop them.")
    jobs = gr.Dataframe(table(store), headers=HEADERS, interactive=False, elem_id="jobs-table", wrap=True)
    with gr.Row():
        pick = gr.Dropdown([j.id for j in store.jobs()][::-1], label="job", allow_custom_value=True,
                           elem_id="jobs-pick")  # fmt: skip
        stop = gr.Button("Stop / cancel", elem_id="jobs-stop")
    said = gr.Markdown(elem_id="jobs-said")
    log = gr.Textbox(label="log (last lines)", lines=14, elem_id="jobs-log", autoscroll=True)

    def on_tick(job_id):
        text = ""
        if job_id:
            try:
                store.load(job_id)
                # tqdm's cursor moves (ESC[A) and colours are for terminals; the page shows the plain lines
                text = _ANSI.sub("", store.log_tail(job_id, 6000)).replace("\r", "\n")
                text = "\n".join(ln for ln in text.splitlines() if ln.strip())[-4000:]
            except UserInputError as e:
                text = f"error: {e}"
        ids = [j.id for j in store.jobs()][::-1]
        return table(store), gr.update(choices=ids), text

    def on_stop(job_id):
        try:
            if not job_id:
                raise UserInputError("choose a job first")
            return store.request_stop(job_id)
        except UserInputError as e:
            return error_md(e)

    gr.Timer(2.0).tick(on_tick, pick, [jobs, pick, log])
    stop.click(on_stop, pick, said)
    return {}
