"""Progress of a long drain, for the person watching ``spillover-replay --once``.

On a terminal (and text logs), one bar per queue redrawn in place: rows left, rate, time left.
Anywhere else (a pipe, a log collector, JSON logs) a log record every few seconds instead, so
logs stay one record per line.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from typing import TextIO

from . import settings

log = logging.getLogger("spillover.replay")

#: Seconds between redraws of a bar, and between progress records in logs.
BAR_INTERVAL = 0.1
LOG_INTERVAL = 5.0
BAR_WIDTH = 30


class Progress:
    """Told how a queue's drain goes; says nothing by default (the long-running replayer)."""

    def started(self, queue: str, left: int) -> None:
        pass

    def advanced(self, queue: str, moved: int, left: int) -> None:
        pass

    def finished(self, queue: str, moved: int, complete: bool) -> None:
        """``complete``: nothing was left of the queue (else the drain stopped: lease lost, stop asked)."""


class _Tracked:
    def __init__(self, left: int) -> None:
        self.total = max(left, 1)
        self.started = time.monotonic()
        self.shown = 0.0

    def figures(self, moved: int, left: int) -> tuple[float, str]:
        """Rows per second so far, and the time left at that rate."""
        took = max(time.monotonic() - self.started, 1e-6)
        rate = moved / took
        eta = "?" if rate <= 0 else _clock(left / rate)
        return rate, eta


class BarProgress(Progress):
    """A bar per queue, redrawn in place on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._queues: dict[str, _Tracked] = {}

    def started(self, queue: str, left: int) -> None:
        self._queues[queue] = _Tracked(left)
        self._draw(queue, 0, left)

    def advanced(self, queue: str, moved: int, left: int) -> None:
        tracked = self._queues.get(queue)
        if tracked is not None and time.monotonic() - tracked.shown >= BAR_INTERVAL:
            self._draw(queue, moved, left)

    def finished(self, queue: str, moved: int, complete: bool) -> None:
        if queue in self._queues:
            if complete:
                self._draw(queue, moved, 0)
            self.stream.write("\n")
            self.stream.flush()
            del self._queues[queue]

    def _draw(self, queue: str, moved: int, left: int) -> None:
        tracked = self._queues[queue]
        tracked.total = max(tracked.total, moved + left)
        done = moved / tracked.total
        filled = int(done * BAR_WIDTH)
        rate, eta = tracked.figures(moved, left)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        line = f"{queue} [{bar}] {left:,} left, {rate:,.0f} rows/s, ETA {eta}"
        width = shutil.get_terminal_size((80, 24)).columns - 1  # a wrapped line would not be redrawn in place
        self.stream.write(f"\r{line[:width]}\x1b[K")
        self.stream.flush()
        tracked.shown = time.monotonic()


class LogProgress(Progress):
    """A log record per queue every LOG_INTERVAL seconds while it drains."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._queues: dict[str, _Tracked] = {}

    def started(self, queue: str, left: int) -> None:
        self._queues[queue] = _Tracked(left)
        self._queues[queue].shown = time.monotonic()

    def advanced(self, queue: str, moved: int, left: int) -> None:
        tracked = self._queues.get(queue)
        if tracked is not None and time.monotonic() - tracked.shown >= self.interval:
            rate, eta = tracked.figures(moved, left)
            log.info("queue %s: %d left, %.0f rows/s, ETA %s", queue, left, rate, eta)
            tracked.shown = time.monotonic()

    def finished(self, queue: str, moved: int, complete: bool) -> None:
        self._queues.pop(queue, None)


def for_once(log_format: str, stream: TextIO | None = None) -> Progress:
    """The progress `spillover-replay --once` shows: bars on a terminal with text logs, else log records."""
    stream = stream or sys.stderr
    if log_format == "text" and stream.isatty():
        return BarProgress(stream)
    return LogProgress(settings.env_float("SPILLOVER_PROGRESS_INTERVAL", LOG_INTERVAL))


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
