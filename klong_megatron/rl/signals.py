"""SIGTERM / SIGINT handling of the RL driver (rank 0's event loop).

A signal cancels the main task at once (in-flight rollouts are dropped; judged ones are already stored),
except inside a critical section (update -> save -> state file): there the signal is remembered and the
section raises ``CancelledError`` when it ends, so a stopped run always resumes from a consistent state.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator


class StopOnSignal:
    """Cancel the task that called ``install`` on SIGTERM / SIGINT, never inside ``critical()``."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.signal: int | None = None
        """the signal that stopped the run (None: none yet)"""
        self._critical = False
        self._main: asyncio.Task | None = None

    def install(self) -> None:
        """Guard the current task (call from inside it, on the running loop)."""
        self._main = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        self.signal = sig
        self.say(f"[yellow]{signal.Signals(sig).name}: stopping (judged rollouts are kept)[/yellow]")
        if not self._critical and self._main is not None:
            self._main.cancel()

    def stop_now(self, sig: int) -> None:
        """A signal seen elsewhere (the SFT warm-up handles its own): record it and cancel."""
        self.signal = sig
        raise asyncio.CancelledError

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """No cancellation inside; a signal received meanwhile stops the run right after."""
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self.signal is not None:
            raise asyncio.CancelledError
