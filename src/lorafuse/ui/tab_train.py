"""Train tab: a form generated from the typed training config (`lorafuse.train.options`: every option with its
help text, default and kohya name), presets, the equivalent command and TOML, the queue, and a run monitor
(loss / LR chart from the run's CSV log, samples per epoch, stop with a saved state, continue)."""

from __future__ import annotations

import dataclasses
import json
import shlex
import threading
import typing
from pathlib import Path

import gradio as gr

from lorafuse.errors import UserInputError
from lorafuse.train.options import Option, options
from lorafuse.ui import tasks
from lorafuse.ui.common import choices_or, error_md
from lorafuse.ui.helper import HELPER
from lorafuse.ui.jobs import JobStore
from lorafuse.ui.workspace import BUILTIN_BASES, Workspace, hidden
from lorafuse.utils.atomic import atomic_write_text

PRESETS = {
    "subject LoRA (world recipe)": ("subject", {}),
    "style LoRA (world recipe)": ("style", {}),
    "CRAFT pair: content half (craft_content layers)": ("subject", {"layers": "craft"}),
    "CRAFT pair: style half (craft_style layers)": ("style", {"layers": "craft"}),
    "B-LoRA (one LoRA on both B-LoRA blocks, as the paper trains it)": ("subject", {"layers": "blora", "conv_rank": 0}),
}
# what the page needs from every run: a CSV log for the chart, a state to continue from, samples per epoch
# set by the page itself (dataset picker, run name, the continue button), so not in the form
PAGE_SET = ("dataset.train_data_dir", "training.output_dir", "training.output_name", "training.resume")
# options naming files or folders a run reads or writes besides those: each is confined to the workspace
MODEL_FILES = ("model.ae", "model.clip_l", "model.t5xxl", "model.tokenizers")
# LyCORIS's built-in presets (lycoris.config.PRESET, which the page does not import; a test keeps the two equal):
# any other network.lycoris_preset is a preset TOML file the run reads, so it is confined like the paths above
LYCORIS_PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only",
                   "unet-convblock-only", "ia3")  # fmt: skip
# held from "is this run folder free?" to the job file that takes it: two browser tabs clicking at once (gradio runs
# the clicks in parallel threads) must not both find it free
_QUEUEING = threading.Lock()
RUN_DEFAULTS = {"training.logging": "csv", "training.save_state": True, "training.sample_every_n_epochs": 1,
                "training.save_every_n_epochs": 1}  # fmt: skip


def shown(value: typing.Any) -> str | bool:
    """A config value as the form shows it (TOML-like text; booleans stay booleans)."""
    if value is dataclasses.MISSING or value is None:
        return ""
    if isinstance(value, bool):
        return value
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (list, tuple)):
        return json.dumps([v.as_posix() if isinstance(v, Path) else v for v in value])
    return str(value)


def preset_values(preset: str) -> dict[str, typing.Any]:
    """The form values of a preset: the world recipe's `TrainConfig` (as `lorafuse.train.world_personalize` trains it)."""
    kind, settings = PRESETS[preset]
    flat = HELPER.call(tasks.preset_values, kind, settings)
    for key in ("dataset.train_data_dir", "training.output_dir", "training.output_name"):
        flat.pop(key, None)
    prompt = "a photo of a sks teapot" if kind == "subject" else "a photo of a red mug, in sks style"
    flat.update(RUN_DEFAULTS, **{"training.sample_prompts": [prompt], "training.sample_steps": 10})
    return flat


def _component(opt: Option):
    label = f"{opt.name}"
    info = (opt.doc + " " if opt.doc else "") + f"[{opt.key}]"
    elem = f"opt-{opt.table}-{opt.name}"
    if opt.is_bool:
        return gr.Checkbox(value=bool(opt.default is True), label=label, info=info, elem_id=elem, min_width=240)
    if typing.get_origin(opt.type) is typing.Literal:
        choices = [str(c) for c in typing.get_args(opt.type)]
        return gr.Dropdown(choices, value=shown(opt.default) or None, label=label, info=info, elem_id=elem,
                           min_width=240)  # fmt: skip
    return gr.Textbox(value=shown(opt.default), label=label, info=info, elem_id=elem, min_width=240,
                      placeholder="unset" if opt.default in (None, dataclasses.MISSING) else None)  # fmt: skip


def overrides_from_form(opts: list[Option], values: list) -> dict[str, str]:
    """Only what differs from the defaults, as the override strings `lorafuse train --set` takes."""
    out = {}
    for opt, value in zip(opts, values, strict=True):
        if opt.is_bool:
            if bool(value) != bool(opt.default is True):
                out[opt.key] = "true" if value else "false"
            continue
        text = "" if value is None else str(value).strip()
        if text != shown(opt.default) and text != "":
            out[opt.key] = text
    return out


