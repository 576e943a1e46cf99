"""SIGTERM and SIGINT as a ``threading.Event`` a long-running process stops on.

The Event is set by a thread of its own, never by the signal handler. A handler runs in the
main thread between two bytecodes, which may be inside ``stopping.wait()`` while that thread
holds the Event's lock; ``Event.set()`` there waits on that lock for ever, and the process
never stops. Python's own C handler writes the signal's number to a pipe (``set_wakeup_fd``),
and a thread reading the pipe sets the Event.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals(stopping: threading.Event, log: logging.Logger) -> None:
    """From now on SIGTERM and SIGINT set ``stopping`` (call from the main thread)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _carried_by_the_pipe)

    def relay() -> None:
        while True:
            for signum in os.read(read_fd, 64):
                if signum in STOP_SIGNALS:
                    log.info("%s: finishing the batch in hand", signal.Signals(signum).name)
                    stopping.set()

    threading.Thread(target=relay, name="spillover-stop-signals", daemon=True).start()


def _carried_by_the_pipe(_signum: int, _frame: object) -> None:
    """Installed so the signal does not end the process; its number reaches ``relay`` through the pipe."""
