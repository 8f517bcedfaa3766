"""Stopping a run cleanly: SIGINT (Ctrl-C in a terminal, the web UI's stop button) during training ends the
current optimizer step, saves a resumable state beside the outputs and returns; `training.resume` continues it.
A second Ctrl-C interrupts at once, as usual."""

from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def install(self) -> StopRequest:
        # signal handlers can only be set from the main thread (a notebook's worker thread keeps Ctrl-C as is)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second Ctrl-C: give up on the clean stop
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: saving a resumable state after this step (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)  # fmt: skip

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