def flags(overrides: dict[str, str]) -> list[str]:
    """The kohya-named flags of `lorafuse train` for these overrides."""
    argv = []
    for key, value in overrides.items():
        name = key.split(".", 1)[1]
        argv += [f"--{name}", *_list_or_text(value)]
    return [str(a) for a in argv]


def _list_or_text(value: str) -> list:
    """A list field's JSON text as its items; a text field that merely starts with '[' stays one value."""
    if value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError:
            return [value]
        return items if isinstance(items, list) else [value]
    return [value]


def latest_state(run_dir: Path) -> Path | None:
    """The newest resumable state folder of a run (by its saved step), as `lorafuse train` reads it."""
    found = HELPER.call(tasks.latest_state, str(run_dir))
    return Path(found) if found else None


def checked_paths(ws: Workspace, opts: list[Option], over: dict[str, str]) -> dict[str, str]:
    """The form's path options resolved inside the workspace (`..`, absolute paths and symlinks out refused, as
    everywhere on the page), as workspace-relative paths; the base model may also be a built-in name."""
    paths = {o.key for o in opts if "Path" in str(o.type)} | set(MODEL_FILES)
    out = dict(over)
    for key, value in over.items():
        if key == "model.pretrained_model_name_or_path":
            out[key] = ws.base_model(value, key)
        elif key == "dataset.cache_dir":  # written by the run: may not exist yet
            try:
                out[key] = ws.relative(ws.resolve(value))
            except UserInputError as e:
                raise type(e)(f"{key}: {e}") from None
        elif key in paths or (key == "network.lycoris_preset" and value not in LYCORIS_PRESETS):
            out[key] = ws.input_file(value, key)
    return out


def config_for(ws: Workspace, opts: list[Option], dataset: str, name: str, values: list) -> tuple[Path, str, str, str]:
    return _config_for(ws, opts, dataset, name, values)[:4]


def _config_for(ws: Workspace, opts: list[Option], dataset: str, name: str, values: list):
    """(run folder, config path, config TOML, equivalent commands) of the form's values, checked as the CLI checks
    them (unknown keys, types, ranges) in the helper process."""
    if not dataset:
        raise UserInputError("choose a dataset first (Dataset tab)")
    run = ws.resolve(f"runs/{ws.folder_name(name, 'run name')}")
    dataset = ws.input_file(dataset, "dataset")  # also: no symlink inside it leads out
    over = overrides_from_form(opts, values)
    for opt in opts:  # said as the form's field, not as "missing required key 'model'" of the config behind it
        if opt.default is dataclasses.MISSING and opt.key not in over:
            raise UserInputError(f"{opt.key}: required; fill it in (or apply a preset)")
    over = checked_paths(ws, opts, over)
    inputs = [dataset, *(v for k, v in over.items() if _is_input(opts, k, v))]
    over.update({"dataset.train_data_dir": dataset, "training.output_dir": ws.relative(run),
                 "training.output_name": name})  # fmt: skip
    text, _model = HELPER.call(tasks.train_config_toml, over)
    path = f"{ws.relative(run)}/config.toml"
    cmd = f"lorafuse train {path}\n# or, with kohya-named flags:\nlorafuse train {shlex.join(flags(over))}"
    return run, path, text, cmd, inputs


def _is_input(opts: list[Option], key: str, value: str) -> bool:
    """A path option the run reads (not the cache it writes, not a built-in base name)."""
    if key == "model.pretrained_model_name_or_path":
        return value not in BUILTIN_BASES
    if key == "network.lycoris_preset":
        return value not in LYCORIS_PRESETS
    return key != "dataset.cache_dir" and (key in MODEL_FILES or any(o.key == key and "Path" in str(o.type) for o in opts))


def build(ws: Workspace, store: JobStore, dataset_picker) -> dict:
    form = _form(ws, store)
    with gr.Accordion("Runs: live loss and LR, samples per epoch, stop and continue", open=True):
        run_pick = _runs(ws, store)
    # a queued run is shown at once in the monitor
    form["queued_event"].then(lambda j: gr.update(choices=train_jobs(store), value=j) if j else gr.update(),
                              form["job"], run_pick)  # fmt: skip
    dataset_picker.change(lambda v: choices_or(ws.list_dirs("datasets"), v), dataset_picker, form["dataset"])
    return {"run_pick": run_pick, "dataset": form["dataset"]}


