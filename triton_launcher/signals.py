"""SIGINT and SIGTERM as events a thread waits for, never as exceptions raised wherever the code happens to be.

A Python signal handler runs in the main thread between two bytecodes, so one that raises can surface inside
any ``try`` of the code it interrupts (a probe, a restart), where a broad ``except`` takes it for a failure.
Here the handlers do nothing: the signal's number reaches a pipe through :func:`signal.set_wakeup_fd` (written by
the C-level handler, so nothing can be lost or deadlock), and the main thread reads it when it is ready to act.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
WOKEN = 0
"""What :meth:`StopSignals.wait` returns when :meth:`StopSignals.wake` was called (no signal has number 0)."""


def _ignore(_number: int, _frame: FrameType | None) -> None:
    """A Python-level handler must exist for the wakeup fd to be written; the work is done by the reader."""


class StopSignals:
    """Install in the main thread (``with StopSignals() as signals:``); then :meth:`wait` there for the next stop
    signal, and :meth:`wake` it from any thread (e.g. when the work it waits for has ended)."""

    def __init__(self) -> None:
        self._read_fd = self._write_fd = -1
        self._previous_wakeup_fd = -1
        self._previous_handlers: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)  # set_wakeup_fd demands it: a signal handler must never block
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for number in STOP_SIGNALS:
            self._previous_handlers[number] = signal.signal(number, _ignore)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)  # type: ignore[arg-type]
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)

    def wake(self) -> None:
        """Make the waiting :meth:`wait` return :data:`WOKEN`; safe from any thread."""
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the reader
            os.write(self._write_fd, bytes([WOKEN]))

    def wait(self, timeout_s: float | None = None) -> int | None:
        """The number of the next SIGINT or SIGTERM, :data:`WOKEN`, or None after ``timeout_s`` (None: no limit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._read_fd], [], [], remaining)
            if not readable:
                return None
            for number in os.read(self._read_fd, 1):
                if number == WOKEN or number in STOP_SIGNALS:
                    return number
