"""One root exception, a small hierarchy under it.

Redis errors that mean misconfiguration (bad password, no permission) are not
wrapped: they propagate as redis-py raised them, because they are not outages.
"""

from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError


class SpilloverError(Exception):
    """Root of every error spillover raises itself."""


class ConfigurationError(SpilloverError):
    """A setting, URL or argument cannot work."""


class NotInTransaction(ConfigurationError):
    """``queue.within(...)`` was used where SQLAlchemy itself would begin no transaction
    (a Session made with ``autobegin=False`` and not begun, a closed Connection).

    spillover begins a transaction only as SQLAlchemy's autobegin would, and never commits
    or rolls one back: a job written outside one would be committed by nobody.
    """

    def __init__(self, kind: str) -> None:
        begin = "session.begin()" if kind == "Session" else "connection.begin()"
        super().__init__(
            f"within(): the {kind} has no transaction open; begin one (`with {begin}:`, or write your own "
            "rows first) and enqueue inside it"
        )


class OutboxError(SpilloverError):
    """The outbox database could not do what was asked."""


class OutboxNotMigrated(OutboxError):
    """The outbox schema is missing or older than this spillover: run the migrations."""

    def __init__(self, table: str, found: str | None = None) -> None:
        problem = f"outbox table {table!r} does not exist" if found is None else found
        super().__init__(
            f"{problem}; create or update it with "
            "`spillover db upgrade --database-url URL` (or `alembic upgrade head` "
            "from the spillover checkout with SPILLOVER_DATABASE_URL set)"
        )
        self.table = table


class OutboxUnavailable(OutboxError):
    """Redis was unusable and the outbox write failed too, or did not answer in time.

    ``in_doubt`` False: the job was NOT stored. True: the INSERT was sent and no answer came
    (a stalled or failed-over database): the job may be stored, and is then replayed. Either
    way, enqueueing the same job id again from this process is safe: the retry carries the
    same delivery id, so the job reaches RQ once whichever copies were stored.

    ``redis_error`` is why the job could not go to Redis, ``outbox_error`` why it
    could not be stored; both are kept so nothing about the failure is hidden.
    """

    def __init__(
        self,
        message: str,
        *,
        redis_error: BaseException | None,
        outbox_error: BaseException,
        in_doubt: bool = False,
    ) -> None:
        super().__init__(f"{message}: redis: {redis_error!r}; outbox: {outbox_error!r}")
        self.redis_error = redis_error
        self.outbox_error = outbox_error
        self.in_doubt = in_doubt


class OutboxTimeout(SQLAlchemyError):
    """The outbox database did not answer within the time limit (``SPILLOVER_OUTBOX_TIMEOUT``).

    A SQLAlchemy error like the database's own, so code that handles those handles this.
    ``in_doubt``: a write had been sent when the time ran out, and may have been applied.
    """

    def __init__(self, message: str, *, in_doubt: bool = False) -> None:
        super().__init__(message)
        self.in_doubt = in_doubt


class BacklogFull(OutboxError):
    """The outbox holds its configured maximum of pending jobs: the job was NOT enqueued."""

    def __init__(self, pending: int, limit: int) -> None:
        super().__init__(
            f"outbox backlog is full ({pending} pending, limit {limit}); "
            "the job was not enqueued. Is spillover-replay running and Redis healthy?"
        )
        self.pending = pending
        self.limit = limit


class UpgradeLocked(OutboxError):
    """Another upgrade of the same outbox held the upgrade lock for longer than we may wait."""


class ReplayError(SpilloverError):
    """The replayer cannot proceed (for example: Redis unreachable with --once)."""
