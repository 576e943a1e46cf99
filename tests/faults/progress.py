"""How far a fault-test producer process is, in a file a test reads (see checks.Producers)."""

from __future__ import annotations

import os


class Progress:
    """Writes "enqueued spilled" over the file after every job; the test stops it with PATH.stop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT) if path else None

    def report(self, enqueued: int, spilled: int) -> bool:
        """Record the counts; False once the test has asked this producer to stop."""
        if self._fd is None:
            return True
        os.pwrite(self._fd, f"{enqueued:>10} {spilled:>10}\n".encode(), 0)
        return not os.path.exists(self.path + ".stop")
