"""spillover's within() against procrastinate's transactional defer, measured in the same run.

    python bench/peers.py

Needs procrastinate (the ``bench`` extra), PostgreSQL at 127.0.0.1:5432 and Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import procrastinate
import psycopg
import redis
from psycopg import sql
from sqlalchemy import create_engine, make_url
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
import jobs  # bench/jobs.py
from orders import Base, Order
from timing import alternate, per_op_us

from spillover import Queue, migrate


@contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    """A fresh database ``bench_peers_<hex>`` on ``server_url``, dropped afterwards; its SQLAlchemy URL."""
    server = make_url(server_url).set(drivername="postgresql+psycopg")
    name = f"bench_peers_{uuid.uuid4().hex[:12]}"
    admin = server.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def bench_procrastinate(pg_url: str, redis_conn: redis.Redis, n: int, rounds: int) -> tuple[float, float]:
    """Median µs per application transaction: (spillover within(), procrastinate defer), measured
    alternately in one run.

    ``pg_url`` is a server URL: both run in one throwaway database created there (spillover's outbox,
    procrastinate's schema, the orders table), through one SQLAlchemy engine (psycopg 3 driver).

    procrastinate's configuration, its most favourable documented one for this: ``SyncPsycopgConnector``
    and ``task.configure(connection=conn).defer(...)``, where ``conn`` is the session's own DBAPI
    connection (``session.connection().connection.driver_connection``, a ``psycopg.Connection`` in the
    transaction the session began). ``configure(connection=...)`` is procrastinate 3.x's documented
    "atomic deferral within a user-managed transaction": the defer INSERT runs as one statement on that
    cursor, no pool checkout, no SQLAlchemy layer (the contrib ``SQLAlchemyPsycopg2Connector`` would add
    ``exec_driver_sql`` and need psycopg2), and the session's commit commits it with the order.
    """
    with throwaway_database(pg_url) as url:
        migrate.upgrade(url)
        engine = create_engine(url)  # the application's own engine
        Base.metadata.create_all(engine)
        q = Queue("tx", connection=redis_conn, outbox=url)
        libpq_url = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        # The pool only applies the schema: defer(connection=...) never checks a connection out of it.
        app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=libpq_url, min_size=1))

        @app.task(name="noop", queue="tx")
        def noop(i: int) -> None:
            return None

        def ours(i: int) -> None:
            with Session(engine) as session:
                session.add(Order(item=f"order {i}"))
                q.within(session).enqueue(jobs.noop, i)
                session.commit()

        def theirs(i: int) -> None:
            with Session(engine) as session:
                session.add(Order(item=f"order {i}"))
                noop.configure(connection=session.connection().connection.driver_connection).defer(i=i)
                session.commit()

        try:
            with app.open():
                app.schema_manager.apply_schema()
                ours(-1)  # connections, schema check, scripts loaded
                theirs(-1)
                return alternate(lambda: per_op_us(ours, n), lambda: per_op_us(theirs, n), rounds)
        finally:
            q.empty()
            q.outbox.engine.dispose()
            engine.dispose()


if __name__ == "__main__":
    logging.getLogger("procrastinate").setLevel(logging.ERROR)  # "App is instantiated in __main__": no worker here
    a, b = bench_procrastinate("postgresql://postgres@127.0.0.1:5432/test", redis.Redis(), n=500, rounds=5)
    print(f"spillover within(): {a:,.1f} µs  procrastinate defer: {b:,.1f} µs  ratio within/defer: {a / b:.2f}x")
