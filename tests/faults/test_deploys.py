"""A rolling deploy: the schema upgraded while producers of the previous and of this release spill.

Every acknowledged job of every producer reaches RQ exactly once, in its producer's order; no
producer's enqueue fails at any point of the deploy; an old replayer running beside a new one
does not push a job twice (0.3's markers are keyed by job id, 0.4's by delivery id). The previous
releases are built from git history (releases.py).
"""

from __future__ import annotations

import pytest
from checks import Producers, assert_exactly_once_in_order, start_replayer, stop, wait_drained
from helpers import http_get, wait_for
from releases import alembic_upgrade, release_tree
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


@pytest.mark.parametrize("previous", ["0.1.0", "0.2.0", "0.3.0"])
def test_rolling_deploy_while_old_and_new_producers_spill(previous, make_redis, empty_outbox_url, tmp_path):
    url = empty_outbox_url
    old = release_tree(previous)
    alembic_upgrade(old, url)  # the outbox as the previous release left it: 0001, or 0002 in its first form
    assert _revision(url) == {"0.1.0": "0001", "0.2.0": "0002", "0.3.0": "0003"}[previous]
    if previous == "0.2.0":
        assert _target_is_not_null(url), "0.2.0's own 0002 made target NOT NULL: the form 0003 must repair"

    server = make_redis()
    server.kill()  # an outage during the deploy: every producer spills
    # Producers of the previous release, and of this one started before the migration runs.
    producers = Producers(
        tmp_path, url, server.port, ["old0", "old1", "new0"], pace=0.002, trees={"old0": old, "old1": old}
    )
    producers.wait(spilled=50)
    # The deploy's migration, from a job that knows nothing of Redis; from 0001 one revision at a time,
    # so producers also spill into the schema at 0002.
    if previous == "0.1.0":
        alembic_upgrade(None, url, "0002", SPILLOVER_TARGET="", SPILLOVER_REDIS_URL="")
        assert _revision(url) == "0002" and not _target_is_not_null(url)
        producers.wait(spilled=100)
    alembic_upgrade(None, url, SPILLOVER_TARGET="", SPILLOVER_REDIS_URL="")
    assert _revision(url) == "0004" and not _target_is_not_null(url)
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
        stop(replayer)
    assert_exactly_once_in_order(server.client(), url, enqueued)
    assert max(report["max"] for report in reports) < 5.0, reports  # nobody waited long on the migration
