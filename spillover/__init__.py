"""spillover: RQ enqueues that survive a Redis outage.

``from spillover import Queue`` instead of ``from rq import Queue``; run
``spillover-replay`` next to your workers.
"""

from .errors import (
    BacklogFull,
    ConfigurationError,
    OutboxError,
    OutboxNotMigrated,
    OutboxUnavailable,
    ReplayError,
    SpilloverError,
)
from .outbox import Outbox
from .queue import Queue, was_spilled
from .redis_side import redis_from_url

__all__ = [
    "BacklogFull",
    "ConfigurationError",
    "Outbox",
    "OutboxError",
    "OutboxNotMigrated",
    "OutboxUnavailable",
    "Queue",
    "ReplayError",
    "SpilloverError",
    "redis_from_url",
    "was_spilled",
]
