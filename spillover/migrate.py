"""Run the outbox migrations from an installed package (``spillover db upgrade``).

The migration files are the repo's ``migrations/`` folder, shipped in the wheel as
``spillover.migrations``: one source of truth for ``alembic upgrade head`` and this.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

from .outbox import create_outbox_engine


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("spillover.migrations")))
    return config


def upgrade(url_or_engine: str | Engine, revision: str = "head") -> None:
    _run(url_or_engine, lambda cfg: command.upgrade(cfg, revision))


def downgrade(url_or_engine: str | Engine, revision: str) -> None:
    _run(url_or_engine, lambda cfg: command.downgrade(cfg, revision))


def _run(url_or_engine: str | Engine, action: object) -> None:
    # The outbox's own engine: an SQLite file is created owner-only, and ":memory:" is refused.
    engine = create_outbox_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        # A plain connection: each revision begins and commits its own transaction (env.py).
        with engine.connect() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            action(config)  # type: ignore[operator]
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()
