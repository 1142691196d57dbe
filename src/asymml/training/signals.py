"""Ctrl-C / SIGTERM during training: stop after the current step, save, exit cleanly."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["StopRequests"]


class StopRequests:
    """SIGINT/SIGTERM handler: the first signal asks the loop to stop after the current step (it then saves
    a checkpoint and exits cleanly); a second one interrupts at once."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.requested = False
        self.echo = echo
        self._old: dict[int, Any] = {}

    def request(self, signum: int = signal.SIGINT, frame: Any = None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name if signum else "stop"
        self.echo(f"\n{name}: stopping after this step and saving a checkpoint (again to abort at once)")

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self.request)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
