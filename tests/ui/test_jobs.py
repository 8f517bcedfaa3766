"""Jobs: queued `lorafuse` command lines, their status read back from files by any later process (a restarted
`lorafuse ui` finds the queue, finished runs and a running job), progress from tqdm, the CLI's error line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lorafuse.errors import UserInputError
from lorafuse.ui.jobs import JobStore, last_error, tqdm_progress
from lorafuse.utils.atomic import atomic_write_text


def _wait(predicate, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_status_is_read_back_from_the_files(tmp_path):
    store = JobStore(tmp_path)
    a = store.submit("world", "list", ["world", "list"])
    b = store.submit("world", "render", ["world", "render", "teapot_08"])
    assert a.command == "lorafuse world list"
    assert [v.status for v in JobStore(tmp_path).views()] == ["queued", "queued"]  # a fresh store: a restart
    assert store.next_queued().id == a.id

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        atomic_write_text(store.path(a.id, "start"), json.dumps({"pid": sleeper.pid, "time": time.time()}))
        assert JobStore(tmp_path).view(a).status == "running"
        assert store.next_queued().id == b.id
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
        assert JobStore(tmp_path).view(a).status == "interrupted"  # died without an exit status
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
    atomic_write_text(store.path(a.id, "rc"), json.dumps({"returncode": 0}))
    assert store.view(a).status == "done"
    assert store.request_stop(b.id) == f"cancelled {b.id}"
    assert store.view(b).status == "cancelled" and store.next_queued() is None
    with pytest.raises(UserInputError, match="already ended"):
        store.request_stop(a.id)
    with pytest.raises(UserInputError, match="not a job id"):
        store.load("../x")


def test_progress_and_error_lines():
    log = "steps:  10%|█         | 1/10 [00:01<00:09]\rsteps:  40%|████      | 4/10 [00:02<00:03, loss=0.1]"
    assert tqdm_progress(log) == "steps 4/10 (40%)"
    assert tqdm_progress("no bar here") == ""
    log = "Traceback ...\nlorafuse world: error: give exactly one of --subject NAME or --style NAME\n"
    assert last_error(log) == "lorafuse world: error: give exactly one of --subject NAME or --style NAME"


@pytest.mark.parametrize("fork", ["1", "0"], ids=["forked", "spawned"])
def test_worker_runs_the_queue_one_at_a_time(tmp_path, monkeypatch, fork):
    monkeypatch.setenv("LORAFUSE_UI_FORK", fork)  # the worker forks each job; where it cannot, it spawns one
    store = JobStore(tmp_path)
    ok = store.submit("dataset", "world dataset", ["world", "dataset", "datasets/t", "--subject", "teapot_08",
                                                   "--n", "1"])  # fmt: skip
    bad = store.submit("dataset", "bad", ["world", "dataset", "datasets/u"])
    worker = store.ensure_worker()
    assert worker is not None
    try:
        _wait(lambda: store.view(bad).status in ("done", "failed"))
        assert store.ensure_worker() is None or store.next_queued() is None  # never a second worker
        assert store.view(ok).status == "done"
        assert (tmp_path / "datasets" / "t" / "10_sks teapot" / "000.png").is_file()  # cwd is the workspace
        view = JobStore(tmp_path).view(bad)
        assert view.status == "failed" and view.returncode == 2
        assert view.error == "lorafuse world: error: give exactly one of --subject NAME or --style NAME"
        starts = [json.loads(store.path(j.id, "start").read_text())["time"] for j in (ok, bad)]
        ends = [json.loads(store.path(j.id, "rc").read_text())["time"] for j in (ok, bad)]
        assert ends[0] <= starts[1]  # one at a time, in order
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_unreadable_state_files_are_listed_not_fatal(tmp_path):
    """A half-written or hand-edited file in jobs/ neither stops the page from listing the others nor the worker
    from running them; the bad job is shown as unreadable, with the file and the reason, and never run."""
    store = JobStore(tmp_path)
    good = store.submit("world", "list", ["world", "list"])
    (store.dir / "20200101-000000-000-train.json").write_text('{"id": "20200101-000000-000-tr')  # cut off
    (store.dir / "20200101-000000-001-train.json").write_text('{"id": "20200101-000000-001-train"}')  # fields missing
    (store.dir / "20200101-000000-002-train.json").write_bytes(b"\xff\xfe\x00")  # not even text
    views = JobStore(tmp_path).views()
    assert [v.status for v in views] == ["unreadable"] * 3 + ["queued"]
    assert views[0].error.startswith("jobs/20200101-000000-000-train.json: not a readable job file")
    assert store.next_queued().id == good.id
    with pytest.raises(UserInputError, match="not a readable job file"):
        store.request_stop("20200101-000000-000-train")
    # the small state files: unreadable ones mean "it started" / "it ended", never a crash
    store.path(good.id, "start").write_text("[]")
    assert store.view(good).status == "interrupted"
    store.path(good.id, "rc").write_text('{"code": 0}')
    view = store.view(good)
    assert view.status == "failed" and view.error == f"jobs/{good.id}.rc: unreadable exit status"


def test_a_pid_taken_by_another_program_is_not_the_job(tmp_path):
    """After a reboot a job's recorded pid can belong to another process: the job is not "running" then (or the
    queue would wait for it forever)."""
    store = JobStore(tmp_path)
    job = store.submit("world", "list", ["world", "list"])
    atomic_write_text(store.path(job.id, "start"), json.dumps({"pid": os.getpid(), "time": time.time()}))
    assert store.view(job).status == "running"
    atomic_write_text(store.path(job.id, "start"), json.dumps({"pid": os.getpid(), "time": time.time() - 3600}))
    assert store.view(job).status == "interrupted"  # this process began long after the job's start


def test_a_job_killed_by_a_signal_says_so_and_a_dead_worker_is_replaced(tmp_path):
    """kill -9 of the job's process: the worker records it as failed with the reason, and the next job runs. kill
    -9 of the worker: the page's keeper starts a new one for the jobs still waiting."""
    import threading

    from lorafuse.ui.app import keep_worker

    stop = threading.Event()
    store = JobStore(tmp_path)
    # far more images than it can render before the kill (about 100 a second)
    slow = store.submit("dataset", "slow", ["world", "dataset", "datasets/t", "--subject", "teapot_08", "--n", "100000"])
    worker = store.ensure_worker()
    try:
        _wait(lambda: store.view(slow).status == "running")
        os.kill(store.view(slow).pid, signal.SIGKILL)
        _wait(lambda: store.view(slow).status == "failed")
        assert "killed by SIGKILL" in store.view(slow).error
        # now the worker itself: killed while idle; a job queued afterwards still runs (the keeper's restart)
        os.kill(worker, signal.SIGKILL)
        _wait(lambda: not store.worker_alive())
        later = store.submit("world", "list", ["world", "list"])
        threading.Thread(target=keep_worker, args=(store, 0.2, stop), daemon=True).start()
        _wait(lambda: store.view(later).status == "done")
    finally:
        stop.set()
        pid = json.loads((store.dir / "worker.pid").read_text())["pid"]
        for p in {worker, pid}:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_symlink_out_made_while_a_job_waits_is_refused_when_it_starts(tmp_path):
    """The page checks a job's inputs when it queues it; the runner checks them again just before the command
    reads them, so a dataset turned into (or given) a symlink out of the workspace meanwhile is refused."""
    from lorafuse.ui import runner

    outside = tmp_path / "outside"
    outside.mkdir()
    ws = tmp_path / "ws"
    store = JobStore(ws)
    (ws / "datasets" / "d").mkdir(parents=True)
    job = store.submit("world", "list", ["world", "list"], inputs=["datasets/d"])
    assert runner.run(ws, job.id) == 0  # unchanged: it runs
    (ws / "datasets" / "d" / "secret.png").symlink_to(outside / "secret.png")
    again = store.submit("world", "list", ["world", "list"], inputs=["datasets/d"])
    with open(store.path(again.id, "log"), "wb") as log:  # as the worker runs it: output into the job's log
        code = subprocess.run([sys.executable, "-m", "lorafuse.ui.runner", str(ws), again.id], stdout=log,
                              stderr=subprocess.STDOUT, timeout=300).returncode  # fmt: skip
    assert code == 2
    view = store.view(again)
    assert view.status == "failed" and view.error.startswith("lorafuse world: error: input: datasets/d/secret.png: "
                                                             "a symlink leads outside the workspace")  # fmt: skip
    assert view.error.endswith("(checked again as the job started)")
    assert JobStore(ws).load(again.id).inputs == ["datasets/d"]


def test_a_job_started_with_sigint_ignored_can_still_be_stopped(tmp_path, monkeypatch):
    """`nohup lorafuse ui &` leaves SIGINT ignored in the worker and every job it starts; the runner puts
    Ctrl-C's usual meaning back, so the page's stop button interrupts a job that has no stop of its own."""
    from lorafuse.cli import main as cli_main
    from lorafuse.ui import runner

    ws = tmp_path / "ws"
    store = JobStore(ws)
    job = store.submit("world", "list", ["world", "list"])
    seen = {}

    def interrupted_command(argv):
        seen["handler"] = signal.getsignal(signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the stop button, while the command runs
        time.sleep(5)  # the default handler raises KeyboardInterrupt long before this ends
        return 0

    monkeypatch.setattr(cli_main, "main", interrupted_command)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = runner.run(ws, job.id)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen["handler"] is signal.default_int_handler
    assert code == 130 and store.view(store.load(job.id)).status != "done"
