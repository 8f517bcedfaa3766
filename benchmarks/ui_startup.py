"""How long does `lorafuse ui` take from the command to its first HTTP 200, next to a bare gradio page?

Each round starts, in a fresh subprocess and a fresh workspace, `lorafuse ui` and then a one-button gradio app
launched the same way (loopback, no analytics); the time is from `Popen` to the first 200 on `/`. The ratio
lorafuse / bare gradio is what lorafuse's own start-up costs (torch, the fusion registry, building six tabs) on
top of gradio's; rounds interleave the two so load from other processes falls on both.

    OMP_NUM_THREADS=1 python -m benchmarks.ui_startup [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
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


def _free_port() -> int:
    from lorafuse.ui.server import free_port

    return free_port()


def time_to_200(argv: list[str], port: int, timeout: float = 600.0) -> float:
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv}: exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(argv)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ui, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "bare.py"
        script.write_text(BARE)
        for k in range(args.rounds):
            port = _free_port()
            ui.append(time_to_200([sys.executable, "-m", "lorafuse", "ui", "--workspace", f"{tmp}/ws{k}",
                                   "--port", str(port)], port))  # fmt: skip
            port = _free_port()
            bare.append(time_to_200([sys.executable, str(script), str(port)], port))
            print(f"round {k + 1}: lorafuse ui {ui[-1]:.1f} s, bare gradio {bare[-1]:.1f} s", flush=True)
    ratios = [u / b for u, b in zip(ui, bare, strict=True)]
    figures = {"lorafuse_ui_s": statistics.median(ui), "bare_gradio_s": statistics.median(bare),
               "ratio": statistics.median(ratios), "rounds_ui_s": ui, "rounds_bare_s": bare}  # fmt: skip
    print_table(["what", "median s to first HTTP 200"],
                [["lorafuse ui", figures["lorafuse_ui_s"]], ["bare gradio page", figures["bare_gradio_s"]],
                 ["ratio (median of rounds)", figures["ratio"]]])  # fmt: skip
    write_result("ui_startup", {"rounds": args.rounds}, figures)


if __name__ == "__main__":
    main()
