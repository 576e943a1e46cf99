"""Delivery ids, deadlines and fences: what each push carries, checked by a real Redis.

A job id may be enqueued again and runs again, as in RQ, whichever path its earlier
enqueue took; a push that arrives after its deadline, or with a lease holder's old
fencing token, writes nothing; markers live only while their delivery is in doubt.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jobs
import pytest
import redis
import rq
from helpers import replay_once, snapshot, wait_for
from orders import Base, Order
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from spillover import Outbox, Queue, was_spilled
from spillover.faultproxy import FaultProxy
from spillover.lease import QueueLease
from spillover.pusher import FENCED, LATE, Pusher
from spillover.redis_side import bounded_client, client_from_url
from spillover.replayer import Replayer
from spillover.settings import FENCE_PREFIX, LEGACY_MARKER_PREFIX, MARKER_PREFIX
from spillover.stored_job import SpilledJob, encode_hash, new_delivery_id

pytestmark = pytest.mark.rq_facing  # CI runs it under both RQ majors


def executed(client: redis.Redis) -> list[str]:
    return [x.decode() for x in client.lrange("executed", 0, -1)]


def marker_keys(client: redis.Redis) -> list[bytes]:
    return client.keys(MARKER_PREFIX + "*") + client.keys(LEGACY_MARKER_PREFIX + "*")


def unsettled(client: redis.Redis, window_ms: int) -> list[int]:
    """TTLs of markers not yet shortened to the delivery window (-2: expired since it was listed)."""
    ttls = [client.pttl(key) for key in marker_keys(client)]
    return sorted(ttl for ttl in ttls if not (ttl == -2 or 0 <= ttl <= window_ms))


# -- a job id enqueued again runs again, as in RQ ------------------------------------------


def direct(q: Queue, tag: str, _url: str, _redis_url: str) -> None:
    assert not was_spilled(q.enqueue(jobs.record, tag, job_id="nightly"))


def replay(url: str, redis_url: str) -> None:
    """What `spillover-replay --once` does, in this process (the CLI is tested elsewhere)."""
    Replayer(Outbox(url, max_backlog=0), client_from_url(redis_url, 5.0)).run_once()


def work(redis_url: str) -> None:
    """A real RQ worker, in this process: runs what is queued, then returns."""
    connection = redis.Redis.from_url(redis_url)
    rq.SimpleWorker(["nightly"], connection=connection).work(burst=True, logging_level="WARNING")


def spilled_and_replayed(q: Queue, tag: str, url: str, redis_url: str) -> None:
    down = Queue(q.name, connection=redis.Redis(port=1), outbox=url)  # nothing listens on port 1
    assert was_spilled(down.enqueue(jobs.record, tag, job_id="nightly"))
    replay(url, redis_url)


def transactional(q: Queue, tag: str, url: str, _redis_url: str) -> None:
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add(Order(item=tag))
        q.within(session).enqueue(jobs.record, tag, job_id="nightly")
    engine.dispose()


def ambiguous_reply(q: Queue, tag: str, url: str, redis_url: str) -> None:
    """The write lands and its reply is lost: spilled as ambiguous, then replayed (a no-op)."""
    proxy = FaultProxy("127.0.0.1", q.connection.connection_pool.connection_kwargs["port"])
    lossy = Queue(q.name, connection=redis.Redis(port=proxy.port), outbox=url)
    lossy._pusher.clock.now_ms()  # connected, and Redis's time learned
    proxy.set_mode("drop_replies")
    assert was_spilled(lossy.enqueue(jobs.record, tag, job_id="nightly"))
    proxy.close()
    replay(url, redis_url)


PATHS: dict[str, Callable[[Queue, str, str, str], None]] = {
    "direct": direct,
    "replayed": spilled_and_replayed,
    "transactional": transactional,
    "ambiguous": ambiguous_reply,
}


@pytest.mark.parametrize("first", sorted(PATHS))
def test_a_reused_job_id_runs_again_whatever_path_the_first_took(first, redis_server, sqlite_url):
    client = redis_server.client()
    q = Queue("nightly", connection=client, outbox=sqlite_url)
    PATHS[first](q, "1", sqlite_url, redis_server.url)
    work(redis_server.url)
    direct(q, "2", sqlite_url, redis_server.url)  # the next night, on the healthy path
    work(redis_server.url)
    PATHS[first](q, "3", sqlite_url, redis_server.url)  # and again the way the first went
    work(redis_server.url)
    transactional(q, "4", sqlite_url, redis_server.url)
    work(redis_server.url)
    assert executed(client) == ["1", "2", "3", "4"]
    wait_for(lambda: Outbox(sqlite_url).pending_count() == 0, timeout=5)  # pushed at commit, deleted off its path


@pytest.mark.parametrize("first", sorted(PATHS))
def test_enqueueing_a_job_id_twice_leaves_redis_as_rq_does(first, redis_server, sqlite_url):
    native, ours = redis_server.client(db=1), redis_server.client(db=0)
    for tag in ("1", "2"):
        rq.Queue("nightly", connection=native).enqueue(jobs.record, tag, job_id="nightly")
    q = Queue("nightly", connection=ours, outbox=sqlite_url)
    PATHS[first](q, "1", sqlite_url, redis_server.url)
    direct(q, "2", sqlite_url, redis_server.url)
    assert snapshot(ours) == snapshot(native)
    assert ours.lrange("rq:queue:nightly", 0, -1) == [b"nightly", b"nightly"]


# -- deadlines and fences ----------------------------------------------------------------


def row(job_id: str) -> SpilledJob:
    job_hash = encode_hash({"status": "queued", "origin": "fenced", "data": b"x"})
    return SpilledJob("tests", "fenced", job_id, job_hash, delivery=new_delivery_id())


def test_a_push_past_its_deadline_writes_nothing_and_says_so(redis_server):
    client = redis_server.client()
    pusher = Pusher(bounded_client(client, 2.0), backstop=60, window=5)
    read_long_ago = pusher.clock.now_ms() - 6_000  # rows read 6 s ago, the window is 5 s
    result = pusher.push("fenced", [row("late")], read_at=read_long_ago)
    assert result.refusal == LATE and result.codes == [] and result.error is None
    assert client.keys("*") == [], "nothing written, not even a marker"
    assert pusher.push("fenced", [row("in-time")]).complete
    assert client.lrange("rq:queue:fenced", 0, -1) == [b"in-time"]


def test_a_deadline_is_in_redis_time_whatever_this_hosts_clock_says(redis_server, monkeypatch):
    client = redis_server.client()
    pusher = Pusher(bounded_client(client, 2.0), backstop=60, window=5)
    redis_ms = pusher.clock.now_ms()
    # The local wall clock ten minutes off does not move the estimate: it is Redis's TIME, kept by monotonic time.
    monkeypatch.setattr(time, "time", lambda: 600.0 + redis_ms / 1000.0)
    assert abs(pusher.clock.now_ms() - redis_ms) < 1_000
    estimate = pusher.clock.now_ms()  # before Redis's TIME: a delay between the two then only widens the gap
    seconds, micros = client.time()
    assert estimate <= seconds * 1000 + micros / 1000 + 1, "an estimate is never ahead of Redis"
    assert pusher.push("fenced", [row("skewed")]).complete


def test_a_batch_with_an_older_fencing_token_writes_nothing(redis_server):
    client = redis_server.client()
    pusher = Pusher(bounded_client(client, 2.0), backstop=60, window=30)
    old, _ = pusher.raise_fence("tests", "fenced", 1)
    new, _ = pusher.raise_fence("tests", "fenced", 2)  # a new holder, before its first batch
    assert old is not None and new is not None and new.token > old.token
    assert pusher.raise_fence("tests", "fenced", 1) == (None, 2), "an older holding cannot raise it back"
    result = pusher.push("fenced", [row("stale")], fence=old)
    assert result.refusal == FENCED and client.llen("rq:queue:fenced") == 0
    assert pusher.push("fenced", [row("current")], fence=new).complete
    assert client.lrange("rq:queue:fenced", 0, -1) == [b"current"]


def test_a_job_id_key_of_an_older_release_hides_only_a_push_of_the_same_moment(redis_server):
    """0.3 keys its marker by job id ('1'): a push of that row a moment ago is this one; an older one is an
    earlier enqueue of the same id, which must not hide a new one."""
    client = redis_server.client()
    pusher = Pusher(bounded_client(client, 2.0), backstop=3600, window=5)
    client.set(LEGACY_MARKER_PREFIX + "earlier", "1", px=3_600_000 - 60_000)  # pushed by 0.3 a minute ago
    assert pusher.push("fenced", [row("earlier")]).codes == [1], "a new enqueue of the id: written"
    client.set(LEGACY_MARKER_PREFIX + "racing", "1", px=3_600_000)  # a 0.3 replayer pushed this row just now
    assert pusher.push("fenced", [row("racing")]).codes == [0], "the same row: skipped"
    assert client.lrange("rq:queue:fenced", 0, -1) == [b"earlier"]


def test_lease_epochs_and_fences_only_grow_when_leases_are_released_or_deleted(redis_server, sqlite_url):
    from sqlalchemy import delete

    from spillover.schema import queue_lease

    Outbox(sqlite_url).check_schema()
    engine = Outbox(sqlite_url).engine
    client = redis_server.client()
    pusher = Pusher(bounded_client(client, 2.0), backstop=60, window=30)
    tokens = []
    for n in range(6):
        lease = QueueLease(engine, f"holder-{n % 2}", 10.0, "tests", "fenced")
        assert lease.acquire()
        while lease.fence is None:  # as the replayer raises it (Replayer._fence)
            lease.fence, fence = pusher.raise_fence("tests", "fenced", lease.epoch)
            if lease.fence is None:
                assert lease.epoch_above(fence), "it holds the lease: it takes an epoch above the fence"
        tokens.append(lease.fence.token)
        lease.release()
        if n == 2:
            with engine.begin() as conn:  # a replayer of an older release deletes the lease row
                conn.execute(delete(queue_lease))
        elif n == 4:
            client.delete(FENCE_PREFIX + "tests:fenced")  # Redis forgets the fence (a restart)
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens


# -- markers live only as long as doubt ----------------------------------------------------


def test_markers_of_confirmed_direct_writes_go_at_once(redis_server, sqlite_url):
    client = redis_server.client()
    q = Queue("markers", connection=client, outbox=sqlite_url)
    q.enqueue_many([q.prepare_data(jobs.noop) for _ in range(2000)])
    wait_for(lambda: not marker_keys(client), timeout=5)
    assert client.llen("rq:queue:markers") == 2000


def test_markers_of_transactional_commits_go_one_window_after_their_rows(redis_server, sqlite_url, monkeypatch):
    monkeypatch.setenv("SPILLOVER_DELIVERY_WINDOW", "2")
    client = redis_server.client()
    q = Queue("orders", connection=client, outbox=sqlite_url)
    engine = create_engine(sqlite_url)
    Base.metadata.create_all(engine)
    for n in range(1000):
        with Session(engine) as session, session.begin():
            session.add(Order(item=str(n)))
            q.within(session).enqueue(jobs.noop)
    assert client.llen("rq:queue:orders") == 1000
    wait_for(lambda: Outbox(sqlite_url).pending_count() == 0, timeout=10)
    # rows deleted, then their markers settled (shortened to the window) by the settler's next batch (the
    # rows' delete commits before the settler hears of it, so wait for what Redis shows): from the moment
    # all are settled, one window (a replayer that read a row before its delete may still send it until
    # then), and a little for Redis to expire keys on a busy machine
    wait_for(lambda: not unsettled(client, window_ms=2000), timeout=10)
    time.sleep(2.5)
    left = len(marker_keys(client))
    assert left <= 10, f"{left} markers left one window after 1,000 commits (at most 1%)"


def test_markers_of_replayed_rows_go_one_window_after_their_rows(redis_server, sqlite_url):
    spilled = Queue("replayed", connection=redis.Redis(port=1), outbox=Outbox(sqlite_url, max_backlog=0))
    for _ in range(4):
        spilled.enqueue_many([spilled.prepare_data(jobs.noop) for _n in range(5000)])
    client = redis_server.client()
    replay_once(sqlite_url, redis_server.url, "--delivery-window", "2", "--log-level", "WARNING")
    assert client.llen("rq:queue:replayed") == 20_000
    late = unsettled(client, window_ms=2000)
    assert not late, f"{len(late)} markers not settled when the replayer exited: {late[:3]}"
    time.sleep(2.5)
    left = len(marker_keys(client))
    assert left <= 200, f"{left} markers left one window after replaying 20,000 rows (at most 1%)"


def test_a_marker_outlives_the_window_while_its_row_is_still_in_the_outbox(redis_server, sqlite_url):
    """A replay that landed but whose delete was lost: the marker stays (the backstop) and the next pass skips it."""
    client = redis_server.client()
    pusher = Pusher(bounded_client(client, 2.0), backstop=60, window=1)
    stored = row("kept")
    assert pusher.push("fenced", [stored]).complete  # landed; no settle: its row is still there
    time.sleep(1.5)
    assert client.exists(MARKER_PREFIX + str(stored.delivery))
    again = pusher.push("fenced", [stored])
    assert again.codes == [0], "skipped as delivered"
    assert pusher.settle([(stored.job_id, stored.delivery)]) == 2  # its marker and the job-id key for older replayers
    wait_for(lambda: not marker_keys(client), timeout=5)
    assert client.lrange("rq:queue:fenced", 0, -1) == [b"kept"]