def _form(ws: Workspace, store: JobStore) -> dict:
    """Presets, the generated option form, the equivalent command and TOML, and "Add to queue"."""
    opts = [o for o in options() if o.key not in PAGE_SET]
    with gr.Row():
        preset = gr.Dropdown(list(PRESETS), value=list(PRESETS)[0], label="preset", elem_id="train-preset")
        dataset = gr.Dropdown(ws.list_dirs("datasets"), label="dataset (datasets/...)", elem_id="train-dataset",
                              allow_custom_value=True)  # fmt: skip
        run_name = gr.Textbox(value="my_lora", label="run name (runs/NAME)", elem_id="train-name")
        apply = gr.Button("Apply preset", elem_id="train-apply")
    applied = gr.Markdown(elem_id="train-applied")
    components = []
    for table in dict.fromkeys(o.table for o in opts):
        with gr.Accordion(f"[{table}]", open=table == "training"):
            with gr.Row(equal_height=False):
                components += [_component(opt) for opt in opts if opt.table == table]
    with gr.Row():
        show = gr.Button("Show command and TOML", elem_id="train-show")
        queue = gr.Button("Add to queue", variant="primary", elem_id="train-queue")
    queued = gr.Markdown(elem_id="train-queued")
    job = gr.State("")
    with gr.Row():
        command = gr.Code(label="equivalent command", language="shell", elem_id="train-command")
        toml = gr.Code(label="config TOML", elem_id="train-toml")

    def on_apply(preset):
        try:
            values = preset_values(preset)
        except (UserInputError, RuntimeError, KeyError) as e:  # the form keeps its values; the reason is said
            return [*(gr.update() for _ in opts), error_md(e)]
        updates = [gr.update(value=shown(values[o.key]) if o.key in values else shown(o.default)) for o in opts]
        return [*updates, f"applied preset: {preset}"]  # said once the form holds its values

    def on_show(dataset, name, *values):
        try:
            _, _, text, cmd = config_for(ws, opts, dataset, name, list(values))
        except UserInputError as e:  # on the page under the buttons, as "Add to queue" says it
            return error_md(e), gr.update(), gr.update()
        return "", cmd, text

    def on_queue(dataset, name, *values):
        try:
            run, path, text, cmd, inputs = _config_for(ws, opts, dataset, name, list(values))
            rel = ws.relative(run)
            with _QUEUEING:
                refuse_busy_run(store, rel)
                atomic_write_text(run / "config.toml", text)
                new = store.submit("train", f"train {run.name}", ["train", path],
                                   {"run": rel, "config": path, "csv": f"{rel}/logs/{run.name}.csv",
                                    "samples": f"{rel}/samples", "config_sha256": _sha256(text.encode())},
                                   inputs=inputs)  # fmt: skip
        except UserInputError as e:  # shown where the user looks, as the CLI prints it
            return error_md(e), gr.update(), gr.update(), ""
        store.ensure_worker()
        return f"queued `{new.id}`: `{new.command}`", cmd, text, new.id

    apply.click(on_apply, preset, [*components, applied])
    show.click(on_show, [dataset, run_name, *components], [queued, command, toml])
    queued_event = queue.click(on_queue, [dataset, run_name, *components], [queued, command, toml, job])
    return {"dataset": dataset, "queued_event": queued_event, "job": job}


def _runs(ws: Workspace, store: JobStore) -> gr.Dropdown:
    """The run monitor: status, loss and LR charts, samples; stop (saving a state) and continue."""
    with gr.Row():
        run_pick = gr.Dropdown(train_jobs(store), label="training job", elem_id="run-pick", allow_custom_value=True)
        stop = gr.Button("Stop (save state)", elem_id="run-stop")
        cont = gr.Button("Continue", elem_id="run-continue")
    said = gr.Markdown(elem_id="run-said")  # replies to stop / continue (the status line is redrawn every 2 s)
    run_status = gr.Markdown(elem_id="run-status")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="value", color="series", title="loss", elem_id="loss-plot", height=260)
        lr_plot = gr.LinePlot(x="step", y="value", color="series", title="learning rate", elem_id="lr-plot",
                              height=260)  # fmt: skip
    samples = gr.Gallery(label="samples per epoch", columns=4, height=260, elem_id="run-samples")

    def on_stop(job_id):
        try:
            if not job_id:
                raise UserInputError("choose a training job first")
            return store.request_stop(job_id)
        except UserInputError as e:
            return error_md(e)

    def on_continue(job_id):
        try:
            with _QUEUEING:
                job, state = continuable(ws, store, job_id)
                argv = ["train", job.outputs["config"], "--set", f"training.resume={ws.relative(state)}"]
                new = store.submit("train", f"{job.title} (continued)", argv, job.outputs, continue_of=job.id,
                                   inputs=[*job.inputs, ws.relative(state)])  # fmt: skip
        except UserInputError as e:
            return error_md(e), gr.update()
        store.ensure_worker()
        return f"queued `{new.id}`: `{new.command}`", gr.update(choices=train_jobs(store), value=new.id)

    stop.click(on_stop, run_pick, said)
    cont.click(on_continue, run_pick, [said, run_pick])
    gr.Timer(2.0).tick(lambda j: monitor(ws, store, j), run_pick, [run_status, loss_plot, lr_plot, samples])
    return run_pick


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def refuse_busy_run(store: JobStore, run: str) -> None:
    """A run folder is written by one job at a time: a second run queued under the same name would rewrite the
    config.toml the first is queued with (it then trains with the second one's settings) and mix their files."""
    for view in store.views():
        if view.job.kind == "train" and view.job.outputs.get("run") == run and view.status in ("queued", "running"):
            raise UserInputError(f"{run}: job {view.job.id} ({view.status}) trains into this folder; choose another "
                                 "run name, or stop or cancel that job first")  # fmt: skip


