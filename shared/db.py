"""PostgreSQL: the tables (sqlmodel) and the async engine (asyncpg). Only `migrations/` changes the
schema; these models describe it for queries (`tests/test_migrations.py` checks that they agree)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from uuid import UUID

import asyncpg
from pydantic import JsonValue
from sqlalchemy import BigInteger, Column, DateTime, FetchedValue, Index, Integer, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlmodel import Field, SQLModel

from shared.connection_security import database_url, postgres_ssl
from shared.contracts import OrderState, PlaceOrder
from shared.settings import Settings


def _timestamp(nullable: bool = True, default_now: bool = False) -> Column[datetime]:
    return Column(
        DateTime(timezone=True), nullable=nullable, server_default=func.now() if default_now else None
    )


class Order(SQLModel, table=True):
    """The read model of an order: business steps write their columns, the audit consumer the rest."""

    __tablename__ = "orders"
    # newest first is how orders are listed, a customer's own among them
    __table_args__ = (
        Index("ix_orders_created_at", text("created_at DESC"), "id"),
        Index("ix_orders_placed_by_created_at", "placed_by", text("created_at DESC"), "id"),
    )

    id: str = Field(primary_key=True, max_length=64)
    payment_id: str = Field(max_length=64)
    items: list[dict[str, JsonValue]] = Field(sa_column=Column(JSONB, nullable=False))
    address: dict[str, JsonValue] = Field(sa_column=Column(JSONB, nullable=False))
    amount_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    state: str = Field(sa_column=Column(String(32), nullable=False, index=True))
    last_event_seq: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    reason: str | None = Field(default=None, sa_column=Column(Text))
    tracking_number: str | None = Field(default=None, max_length=64)
    placed_by: str | None = Field(default=None, max_length=255)
    """None: placed before issuers were recorded."""
    approved_by: str | None = Field(default=None, max_length=255)
    created_at: datetime | None = Field(default=None, sa_column=_timestamp(nullable=False, default_now=True))
    updated_at: datetime | None = Field(default=None, sa_column=_timestamp(nullable=False, default_now=True))
    validated_at: datetime | None = Field(default=None, sa_column=_timestamp())
    package_prepared_at: datetime | None = Field(default=None, sa_column=_timestamp())
    dispatched_at: datetime | None = Field(default=None, sa_column=_timestamp())
    shipped_at: datetime | None = Field(default=None, sa_column=_timestamp())


class Payment(SQLModel, table=True):
    """One charge per `payment_id` (the key makes charging idempotent); voided: stopped before charging."""

    __tablename__ = "payments"

    payment_id: str = Field(primary_key=True, max_length=64)
    order_id: str = Field(max_length=64, index=True)
    amount_cents: int = Field(sa_column=Column(BigInteger, nullable=False))
    status: str = Field(max_length=16)
    charged_at: datetime | None = Field(default=None, sa_column=_timestamp(default_now=True))
    refunded_at: datetime | None = Field(default=None, sa_column=_timestamp())
    voided_at: datetime | None = Field(default=None, sa_column=_timestamp())


class AuditEvent(SQLModel, table=True):
    """Every event once; a trigger (migration 0004) numbers `position` in commit order, and NOTIFYs."""

    __tablename__ = "order_events"
    __table_args__ = (
        Index("uq_order_events_order_seq", "order_id", "seq", unique=True, postgresql_where=text("seq > 0")),
        Index("uq_order_events_position", "position", unique=True),
        Index("ix_order_events_order_position", "order_id", "position"),
    )

    event_id: UUID = Field(primary_key=True)
    order_id: str = Field(max_length=64)
    seq: int
    type: str = Field(max_length=32)
    occurred_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    correlation_id: str | None = Field(default=None, max_length=128)
    command_id: UUID | None = None
    data: dict[str, JsonValue] = Field(sa_column=Column(JSONB, nullable=False))
    recorded_at: datetime | None = Field(default=None, sa_column=_timestamp(nullable=False, default_now=True))
    position: int | None = Field(
        default=None, sa_column=Column(BigInteger, nullable=False, server_default=FetchedValue())
    )


class ProcessedCommand(SQLModel, table=True):
    """The bridge's tracking record: a command id here has had its one effect."""

    __tablename__ = "processed_commands"

    command_id: UUID = Field(primary_key=True)
    order_id: str = Field(max_length=64)
    type: str = Field(max_length=32)
    outcome: str = Field(max_length=16)
    detail: str | None = Field(default=None, sa_column=Column(Text))
    processed_at: datetime | None = Field(
        default=None, sa_column=_timestamp(nullable=False, default_now=True)
    )


class Admission(SQLModel, table=True):
    """One order's admission, from its placement (or a command ahead of it) until its lifecycle ends."""

    __tablename__ = "admissions"
    __table_args__ = (
        Index(
            "ix_admissions_counted",
            "status",
            postgresql_where=text("status IN ('admitting', 'running', 'resuming')"),
        ),
    )

    order_id: str = Field(primary_key=True, max_length=64)
    status: str = Field(max_length=16)
    place_command_id: UUID | None = None
    placed_by: str | None = Field(default=None, max_length=255)
    early_commands: list[dict[str, JsonValue]] = Field(
        default_factory=list, sa_column=Column(JSONB, nullable=False, server_default="[]")
    )
    cancel_command_id: UUID | None = None
    created_at: datetime | None = Field(default=None, sa_column=_timestamp(nullable=False, default_now=True))
    queued_at: datetime | None = Field(default=None, sa_column=_timestamp())
    admitted_at: datetime | None = Field(default=None, sa_column=_timestamp())
    resuming_since: datetime | None = Field(default=None, sa_column=_timestamp())
    """When it first asked for a slot again after its review (its place among the approved)."""
    ended_at: datetime | None = Field(default=None, sa_column=_timestamp())


INSERT_ORDER = insert(Order).on_conflict_do_nothing(index_elements=[Order.id])
"""The order's row as first written (by the bridge or the lifecycle, whichever is first): `order_row`."""


def order_row(order: PlaceOrder, state: OrderState) -> dict[str, object]:
    payload = order.payload
    return {
        "id": order.order_id,
        "payment_id": payload.payment_id,
        "items": [item.model_dump() for item in payload.items],
        "address": payload.address.model_dump(),
        "amount_cents": payload.amount_cents,
        "state": state.value,
        "placed_by": order.issued_by.subject if order.issued_by else None,
    }


def create_engine(settings: Settings, *, pre_ping: bool = False) -> AsyncEngine:
    """A pool; `pre_ping` costs a round trip per transaction, worth it only where nobody retries."""
    # enough kept open for a worker's steps at full load: opening a connection costs more than using it
    return create_async_engine(
        database_url(settings),
        connect_args={"ssl": postgres_ssl(settings)},
        pool_size=20,
        max_overflow=10,
        pool_pre_ping=pre_ping,
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session whose work commits on success and rolls back on any error."""
    async with sessions() as session, session.begin():
        yield session


async def listening_connection(settings: Settings, timeout: float = 60.0) -> asyncpg.Connection:
    """A plain asyncpg connection for LISTEN (it stays open: outside the pool), secured as the engine's."""
    dsn = make_url(database_url(settings)).set(drivername="postgresql").render_as_string(hide_password=False)
    return await asyncpg.connect(dsn, ssl=postgres_ssl(settings), timeout=timeout)
