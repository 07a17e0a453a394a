"""Ctrl-C (SIGINT) and SIGTERM during `fhir-crs sync`: stop promptly, never mid-write.

The first signal only sets a flag. Workers check it before they start a patient, between the
reads of a patient and right before each write-back transaction, so no new write starts after
the signal and the one in flight (a single atomic transaction) finishes. The run is recorded as
`interrupted` in the state store, the summary is printed, and the exit status is 128 + the
signal number (130 for SIGINT, 143 for SIGTERM). A second signal stops at once (the default
action of that signal); the next run finishes whatever was not done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger("fhir_crs.sync")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Raised inside a worker when a stop was requested; the patient is left for the next run."""


class StopSignal:
    """A stop flag set by SIGINT/SIGTERM (or by `request`); `check()` raises `Interrupted`."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self._event.is_set()

    def request(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
        self._event.set()

    def check(self) -> None:
        if self._event.is_set():
            raise Interrupted(self.name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "stop"

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)

    def _handle(self, signum: int, _frame: object) -> None:
        if self._event.is_set():  # a second signal: the default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.request(signum)
        log.warning("%s received: stopping — no new write starts; the write in flight finishes (again to stop at once)",
                    signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignal]:
        """Handle SIGINT/SIGTERM with this flag while the block runs (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
