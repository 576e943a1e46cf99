"""The examples' tests use the project's test fixtures (real redis-server, migrated outboxes)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from conftest import make_redis, sqlite_url  # noqa: F401
