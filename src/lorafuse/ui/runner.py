"""Runs one job: `python -m lorafuse.ui.runner WORKSPACE JOB_ID` is `lorafuse <argv>` run in the workspace,
whose exit status it records in jobs/<id>.rc (so any later process can tell how the job ended)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from lorafuse.errors import UserInputError
from lorafuse.ui.jobs import Job, JobStore
from lorafuse.utils.atomic import atomic_write_text


def recheck(root: Path, job: Job) -> None:
    """The job's inputs were checked when it was queued; a symlink out of the workspace made while it waited
    (in a dataset, or as the file itself) is refused now, just before the command reads them."""
    from lorafuse.ui.workspace import Workspace

    ws = Workspace(root.resolve())
    for path in job.inputs:
        ws.input_file(path, "input")


def run(root: Path, job_id: str) -> int:
    store = JobStore(root)
    job = store.load(job_id)
    os.chdir(root)
    print(f"$ {job.command}", flush=True)
    from lorafuse.cli.main import main

    # `nohup lorafuse ui &` (or any shell without job control) starts us with SIGINT ignored, and children inherit
    # that: the page's stop button would then do nothing to a fuse or grid job. Ctrl-C semantics are restored here.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        recheck(root, job)
        code = main(job.argv)
    except UserInputError as e:  # an input changed since it was queued
        print(f"lorafuse {job.argv[0] if job.argv else 'job'}: error: {e} (checked again as the job started)", flush=True)
        code = 2
    except KeyboardInterrupt:  # a stop request to a command that has no graceful stop of its own
        print("stopped", flush=True)
        code = 130
    except SystemExit as e:  # argparse errors
        code = e.code if isinstance(e.code, int) else 2
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    atomic_write_text(store.path(job_id, "rc"), json.dumps({"returncode": code, "time": time.time()}))
    return code


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), sys.argv[2]))
