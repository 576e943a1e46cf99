"""Delivery markers that nobody will look for: deleted soon after the write they guard.

Every write into RQ sets ``spillover:delivered:<job id>`` so that a second delivery of
the same job (a late request, a replay, a second replayer) writes nothing. A marker is
needed only while a delivery may still come: for replayed rows and for direct writes
whose reply was lost. A direct write whose reply came back needs none, so producers
collect those job ids and delete their markers in one command every half second (and
when the process exits), instead of leaving ~100 bytes per job in Redis for a week.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from .settings import MARKER_PREFIX
from .sweeper import Sweeper

#: Keys per DEL command.
CHUNK = 1000


class ConfirmedMarkers(Sweeper[str]):
    """Markers of one Redis server's confirmed direct writes, waiting to be deleted."""

    name = "spillover-markers"

    def __init__(self, client: redis.Redis) -> None:
        super().__init__()
        self.client = client

    def confirmed(self, job_ids: list[str]) -> None:
        """These jobs' direct writes were acknowledged by Redis: their markers may go."""
        self.add(job_ids)

    def delete(self, job_ids: Sequence[str]) -> None:
        for start in range(0, len(job_ids), CHUNK):
            self.client.delete(*(MARKER_PREFIX + job_id for job_id in job_ids[start : start + CHUNK]))
