"""Runs one job: `python -m lorafuse.ui.runner WORKSPACE JOB_ID` is `lorafuse <argv>` run in the workspace,
whose exit status it records in jobs/<id>.rc (so any later process can tell how the job ended)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from lorafuse.ui.jobs import JobStore
from lorafuse.utils.atomic import atomic_write_text


def run(root: Path, job_id: str) -> int:
    store = JobStore(root)
    job = store.load(job_id)
    os.chdir(root)
    print(f"$ {job.command}", flush=True)
    from lorafuse.cli.main import main

    try:
        code = main(job.argv)
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
