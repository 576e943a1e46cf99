"""Alembic migrations of the outbox schema; installed as ``spillover.migrations``."""
