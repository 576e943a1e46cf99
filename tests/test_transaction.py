"""Enqueue within the application's transaction: the job exists if and only if the commit does.

Real SQLite files and a real PostgreSQL hold both the application's table and the outbox;
real redis-servers and real RQ workers take the jobs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jobs
import pytest
import redis
from forms import FORMS, assert_same_as_native, run_natively
from helpers import env_with_tests, replay_once, run_forked, run_worker, snapshot, wait_for
from orders import Base, Order, items
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import Session

from spillover import ConfigurationError, NotInTransaction, Outbox, OutboxNotMigrated, Queue, was_spilled
from spillover.faultproxy import FaultProxy
from spillover.settings import MARKER_PREFIX

pytestmark = pytest.mark.rq_facing  # CI runs it under both RQ majors


@pytest.fixture
def app_engine(outbox_url: str) -> Iterator[Engine]:
    engine = create_engine(outbox_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def queued(client, queue: str = "orders") -> list[str]:
    return [x.decode() for x in client.lrange(f"rq:queue:{queue}", 0, -1)]


def test_committed_job_is_in_rq_when_commit_returns_and_its_worker_finds_the_row(redis_server, outbox_url, app_engine):
    client = redis_server.client()
    q = Queue("orders", connection=client, outbox=outbox_url)
    with Session(app_engine) as session:
        order = Order(item="book")
        session.add(order)
        session.flush()
        job = q.within(session).enqueue(jobs.read_order, outbox_url, order.id, job_id="receipt")
        assert job.id == "receipt" and not was_spilled(job)
        assert snapshot(client, keep_markers=True) == {}, "nothing of the job in Redis before the commit"
        session.commit()
        assert queued(client) == ["receipt"], "in RQ when commit() returns, with no replayer"
    run_worker(redis_server.url, "orders")
    assert client.lrange("executed", 0, -1) == [b"book"], "the worker saw the row its transaction inserted"
    wait_for(lambda: Outbox(outbox_url).pending_count() == 0, timeout=5)  # the producer deletes its rows
    replay_once(outbox_url, redis_server.url)
    assert client.lrange("executed", 0, -1) == [b"book"] and queued(client) == []


def test_within_begins_a_fresh_session_or_connection_as_sqlalchemy_does(redis_server, outbox_url, app_engine):
    """Enqueue first, then write, then commit (or roll back): the job exists iff the commit happens."""
    client = redis_server.client()
    q = Queue("orders", connection=client, outbox=outbox_url)
    with Session(app_engine) as session:  # no begin(): within() autobegins, as session.add + flush would
        q.within(session).enqueue(jobs.noop, job_id="first-then-order")
        session.add(Order(item="after the job"))
        session.commit()
    with Session(app_engine) as session:
        q.within(session).enqueue(jobs.noop, job_id="first-then-rollback")
        session.add(Order(item="rolled back"))
        session.rollback()
    with app_engine.connect() as conn:  # a Connection: begun on first use, ended by its commit()
        q.within(conn).enqueue(jobs.noop, job_id="conn-first")
        conn.execute(Order.__table__.insert().values(item="by connection"))
        conn.commit()
    with app_engine.connect() as conn:
        q.within(conn).enqueue(jobs.noop, job_id="conn-rolled-back")
        conn.rollback()
    replay_once(outbox_url, redis_server.url)  # a bare Connection's jobs are the replayer's
    assert sorted(queued(client)) == ["conn-first", "first-then-order"]
    with Session(app_engine) as session:
        assert sorted(o.item for o in session.query(Order)) == ["after the job", "by connection"]
    assert Outbox(outbox_url).pending_count() == 0


def test_rolled_back_jobs_never_reach_redis(redis_server, outbox_url, app_engine):
    client = redis_server.client()
    q = Queue("orders", connection=client, outbox=outbox_url)
    with Session(app_engine) as session:  # explicit rollback
        session.add(Order(item="rolled back"))
        q.within(session).enqueue(jobs.noop, job_id="rolled-back")
        session.rollback()
    with pytest.raises(RuntimeError), Session(app_engine) as session, session.begin():  # an exception
        session.add(Order(item="raised"))
        q.within(session).enqueue(jobs.noop, job_id="raised")
        raise RuntimeError("the request failed")
    with Session(app_engine) as session:  # closed without a commit
        session.add(Order(item="abandoned"))
        q.within(session).enqueue(jobs.noop, job_id="abandoned")
    with Session(app_engine) as session, session.begin():  # savepoints inside a committed transaction
        session.add(Order(item="kept"))
        with session.begin_nested():
            q.within(session).enqueue(jobs.noop, job_id="released-savepoint")
        with pytest.raises(RuntimeError), session.begin_nested():
            q.within(session).enqueue(jobs.noop, job_id="rolled-back-savepoint")
            raise RuntimeError("undo this part")
        q.within(session).enqueue(jobs.noop, job_id="after-savepoints")
    assert queued(client) == ["released-savepoint", "after-savepoints"]
    assert items(app_engine) == ["kept"]
    wait_for(lambda: Outbox(outbox_url).pending_count() == 0, timeout=5)
    replay_once(outbox_url, redis_server.url)
    assert queued(client) == ["released-savepoint", "after-savepoints"]
    assert not client.exists("rq:job:rolled-back", "rq:job:raised", "rq:job:abandoned", "rq:job:rolled-back-savepoint")


def test_only_rows_the_database_committed_are_pushed(redis_server, outbox_url, app_engine):
    client = redis_server.client()
    q = Queue("orders", connection=client, outbox=outbox_url)
    with app_engine.connect() as conn:  # a Session joined to an outer transaction, as test fixtures do
        outer = conn.begin()
        with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
            session.add(Order(item="joined"))
            q.within(session).enqueue(jobs.noop, job_id="joined")
            session.commit()  # releases a savepoint
        # Postgres has committed nothing yet. pysqlite, in its default transaction handling, issued
        # no BEGIN for the outer transaction: the SAVEPOINT began one, and its RELEASE committed it.
        assert ("joined" in queued(client)) == ("joined" in items(app_engine))
        outer.rollback()
    with Session(app_engine) as session, session.begin():  # a savepoint in raw SQL
        session.add(Order(item="kept"))
        session.execute(text("SAVEPOINT raw"))
        q.within(session).enqueue(jobs.noop, job_id="raw-savepoint")
        session.execute(text("ROLLBACK TO SAVEPOINT raw"))
        q.within(session).enqueue(jobs.noop, job_id="kept")  # on SQLite: the rolled-back row's id again
    wait_for(lambda: Outbox(outbox_url).pending_count() == 0, timeout=5)
    replay_once(outbox_url, redis_server.url)
    assert queued(client) == items(app_engine), "a job for each committed order, and no other"
    assert "kept" in queued(client) and "raw-savepoint" not in queued(client)
    if "postgresql" in outbox_url:
        assert queued(client) == ["kept"]


def test_a_connection_commit_is_delivered_by_the_replayer(redis_server, outbox_url, app_engine):
    client = redis_server.client()
    q = Queue("orders", connection=client, outbox=outbox_url)
    with app_engine.connect() as conn:
        with conn.begin():
            conn.execute(Order.__table__.insert().values(item="pen"))
            q.within(conn).enqueue(jobs.noop, job_id="via-connection")
        with conn.begin() as transaction:
            q.within(conn).enqueue(jobs.noop, job_id="connection-rolled-back")
            transaction.rollback()
    assert queued(client) == [] and Outbox(outbox_url).pending_count("orders") == 1
    replay_once(outbox_url, redis_server.url)
    assert queued(client) == ["via-connection"]
    replay_once(outbox_url, redis_server.url)
    assert queued(client) == ["via-connection"] and Outbox(outbox_url).pending_count() == 0


@pytest.mark.parametrize("form_name", sorted(FORMS))
def test_every_form_within_a_transaction_equals_native_rq(form_name, redis_server, sqlite_url):
    native, ours = redis_server.client(db=1), redis_server.client(db=0)
    run_natively(form_name, native, ours)
    before = snapshot(ours, keep_markers=True)
    with Session(create_engine(sqlite_url)) as session, session.begin():
        session.connection()  # the transaction is open
        FORMS[form_name](Queue("q", connection=ours, outbox=sqlite_url).within(session))
        assert snapshot(ours, keep_markers=True) == before, "nothing reaches Redis before the commit"
    assert_same_as_native(form_name, ours, native)


def test_plain_enqueues_are_not_held_back_by_an_open_transaction(redis_server, sqlite_url):
    client = redis_server.client()
    q = Queue("orders", connection=client, outbox=sqlite_url)
    with Session(create_engine(sqlite_url)) as session, session.begin():
        session.connection()
        q.within(session).enqueue(jobs.noop, job_id="in-transaction")
        plain = q.enqueue(jobs.noop, job_id="plain")
        assert not was_spilled(plain) and queued(client) == ["plain"]
    assert queued(client) == ["plain", "in-transaction"]


def test_redis_down_at_commit_the_commit_succeeds_and_order_is_kept(make_redis, outbox_url, app_engine):
    redis_server = make_redis(aof=True)
    client = redis_server.client()
    q = Queue("orders", connection=redis_server.client(), outbox=outbox_url, redis_timeout=0.5)

    def commit(job_id: str) -> float:
        with Session(app_engine) as session:
            session.add(Order(item=job_id))
            q.within(session).enqueue(jobs.noop, job_id=job_id)
            started = time.perf_counter()
            session.commit()
            return time.perf_counter() - started

    commit("a")
    redis_server.kill()
    assert commit("b") < 1.0, "a dead Redis costs a commit one bounded attempt at most"
    commit("c")
    # both wait in the outbox (a's row, pushed, is deleted in the background)
    wait_for(lambda: Outbox(outbox_url).pending_count("orders") == 2, timeout=5)
    redis_server.start()
    wait_for(lambda: q.health.is_up, timeout=10)
    commit("d")  # this producer's own b and c go first, then d: never d before them
    assert queued(client) == ["a", "b", "c", "d"]
    wait_for(lambda: Outbox(outbox_url).pending_count() == 0, timeout=5)
    replay_once(outbox_url, redis_server.url)
    assert queued(client) == ["a", "b", "c", "d"]
    assert items(app_engine) == ["a", "b", "c", "d"]


def test_lost_reply_at_commit_is_settled_by_the_marker(redis_server, sqlite_url):
    proxy = FaultProxy("127.0.0.1", redis_server.port)
    q = Queue("orders", connection=redis.Redis(port=proxy.port), outbox=sqlite_url, redis_timeout=0.5)
    engine = create_engine(sqlite_url)
    Base.metadata.create_all(engine)
    assert not was_spilled(q.enqueue(jobs.noop))  # connection and server version in place
    proxy.set_mode("drop_replies")
    with Session(engine) as session, session.begin():
        session.add(Order(item="x"))
        q.within(session).enqueue(jobs.noop, job_id="landed")
    client = redis_server.client()
    [row] = Outbox(sqlite_url).fetch_pending("tests#rq", "orders", 10)
    assert client.exists(MARKER_PREFIX + row.delivery), "the push landed with its marker; its reply was lost"
    assert Outbox(sqlite_url).pending_count("orders") == 1
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT ambiguous FROM spillover_outbox")) == 1, "flagged: it may be in Redis"
    proxy.set_mode("pass")
    replay_once(sqlite_url, redis_server.url)
    assert queued(client).count("landed") == 1
    proxy.close()


def test_misuse_gets_a_clear_error(redis_server, sqlite_url, tmp_path: Path):
    from sqlalchemy.ext.asyncio import AsyncSession

    q = Queue("orders", connection=redis_server.client(), outbox=sqlite_url)
    engine = create_engine(sqlite_url)
    Base.metadata.create_all(engine)
    with Session(engine, autobegin=False) as session, pytest.raises(NotInTransaction, match="begin"):
        q.within(session).enqueue(jobs.noop)  # a Session SQLAlchemy itself would not begin
    conn = engine.connect()
    conn.close()
    with pytest.raises(NotInTransaction, match=r"connection\.begin\(\)"):
        q.within(conn).enqueue(jobs.noop)
    with pytest.raises(ConfigurationError, match="Session or Connection"):
        q.within(engine)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="AsyncSession is not supported"):
        q.within(AsyncSession())  # type: ignore[arg-type]
    with Session(engine) as session, session.begin():
        session.connection()
        with pytest.raises(ConfigurationError, match="pipeline"):
            q.within(session).enqueue_call(jobs.noop, pipeline=redis_server.client().pipeline())
    with pytest.raises(ConfigurationError, match="in-memory"):
        q.within(Session(create_engine("sqlite://")))
    assert Outbox(sqlite_url).pending_count() == 0 and not redis_server.client().keys("rq:*")

    # A database the outbox migrations never ran on: named, and the caller's transaction is not harmed.
    bare = create_engine(f"sqlite:///{tmp_path / 'no-outbox.db'}")
    Base.metadata.create_all(bare)
    with Session(bare) as session:
        session.add(Order(item="still mine"))
        with pytest.raises(OutboxNotMigrated, match="spillover db upgrade"):
            q.within(session).enqueue(jobs.noop)
        session.commit()
    assert items(bare) == ["still mine"]


def test_postgres_without_the_table_leaves_the_transaction_usable(redis_server, postgres_server):
    from servers import create_database

    url = create_database(postgres_server)  # not migrated
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    q = Queue("orders", connection=redis_server.client(), outbox=url)
    with Session(engine) as session:
        session.add(Order(item="mine"))
        session.flush()
        with pytest.raises(OutboxNotMigrated, match="spillover db upgrade"):
            q.within(session).enqueue(jobs.noop)
        session.commit()  # a failed INSERT would have aborted the whole transaction on Postgres
    assert items(engine) == ["mine"]
    engine.dispose()


def test_many_jobs_in_one_transaction_keep_their_order(redis_server, outbox_url, app_engine):
    client = redis_server.client()
    q = Queue("orders", connection=client, outbox=outbox_url)
    with Session(app_engine) as session, session.begin():
        session.add(Order(item="bulk"))
        tx = q.within(session)
        for i in range(50):
            tx.enqueue(jobs.noop, job_id=f"one-{i:02d}")
        tx.enqueue_many([tx.prepare_data(jobs.noop, job_id=f"many-{i:02d}") for i in range(50)])
    assert queued(client) == [f"one-{i:02d}" for i in range(50)] + [f"many-{i:02d}" for i in range(50)]
    with Session(app_engine) as session:
        count = session.scalar(select(func.count()).select_from(Order))
    assert count == 1


def listening(engine: Engine) -> bool:
    with engine.connect() as conn:  # a fresh transaction: statistics views are snapshots per transaction
        # this database's only: the other test worker's replayers LISTEN on the same server
        query = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE query = 'LISTEN spillover_outbox' AND datname = current_database()"
        )
        return conn.scalar(text(query)) == 1


def test_a_connection_commit_wakes_a_listening_replayer_on_postgres(redis_server, postgres_server):
    from servers import create_database

    from spillover import migrate

    url = create_database(postgres_server)
    migrate.upgrade(url)
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    client = redis_server.client()
    command = [sys.executable, "-m", "spillover.cli_replay", "--database-url", url, "--redis-url", redis_server.url]
    replayer = subprocess.Popen([*command, "--poll-interval", "60"], env=env_with_tests(), stderr=subprocess.PIPE)
    try:
        wait_for(lambda: listening(engine), timeout=30)  # the replayer has drained nothing and now LISTENs
        q = Queue("orders", connection=client, outbox=url)
        with engine.begin() as conn:
            conn.execute(Order.__table__.insert().values(item="pen"))
            q.within(conn).enqueue(jobs.noop, job_id="woken")
            q.within(conn).enqueue(jobs.noop, job_id="woken-too")
        committed = time.monotonic()
        wait_for(lambda: queued(client) == ["woken", "woken-too"], timeout=30, interval=0.005)
        assert time.monotonic() - committed < 5, "delivered on the commit's notification, not the 60 s poll"
    finally:
        replayer.terminate()
        assert replayer.wait(20) == 0, replayer.stderr.read().decode()[-3000:] if replayer.stderr else ""
    engine.dispose()


def test_forked_children_commit_with_a_queue_made_before_the_fork(redis_server, sqlite_url):
    engine = create_engine(sqlite_url)
    Base.metadata.create_all(engine)
    q = Queue("orders", connection=redis_server.client(), outbox=sqlite_url)
    with Session(engine) as session, session.begin():  # the pusher thread runs before the fork
        session.add(Order(item="parent"))
        q.within(session).enqueue(jobs.noop, job_id="parent")
    engine.dispose()
    run_forked(_child_commits, [(q, sqlite_url, n) for n in range(4)])
    expected = ["parent"] + [f"c{n}-{i}" for n in range(4) for i in range(20)]
    assert sorted(queued(redis_server.client())) == sorted(expected), "each child pushed its own commits"
    assert sorted(items(engine)) == sorted(expected)


def _child_commits(q: Queue, url: str, n: int) -> None:
    engine = create_engine(url, connect_args={"timeout": 30})
    for i in range(20):
        with Session(engine) as session, session.begin():
            session.add(Order(item=f"c{n}-{i}"))
            q.within(session).enqueue(jobs.noop, job_id=f"c{n}-{i}")