def continuable(ws: Workspace, store: JobStore, job_id: str | None):
    """(the job, its run's newest state) for "Continue", or the reason it cannot continue."""
    if not job_id:
        raise UserInputError("choose a training job first")
    job = store.load(job_id)
    if job.kind != "train" or not {"run", "config"} <= job.outputs.keys():
        raise UserInputError(f"job {job_id} is not a training job; only a training run continues")
    status = store.view(job).status
    if status in ("queued", "running"):
        raise UserInputError(f"job {job_id} is {status}; stop it first")
    if status in ("cancelled", "unreadable"):  # it never ran: a state in its folder would be another run's
        raise UserInputError(f"job {job_id} is {status}: it never ran, so there is nothing of it to continue; "
                             "queue the run again instead")  # fmt: skip
    refuse_busy_run(store, job.outputs["run"])
    config = ws.resolve(job.outputs["config"])
    try:
        now = _sha256(config.read_bytes())
    except OSError as e:
        raise UserInputError(f"{job.outputs['config']}: cannot be read ({e.strerror or e}); queue a new run") from None
    if job.outputs.get("config_sha256", now) != now:  # jobs queued before the page recorded it: not checked
        raise UserInputError(f"{job.outputs['config']} changed since job {job_id} was queued (a later run under the "
                             "same name?); continuing would resume with other settings, so queue a new run instead")  # fmt: skip
    state = latest_state(ws.resolve(job.outputs["run"]))
    if state is None:
        raise UserInputError(f"{job.outputs['run']}: no saved state to continue from (the run stopped before its "
                             "first save); queue it again instead")  # fmt: skip
    return job, state


def train_jobs(store: JobStore) -> list[str]:
    return [j.id for j in store.jobs() if j.kind == "train"][::-1]


def monitor(ws: Workspace, store: JobStore, job_id: str | None):
    """Status line, loss and LR frames from the run's CSV log, and the sample grids so far. A plot gets None,
    never an empty frame, until there are rows: gradio fixes the colour encoding on the first frame it sees,
    and an empty one would make the series a number scale (no lines drawn afterwards)."""
    import pandas as pd

    if not job_id:
        return "", None, None, []
    try:
        view = store.view(store.load(job_id))
    except UserInputError as e:
        return f"error: {e}", None, None, []
    out = view.job.outputs
    if view.job.kind != "train" or not {"csv", "samples"} <= out.keys():  # an id typed in: a fuse job, say
        return error_md(f"job {job_id} is not a training job (see the Jobs tab)"), None, None, []
    text = f"**{view.status}** {view.progress}  \n`{view.job.command}`" + (f"  \n{error_md(view.error)}" if view.error else "")
    csv = ws.resolve(out["csv"])
    loss = lr = None
    rows = []
    if csv.is_file():
        from lorafuse.train.run_log import read_rows

        try:
            rows = read_rows(csv)
        except (OSError, ValueError, KeyError):
            rows = []
    if rows:
        def frame(keys):
            found = [{"step": r["step"], "value": r[k], "series": k} for r in rows for k in keys if k in r]
            return pd.DataFrame(found) if found else None

        loss, lr = frame(("loss", "loss_avg")), frame(("lr_unet", "lr_text_encoder"))
        text += f"  \nstep {int(rows[-1]['step'])}, loss {rows[-1]['loss']:.4f}"
    folder = ws.resolve(out["samples"])
    grids = sorted(p for p in folder.glob("*.png") if not hidden(p)) if folder.is_dir() else []
    return text, loss, lr, [(str(p), p.stem) for p in grids]
