"""The application table of the transaction tests: it lives in the outbox's database."""

from __future__ import annotations

from sqlalchemy import Engine, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(100))


def items(engine: Engine) -> list[str]:
    """Every order's item, in insertion order."""
    with Session(engine) as session:
        return list(session.scalars(select(Order.item).order_by(Order.id)))
