"""The migrations build exactly the models' schema, up and down, on SQLite and Postgres."""

from __future__ import annotations

import os
import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from helpers import ROOT
from sqlalchemy import create_engine, inspect, text

from spillover import migrate
from spillover.schema import VERSION_TABLE, metadata

OURS = {"spillover_outbox", "spillover_queue_lease", VERSION_TABLE}


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
        assert conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one() == "0002"
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
