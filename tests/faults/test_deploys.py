"""A rolling deploy: the schema upgraded while producers of the previous and of this release spill.

Every acknowledged job of every producer reaches RQ exactly once, in its producer's order; no
producer's enqueue fails at any point of the deploy; an old replayer running beside a new one
does not push a job twice (0.3's markers are keyed by job id, 0.4's by delivery id). The previous
releases are built from git history (releases.py). They pin rq<3: these tests run under RQ 2
(``.ci/run`` runs them in ``.venv-rq2``) and are skipped under RQ 3.
"""

from __future__ import annotations

import pytest
from checks import Producers, assert_exactly_once_in_order, start_replayer, wait_drained
from helpers import http_get, replay_once, stop_replayer, wait_for
from releases import alembic_upgrade, env_for, release_tree
from servers import create_database, free_port
from sqlalchemy import create_engine, inspect, text

from spillover.schema import VERSION_TABLE


@pytest.fixture(params=["sqlite", "postgres"])
def empty_outbox_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """An outbox database with no tables yet: the release under test creates them."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.db'}"
    return create_database(request.getfixturevalue("postgres_server"))


def _revision(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one())
    finally:
        engine.dispose()


def _target_is_not_null(url: str) -> bool:
    engine = create_engine(url)
    try:
        columns = {c["name"]: c for c in inspect(engine).get_columns("spillover_outbox")}
        return not columns["target"]["nullable"]
    finally:
        engine.dispose()


pytestmark = pytest.mark.previous_release

REVISION = {"0.1.0": "0001", "0.2.0": "0002", "0.3.0": "0003", "0.4.0": "0004"}


@pytest.mark.parametrize("previous", ["0.1.0", "0.2.0", "0.3.0", "0.4.0"])
def test_rolling_deploy_while_old_and_new_producers_spill(previous, make_redis, empty_outbox_url, tmp_path):
    url = empty_outbox_url
    old = release_tree(previous)
    alembic_upgrade(old, url)  # the outbox as the previous release left it: 0001, or 0002 in its first form
    assert _revision(url) == REVISION[previous]
    if previous == "0.2.0":
        assert _target_is_not_null(url), "0.2.0's own 0002 made target NOT NULL: the form 0003 must repair"

    server = make_redis()
    server.kill()  # an outage during the deploy: every producer spills
    # Producers of the previous release, and of this one started before the migration runs.
    producers = Producers(
        tmp_path, url, server.port, ["old0", "old1", "new0"], pace=0.005, trees={"old0": old, "old1": old}
    )
    producers.wait(spilled=50)
    # The deploy's migration, from a job that knows nothing of Redis; from 0001 one revision at a time,
    # so producers also spill into the schema at 0002.
    if previous == "0.1.0":
        alembic_upgrade(None, url, "0002", SPILLOVER_TARGET="", SPILLOVER_REDIS_URL="")
        assert _revision(url) == "0002" and not _target_is_not_null(url)
        producers.wait(spilled=100)
    alembic_upgrade(None, url, SPILLOVER_TARGET="", SPILLOVER_REDIS_URL="")
    assert _revision(url) == "0005" and not _target_is_not_null(url)
    producers.wait(spilled=200)  # all of them, old ones too, spill on into the new schema

    server.start()
    ports = [free_port(), free_port()]
    replayers = [start_replayer(url, server.url, "--metrics-port", str(ports[0]))]
    if previous != "0.1.0":  # the previous release's replayer is still running beside the new one
        replayers.append(start_replayer(url, server.url, "--metrics-port", str(ports[1]), tree=old))
    for port in ports[: len(replayers)]:  # both are up (serving), so both take part in the drain
        wait_for(lambda port=port: http_get(port, "/metrics")[0] == 200, timeout=60)
    producers.wait(direct=30)  # each producer is back on Redis: its spilled rows are in RQ
    enqueued, reports = producers.finish()
    wait_drained(url, server.client(), sum(enqueued.values()))
    for replayer in replayers:
        stop_replayer(replayer)
    assert_exactly_once_in_order(server.client(), url, enqueued)
    assert max(report["max"] for report in reports) < 5.0, reports  # nobody waited long on the migration


def test_a_previous_replayer_leaves_this_releases_rows_to_this_release(redis_server, sqlite_url):
    """0.4 knows no RQ_KEY_PREFIX, nor row options (unique, groups), nor RQ 3's rate limits: the key prefix in
    every stored target of this release keeps its replayer off such rows (it would write them under ``rq:``
    where no worker of the prefix looks, push a unique job whose id exists, skip the Group keys); this
    release drains them, each as it asks."""
    from spillover import Outbox
    from spillover.stored_job import SpilledJob, encode_hash, new_delivery_id

    outbox = Outbox(sqlite_url)
    job = encode_hash({"status": "queued"})
    rows = [
        SpilledJob("tests#{app}", "pf", "prefixed-job", job, delivery=new_delivery_id()),
        SpilledJob("tests#rq", "u", "unique-job", job, delivery=new_delivery_id(), options='{"unique":true}'),
    ]
    redis_server.client().hset("rq:job:unique-job", "status", "finished")  # its id is taken
    outbox.append(rows)
    old = release_tree("0.4.0")
    for tree in (old, None):
        # -m imports from the working directory first: the release's own, for the release
        done = replay_once(sqlite_url, redis_server.url, "--target", "tests", check=False, env=env_for(tree), cwd=tree)
        client = redis_server.client()
        if tree is old:
            assert outbox.pending_count() == 2 and client.keys("rq:*") == [b"rq:job:unique-job"], "0.4 left them"
            assert "tests#{app}" in done.stderr and "tests#rq" in done.stderr, "and said whose rows they are"
    assert done.returncode == 0, done.stderr[-2000:]
    assert outbox.pending_count() == 0
    assert client.lrange("{app}:queue:pf", 0, -1) == [b"prefixed-job"]
    assert not client.exists("rq:queue:u"), "the unique job whose id was taken: skipped"
    assert [e["skipped"] for e in outbox.queue_stats() if e["queue"] == "u"] == [1]
