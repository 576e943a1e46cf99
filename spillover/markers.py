"""Markers whose delivery is no longer in doubt, settled in batches off the caller's path.

A marker must live while its row may still be sent again, and while a request carrying it
may still arrive (until that request's deadline). Once the row is gone from the outbox (or,
for a direct write whose reply came back, never existed) the marker is settled: shortened
to one delivery window, or deleted at once when no other request can carry it. Producers
and the replayer hand those deliveries to a settler, which settles them in one script call
per batch every half second (and when the process exits). A marker whose settling fails
lives for the backstop (``SPILLOVER_MARKER_TTL``): memory, never a duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence

from .pusher import Pusher
from .sweeper import Sweeper

#: Markers per script call.
CHUNK = 1000

#: (job id, delivery id or None for a row of a release before 0.4, settle at once?)
Settled = tuple[str, str | None, bool]


class Settler(Sweeper[Settled]):
    """Settles the markers of one Redis server's deliveries that are no longer in doubt."""

    name = "spillover-markers"

    def __init__(self, pusher: Pusher) -> None:
        super().__init__()
        self.pusher = pusher

    def confirmed(self, items: Sequence[tuple[str, str | None]]) -> None:
        """Direct writes whose reply came back: no row, no other request with them; delete at once."""
        self.add([(job_id, delivery, True) for job_id, delivery in items])

    def gone(self, items: Sequence[tuple[str, str | None]]) -> None:
        """Deliveries whose rows are deleted from the outbox: keep their markers one window more."""
        self.add([(job_id, delivery, False) for job_id, delivery in items])

    def delete(self, items: Sequence[Settled]) -> None:
        for at_once in (True, False):
            picked = [(job_id, delivery) for job_id, delivery, now in items if now is at_once]
            for start in range(0, len(picked), CHUNK):
                self.pusher.settle(picked[start : start + CHUNK], at_once=at_once)
