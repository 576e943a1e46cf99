"""The outbox tables. The migrations in ``migrations/`` build exactly this schema.

``spillover_outbox`` holds one row per spilled job: the job hash exactly as RQ
would have written it, plus what RQ keeps outside the hash (``at_front``, the
schedule), and the Redis it is meant for (``target``). Rows are replayed per
target and queue in ``id`` order and tracked per row (``state``), never by a
high-water mark, so rows committed out of order by concurrent producers are not
skipped. ``spillover_queue_lease`` says which replayer drains which queue.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
)

#: Alembic's version table for our schema: not ``alembic_version``, so the outbox
#: can live in an application's own database next to its own migrations.
VERSION_TABLE = "spillover_alembic_version"

PENDING = "pending"
DONE = "done"
DEAD = "dead"
SKIPPED = "skipped"  # unique=True: the job id was in Redis at replay

metadata = MetaData()

# SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid); Postgres gets a BIGINT identity.
_row_id = BigInteger().with_variant(Integer(), "sqlite")

outbox = Table(
    "spillover_outbox",
    metadata,
    Column("id", _row_id, primary_key=True, autoincrement=True),
    # The Redis the job is meant for (see redis_side.target_of); a replayer drains only its own
    # (targets.py). NULL: written by a 0.1 producer, or into a 0.1 schema: the outbox's replayer adopts it.
    Column("target", String(255), nullable=True),
    Column("queue", String(255), nullable=False),
    Column("job_id", String(255), nullable=False),
    # The id of the one enqueue this row stands for: its delivery marker in Redis is keyed by it
    # (redis_side.py). NULL: written by a release before 0.4, whose marker is keyed by the job id.
    Column("delivery", String(40), nullable=True),
    # RQ options the push script applies beyond the job hash (unique, group, ...): JSON, 0005.
    Column("options", Text, nullable=True),
    # The RQ job hash as netstrings: field, value, field, value ... (see stored_job.py).
    Column("job_hash", LargeBinary, nullable=False),
    Column("at_front", Boolean, nullable=False, server_default="0"),
    # enqueue_at / enqueue_in: Unix time RQ scores the scheduled registry with.
    Column("scheduled_at", BigInteger, nullable=True),
    # The direct write was attempted and its outcome is unknown: it may be in Redis.
    Column("ambiguous", Boolean, nullable=False, server_default="0"),
    Column("producer", String(64), nullable=False),
    Column("state", String(16), nullable=False, server_default=PENDING),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_spillover_outbox_target_queue_state_id", "target", "queue", "state", "id"),
    Index("ix_spillover_outbox_state_updated", "state", "updated_at"),
    # A producer leaving spill mode looks up its own pending rows.
    Index("ix_spillover_outbox_producer_state_id", "producer", "state", "id"),
    # Never reuse the id of a deleted row: ids must keep growing, as replay order and
    # a producer's "are my rows replayed" check rely on them.
    sqlite_autoincrement=True,
)

# One row per queue being drained: which replayer drains it now, and until when (Unix
# seconds, by the database's clock so that replayers on several hosts agree).
queue_lease = Table(
    "spillover_queue_lease",
    metadata,
    Column("target", String(255), primary_key=True),
    Column("queue", String(255), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
    # The fencing token of the current holder: raised with each new holder, raised in Redis before its
    # first batch (a batch with an older token writes nothing); kept when the lease is given back.
    Column("epoch", BigInteger, nullable=True),
)

# One row per running replayer, renewed every few seconds: which targets it drains, so that rows
# no running replayer drains can be reported (status, a gauge, a warning) instead of waiting silently.
replayer_registry = Table(
    "spillover_replayer",
    metadata,
    Column("holder", String(128), primary_key=True),
    Column("target", String(255), nullable=False),  # the replayer's own target name
    Column("host", String(64), nullable=False),  # where it runs: loopback and socket targets are host-local
    Column("redis_url", String(255), nullable=False),  # password masked
    # JSON list of [target, host or null]: the row groups it drains (null target: rows with no target)
    Column("claims", Text, nullable=False, server_default="[]"),
    Column("seen_at", Float, nullable=False),  # database clock, Unix seconds
)
