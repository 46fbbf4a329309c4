"""SIGINT and SIGTERM as requests the training loop honours between steps.

Raising ``KeyboardInterrupt`` wherever the signal lands could cut a checkpoint save in half; a flag
the loop checks after each step lets it finish what it is doing, save, and exit with 128 + the
signal number. A second signal while it saves means "now": it raises ``KeyboardInterrupt`` (the
last complete checkpoint is still intact, as saves are atomic).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by a signal handler (a context manager installs it) or through ``event`` (a library
    caller's, set from a callback or another thread); read by the training loop."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.signum: int | None = None
        self.event = event
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None or (self.event is not None and self.event.is_set())

    @property
    def reason(self) -> str:
        """How a run stopped by this request ends: "interrupted" (SIGINT), "terminated" (SIGTERM)
        or "stopped" (the caller's event)."""
        if self.signum is None:
            return "stopped"
        return "terminated" if self.signum == signal.SIGTERM else "interrupted"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second: stop now
            if signum == signal.SIGTERM:
                raise SystemExit(128 + signum)
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
