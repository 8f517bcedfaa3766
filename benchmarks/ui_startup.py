"""How long does `lorafuse ui` take from the command to its first HTTP 200, next to a bare gradio page?

Each round starts, in a fresh subprocess and a fresh workspace, `lorafuse ui` and then a one-button gradio app
launched the same way (loopback, no analytics); the time is from `Popen` to the first 200 on `/`. The ratio
lorafuse / bare gradio is what lorafuse's own start-up costs (building six tabs) on top of gradio's; rounds
interleave the two so load from other processes falls on both. Also timed: when `lorafuse ui` says its quick
commands are ready (its helper process has loaded torch, diffusers and the fusion registry, after the page is
up); the load average goes into the JSON, since the machine may be shared.

    OMP_NUM_THREADS=1 python -m benchmarks.ui_startup [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.common import print_table, write_result

BARE = """
import os, sys
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
import gradio as gr
with gr.Blocks() as app:
    gr.Button("go")
app.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), quiet=True, ssr_mode=False)
"""


READY = "quick commands ready"  # what `lorafuse ui` prints once its helper process has loaded torch & co


def _free_port() -> int:
    from lorafuse.ui.server import free_port

    return free_port()


def time_to_200(argv: list[str], port: int, timeout: float = 600.0, ready: str | None = None) -> tuple[float, float]:
    """(seconds to the first HTTP 200 on /, seconds until a stdout line contains `ready`; nan without one)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready_at: list[float] = []

    def watch() -> None:
        for line in proc.stdout:
            if ready and ready in line and not ready_at:
                ready_at.append(time.monotonic() - start)

    threading.Thread(target=watch, daemon=True).start()
    try:
        first = None
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv}: exited with {proc.returncode}")
            if first is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                        if r.status == 200:
                            first = time.monotonic() - start
                except OSError:
                    pass
            if first is not None and (not ready or ready_at):
                return first, ready_at[0] if ready_at else math.nan
            time.sleep(0.1)
        raise TimeoutError(argv)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ui, ready, bare = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "bare.py"
        script.write_text(BARE)
        for k in range(args.rounds):
            port = _free_port()
            page, helper = time_to_200([sys.executable, "-m", "lorafuse", "ui", "--workspace", f"{tmp}/ws{k}",
                                        "--port", str(port)], port, ready=READY)  # fmt: skip
            ui.append(page)
            ready.append(helper)
            port = _free_port()
            bare.append(time_to_200([sys.executable, str(script), str(port)], port)[0])
            print(f"round {k + 1}: lorafuse ui {ui[-1]:.1f} s (quick commands ready {ready[-1]:.1f} s), "
                  f"bare gradio {bare[-1]:.1f} s", flush=True)
    ratios = [u / b for u, b in zip(ui, bare, strict=True)]
    figures = {"lorafuse_ui_s": statistics.median(ui), "quick_commands_ready_s": statistics.median(ready),
               "bare_gradio_s": statistics.median(bare), "ratio": statistics.median(ratios), "rounds_ui_s": ui,
               "rounds_ready_s": ready, "rounds_bare_s": bare, "load_average": os.getloadavg()}  # fmt: skip
    print_table(["what", "median s"],
                [["lorafuse ui: first HTTP 200", figures["lorafuse_ui_s"]],
                 ["lorafuse ui: quick commands ready (helper loaded)", figures["quick_commands_ready_s"]],
                 ["bare gradio page: first HTTP 200", figures["bare_gradio_s"]],
                 ["ratio of first 200s (median of rounds)", figures["ratio"]]])  # fmt: skip
    write_result("ui_startup", {"rounds": args.rounds}, figures)


if __name__ == "__main__":
    main()
