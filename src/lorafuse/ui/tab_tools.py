"""LoRA tools tab: inspect, convert, merge, resize (in the helper process: they take seconds) and bake (a job): each the
`lorafuse` command of that name, its output shown as printed and its error as the CLI's one line."""

from __future__ import annotations

import gradio as gr

from lorafuse.errors import UserInputError
from lorafuse.ui.common import choices_or, error_md, number, run_cli, split_list
from lorafuse.ui.jobs import JobStore
from lorafuse.ui.workspace import BUILTIN_BASES, Workspace

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
BASES = ["world", "sd15-tiny", "sdxl-tiny"]


def lora_files(ws: Workspace) -> list[str]:
    return [p for p in ws.list_files(".", LORA_SUFFIXES) if not p.startswith("jobs/") and "-state/" not in p]


def checked(ws: Workspace, path: str, *, must_exist: bool = True) -> str:
    """A workspace path for the CLI, refused if it leaves the workspace or is a pickle without the opt-in; an
    input must exist, an output (`must_exist=False`) is the command's to check."""
    if not (path or "").strip():
        raise UserInputError("choose a file first" if must_exist else "out: give a path for the output")
    resolved = ws.resolve(path, must_exist=must_exist)
    if must_exist:
        ws.check_pickle(resolved)
    return ws.relative(resolved)


def pickle_flag(ws: Workspace) -> list[str]:
    return ["--allow-pickle"] if ws.allow_pickle else []


def _forms(files: list[str]) -> dict:
    """One sub-tab per tool: its settings and its button."""
    with gr.Tabs():
        with gr.Tab("inspect"):
            inspect_btn = gr.Button("Inspect", elem_id="tools-inspect")
        with gr.Tab("convert"):
            with gr.Row():
                to = gr.Dropdown(["kohya", "diffusers"], value="kohya", label="to", elem_id="tools-convert-to")
                arch = gr.Dropdown(["sd15", "sdxl", "world"], value="world", label="arch")
                conv_out = gr.Textbox(value="loras/converted.safetensors", label="out", elem_id="tools-convert-out")
            convert_btn = gr.Button("Convert", elem_id="tools-convert")
        with gr.Tab("merge"):
            with gr.Row():
                others = gr.Dropdown(files, multiselect=True, label="more LoRA files", allow_custom_value=True,
                                     elem_id="tools-merge-more")  # fmt: skip
                weights = gr.Textbox(value="", label="weights (one per file, default all 1)")
                merge_out = gr.Textbox(value="loras/merged.safetensors", label="out", elem_id="tools-merge-out")
            merge_btn = gr.Button("Merge", elem_id="tools-merge")
        with gr.Tab("resize"):
            with gr.Row():
                rank = gr.Number(value=4, precision=0, label="rank", elem_id="tools-resize-rank")
                resize_out = gr.Textbox(value="loras/resized.safetensors", label="out", elem_id="tools-resize-out")
            resize_btn = gr.Button("Resize", elem_id="tools-resize")
        with gr.Tab("bake"):
            with gr.Row():
                weight = gr.Number(value=1.0, label="LoRA weight")
                bake_out = gr.Textbox(value="bases/baked", label="out (a new pipeline folder)", elem_id="tools-bake-out")
            bake_btn = gr.Button("Bake (queued as a job)", elem_id="tools-bake")
    return {"inspect": inspect_btn, "convert": convert_btn, "to": to, "arch": arch, "conv_out": conv_out,
            "merge": merge_btn, "others": others, "weights": weights, "merge_out": merge_out, "resize": resize_btn,
            "rank": rank, "resize_out": resize_out, "bake": bake_btn, "weight": weight, "bake_out": bake_out}  # fmt: skip


def build(ws: Workspace, store: JobStore) -> dict:
    files = lora_files(ws)
    gr.Markdown("Every button runs the `lorafuse` command shown under it; paths are relative to the workspace.")
    with gr.Row():
        lora = gr.Dropdown(files, label="LoRA file", allow_custom_value=True, elem_id="tools-lora")
        base = gr.Dropdown(BASES, value="world", label="base (coverage check / bake)", allow_custom_value=True)
        refresh = gr.Button("Refresh", size="sm")
    ui = _forms(files)
    result = gr.Markdown(elem_id="tools-result")
    output = gr.Textbox(label="output", lines=12, elem_id="tools-output")

    def run(argv):
        r = run_cli(argv, ws.root)
        return r.markdown(), r.out if r.ok else r.error

    def guarded(make_argv):
        def handler(*args):
            try:
                argv = make_argv(*args)
            except UserInputError as e:
                return error_md(e), f"error: {e}"
            if argv[0] == "bake":
                inputs = [argv[argv.index("--lora") + 1], argv[argv.index("--base") + 1]]
                job = store.submit("bake", f"bake {argv[-1]}", argv, {"dir": argv[-1]},
                                   inputs=[p for p in inputs if p not in BUILTIN_BASES])  # fmt: skip
                store.ensure_worker()
                return f"queued `{job.id}`: `{job.command}`", ""
            return run(argv)

        return handler

    def base_arg(b):
        return ws.base_model(b)

    ui["inspect"].click(guarded(lambda f, b: ["inspect", checked(ws, f), *(["--base", base_arg(b)] if b else []),
                                            *pickle_flag(ws)]), [lora, base], [result, output])  # fmt: skip
    ui["convert"].click(guarded(lambda f, t, a, o: ["convert", checked(ws, f), "--to", t, "--arch", a, "--out",
                                                  checked(ws, o, must_exist=False), *pickle_flag(ws)]),
                      [lora, ui["to"], ui["arch"], ui["conv_out"]], [result, output])  # fmt: skip
    ui["merge"].click(guarded(lambda f, more, w, o: ["merge", checked(ws, f), *[checked(ws, m) for m in more or []],
                                                   *(["--weights", *map(str, split_list(w, float))] if w.strip() else []),
                                                   "--out", checked(ws, o, must_exist=False), *pickle_flag(ws)]),
                    [lora, ui["others"], ui["weights"], ui["merge_out"]], [result, output])  # fmt: skip
    ui["resize"].click(guarded(lambda f, r, o: ["resize", checked(ws, f), "--rank", str(number(r, "rank")), "--out",
                                              checked(ws, o, must_exist=False), *pickle_flag(ws)]),
                     [lora, ui["rank"], ui["resize_out"]], [result, output])  # fmt: skip
    ui["bake"].click(guarded(lambda f, b, w, o: ["bake", "--base", base_arg(b), "--lora", checked(ws, f),
                                               str(number(w, "LoRA weight", kind=float)),
                                               *pickle_flag(ws), "--out", checked(ws, o, must_exist=False)]),
                   [lora, base, ui["weight"], ui["bake_out"]], [result, output])  # fmt: skip

    def on_refresh(current, more):
        names = lora_files(ws)
        return choices_or(names, current), gr.update(choices=names)

    refresh.click(on_refresh, [lora, ui["others"]], [lora, ui["others"]])
    return {}
