"""The page's helper process: where quick work that needs torch, diffusers or the fusion registry runs (quick
`lorafuse` command lines such as inspect / convert / merge / `train --dry-run`, the method catalogue, a config's
checks), so the page's own process never imports them and is served as soon as gradio is up.

One helper per page, started in the background when the server is up; it imports the heavy packages once,
then answers calls one at a time (a single thread: no two imports of torch/diffusers race, which in one
process made a click fail while another thread was importing). Long work does not come here: it goes to the
job queue (`jobs.py`), whose worker outlives the page. If the helper dies (a crash in a library), the call
that saw it fails with a message and the next call starts a new one.

    helper.call(fn, *args)   fn(*args) in the helper; fn is a module-level function (sent by name)
"""

from __future__ import annotations

import multiprocessing
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from lorafuse.errors import UserInputError

T = TypeVar("T")
# imported by the helper as soon as it starts, before the first call: what the quick commands need
WARM = ("lorafuse.cli.main", "lorafuse.fusion.registry", "lorafuse.fusion.options_doc", "lorafuse.lora.io",
        "lorafuse.lora.presets", "lorafuse.train.scan")  # fmt: skip


class HelperDied(UserInputError):
    """The helper process ended during a call (it is restarted on the next one)."""


def _serve(conn) -> None:
    """The helper's loop: (fn, args) in, ("ok", result) or ("error", exception or traceback text) out."""
    from lorafuse.cli.main import warm_up

    warm_up(WARM)
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):  # the page is gone
            return
        try:
            reply = ("ok", fn(*args))
        except UserInputError as e:
            reply = ("error", e)
        except BaseException:  # a bug: its traceback goes to the page's log and its message to the page
            reply = ("crash", traceback.format_exc())
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):  # the page is gone
            return
        except Exception:  # an unpicklable result is a bug of the caller; say so instead of hanging it
            conn.send(("crash", traceback.format_exc()))


class Helper:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn = None

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        # spawn, not fork: the page runs server threads, and a forked copy of a threaded process can deadlock
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), name="lorafuse-ui-helper", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            self._start()
            try:
                self._conn.send((fn, args))
                status, value = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                self._proc.join(5)
                code = self._proc.exitcode
                self._proc = None
                raise HelperDied(f"the UI's helper process ended (exit code {code}); try again") from None
        if status == "error":
            raise value
        if status == "crash":
            print(value, flush=True)  # the page's log (`lorafuse ui`'s terminal)
            raise RuntimeError(value.strip().splitlines()[-1])
        return value

    def stop(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.is_alive():
                self._conn.close()
                self._proc.join(10)
                if self._proc.is_alive():
                    self._proc.terminate()
            self._proc = None


HELPER = Helper()  # one per page process
