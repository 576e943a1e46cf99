"""The migrations build exactly the models' schema, up and down, on SQLite and Postgres."""

from __future__ import annotations

import os
import subprocess
import sys

import jobs
import redis
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from helpers import ROOT, replay_once
from releases import insert_untargeted_row
from servers import free_port
from sqlalchemy import create_engine, inspect, text

from spillover import Outbox, Queue, migrate
from spillover.schema import VERSION_TABLE, metadata

OURS = {"spillover_outbox", "spillover_queue_lease", "spillover_replayer", VERSION_TABLE}
HEAD = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_single_head():
    assert len(ScriptDirectory.from_config(migrate.alembic_config()).get_heads()) == 1


def test_upgrade_downgrade_round_trip_and_models_match(outbox_url):
    # outbox_url arrives migrated to head
    assert tables(outbox_url) >= OURS
    _assert_models_match(outbox_url)
    migrate.downgrade(outbox_url, "base")
    assert tables(outbox_url) & OURS == {VERSION_TABLE}
    migrate.upgrade(outbox_url)
    assert tables(outbox_url) >= OURS
    _assert_models_match(outbox_url)


def _assert_models_match(url: str) -> None:
    engine = create_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE, "compare_type": True, "compare_server_default": False}
        )
        diff = [d for d in compare_metadata(context, metadata) if "alembic_version" not in str(d)]
    engine.dispose()
    assert diff == []


def test_alembic_cli_from_repo_root_leaves_the_apps_version_table_alone(tmp_path):
    url = f"sqlite:///{tmp_path}/app.db"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('app_rev_42')"))
    env = {**os.environ, "SPILLOVER_DATABASE_URL": url}
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    assert tables(url) >= OURS
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "app_rev_42"
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one() == HEAD
    engine.dispose()


def test_spillover_db_upgrade_command(tmp_path):
    url = f"sqlite:///{tmp_path}/cli.db"
    out = subprocess.run(
        [sys.executable, "-m", "spillover", "db", "upgrade", "--database-url", url],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "head" in out.stdout
    assert tables(url) >= OURS


def test_a_populated_outbox_upgraded_with_no_redis_settings_is_replayed_by_its_replayer(
    redis_server, outbox_url, monkeypatch
):
    """The migration does not guess a Redis from where it runs: rows without a target are the outbox replayer's."""
    monkeypatch.delenv("SPILLOVER_TARGET")
    queue = Queue("upgraded", connection=redis.Redis(port=free_port()), outbox=outbox_url)
    ids = [f"u{i:03d}" for i in range(20)]
    queue.enqueue_many([queue.prepare_data(jobs.noop, job_id=job_id) for job_id in ids])
    queue.outbox.engine.dispose()
    migrate.downgrade(outbox_url, "0001")  # the outbox as the first release left it, with rows
    with create_engine(outbox_url).begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM spillover_outbox")).scalar_one() == 20
        before = conn.execute(text("SELECT max(id) FROM spillover_outbox")).scalar_one()
        conn.execute(text("DELETE FROM spillover_outbox WHERE job_id = 'u019'"))  # the highest id, gone
    ids.remove("u019")

    monkeypatch.delenv("SPILLOVER_REDIS_URL", raising=False)  # a deploy job that knows nothing of Redis
    migrate.upgrade(outbox_url)
    _assert_models_match(outbox_url)
    assert Outbox(outbox_url).pending_by_target() == {None: {"upgraded": 19}}, "no target guessed"
    replay_once(outbox_url, redis_server.url)  # default settings
    assert [x.decode() for x in redis_server.client().lrange("rq:queue:upgraded", 0, -1)] == ids
    later = Queue("upgraded", connection=redis.Redis(port=free_port()), outbox=outbox_url)
    later.enqueue(jobs.noop)
    with create_engine(outbox_url).begin() as conn:
        assert conn.execute(text("SELECT max(id) FROM spillover_outbox")).scalar_one() > before, "ids are not reused"
    migrate.downgrade(outbox_url, "0001")  # and back, keeping the pending row
    with create_engine(outbox_url).begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM spillover_outbox")).scalar_one() == 1


def test_an_untargeted_row_is_left_alone_with_no_adopt_untargeted(redis_server, sqlite_url):
    insert_untargeted_row(sqlite_url, "legacy")
    replay_once(sqlite_url, redis_server.url, "--no-adopt-untargeted")
    assert Outbox(sqlite_url).pending_by_target() == {None: {"legacy": 1}}


def test_a_producer_started_before_the_migration_spills_through_it(outbox_url, monkeypatch):
    """It writes the 0001 row shape, looks again (here at every spill: Postgres has prepared the look by then),
    and names its Redis from the first spill after the migration."""
    from spillover import outbox as outbox_module

    migrate.downgrade(outbox_url, "0001")
    monkeypatch.setattr(outbox_module, "SHAPE_RECHECK_INTERVAL", 0.0)
    queue = Queue("early", connection=redis.Redis(port=free_port()), outbox=outbox_url)
    for i in range(12):
        queue.enqueue(jobs.noop, job_id=f"before-{i:02d}")
    migrate.upgrade(outbox_url)
    for i in range(12):
        queue.enqueue(jobs.noop, job_id=f"after-{i:02d}")
    with create_engine(outbox_url).begin() as conn:
        rows = conn.execute(text("SELECT job_id, target FROM spillover_outbox ORDER BY id")).all()
    assert [job_id for job_id, _ in rows] == [f"before-{i:02d}" for i in range(12)] + [
        f"after-{i:02d}" for i in range(12)
    ]
    assert {target for job_id, target in rows if job_id.startswith("before")} == {None}
    assert {target for job_id, target in rows if job_id.startswith("after")} == {"tests#rq"}, "with its key prefix"
