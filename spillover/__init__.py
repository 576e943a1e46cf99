"""spillover: RQ enqueues that survive a Redis outage.

``from spillover import Queue`` instead of ``from rq import Queue``; run
``spillover-replay`` next to your workers.
"""

from typing import TYPE_CHECKING, Any

from .errors import (
    BacklogFull,
    ConfigurationError,
    NotInTransaction,
    OutboxError,
    OutboxNotMigrated,
    OutboxUnavailable,
    ReplayError,
    SpilloverError,
    UpgradeLocked,
)
from .outbox import Outbox
from .redis_side import redis_from_url

__version__ = "0.5.0"

if TYPE_CHECKING:
    from .groups import Group
    from .queue import Queue, was_spilled
    from .transaction import TransactionalQueue


def __getattr__(name: str) -> Any:
    """Queue and was_spilled load RQ on first use, so ``spillover-replay`` starts without it."""
    if name in ("Queue", "was_spilled"):
        from . import queue

        return getattr(queue, name)
    if name == "Group":
        from . import groups

        return groups.Group
    if name == "TransactionalQueue":
        from . import transaction

        return transaction.TransactionalQueue
    raise AttributeError(f"module 'spillover' has no attribute {name!r}")


__all__ = [
    "BacklogFull",
    "ConfigurationError",
    "Group",
    "NotInTransaction",
    "Outbox",
    "OutboxError",
    "OutboxNotMigrated",
    "OutboxUnavailable",
    "Queue",
    "ReplayError",
    "SpilloverError",
    "TransactionalQueue",
    "UpgradeLocked",
    "__version__",
    "redis_from_url",
    "was_spilled",
]
