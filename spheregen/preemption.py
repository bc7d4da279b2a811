"""Stopping training cleanly when the cluster (or the user) asks.

SLURM, Kubernetes and most schedulers send SIGTERM (some SIGHUP) some time before they
kill a job; a user sends SIGINT. :class:`StopRequest` turns any of the three into a flag
that the trainer reads at the next step boundary, where it saves a checkpoint and exits
with :class:`spheregen.errors.Preempted`. A second signal while that checkpoint is being
written gets the default behaviour back (a second Ctrl-C stops at once).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class StopRequest:
    """Context manager: while active, SIGTERM / SIGHUP / SIGINT set ``signum`` instead of
    killing the process. Outside the main thread (where Python cannot install signal
    handlers) it does nothing and ``signum`` stays None."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        for s, handler in self._previous.items():  # the next signal acts as it normally would
            signal.signal(s, handler)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
