"""Producers are never stalled for long by the deploy's migration of a large outbox."""

from __future__ import annotations

import pytest
from releases import release_tree
from servers import create_database
from upgrade_load import upgrade_under_load

pytestmark = pytest.mark.previous_release  # 0.1.0 producers (rq<3): run under RQ 2


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'outbox.db'}"
    return create_database(request.getfixturevalue("postgres_server"))


def test_old_and_new_producers_spill_through_the_upgrade_of_100k_rows(fresh_url, tmp_path):
    """0.1.0 and new producers spill throughout `alembic upgrade head` of a 100,000-row first-release outbox."""
    old = release_tree("0.1.0")
    measured = upgrade_under_load(fresh_url, 100_000, tmp_path, ["old", "new0", "new1"], trees={"old": old})
    print(
        f"\nupgrade of {measured.rows:,} rows took {measured.upgrade_seconds:.2f} s; "
        f"longest enqueue {measured.longest_enqueue * 1000:.0f} ms"
    )
    assert all(count >= 100 for count in measured.enqueued.values()), measured.enqueued
    assert measured.longest_enqueue < 3.0, f"an enqueue waited {measured.longest_enqueue:.2f} s on the migration"
