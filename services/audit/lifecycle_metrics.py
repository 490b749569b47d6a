"""How lifecycles end and how long they run, counted as the audit consumer records their terminal
events: each event is recorded once, so each ending is counted once, whichever consumer records it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from prometheus_client import Counter, Histogram
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from shared.contracts import EventType, OrderEvent
from shared.db import AuditEvent

LIFECYCLES_ENDED = Counter(
    "orderflow_lifecycles_ended", "Orders that ended, by outcome (their terminal event's type)", ["outcome"]
)
LIFECYCLE_DURATION = Histogram(
    "orderflow_lifecycle_duration_seconds",
    "From an order's admitted event to its terminal event, by outcome (admitted orders only)",
    ["outcome"],
    # the contract's 15 s (plus the reviewer's time), finely below it
    buckets=(0.5, 1, 1.5, 2, 3, 5, 8, 10, 12, 14, 15, 20, 30, 60, 120, 300, 600),
)


@dataclass(frozen=True)
class LifecycleEnding:
    outcome: EventType
    seconds: float | None  # None: never admitted (cancelled while queued), or its `admitted` is not here


# the (order_id, seq) index covers lifecycle events, seq > 0
ADMISSIONS = select(col(AuditEvent.order_id), col(AuditEvent.occurred_at)).where(
    col(AuditEvent.order_id).in_(bindparam("order_ids", expanding=True)),
    col(AuditEvent.seq) > 0,
    col(AuditEvent.type) == EventType.ADMITTED.value,
)


async def lifecycle_endings(session: AsyncSession, terminals: Sequence[OrderEvent]) -> list[LifecycleEnding]:
    """The endings `terminals` record, each timed from its order's `admitted` event if it has one
    (one query for them all)."""
    if not terminals:
        return []
    order_ids = sorted({terminal.order_id for terminal in terminals})
    admissions = await session.execute(ADMISSIONS, {"order_ids": order_ids})
    admitted_at: dict[str, datetime] = dict(admissions.all())
    return [_ending(terminal, admitted_at.get(terminal.order_id)) for terminal in terminals]


def _ending(terminal: OrderEvent, admitted_at: datetime | None) -> LifecycleEnding:
    seconds = None if admitted_at is None else (terminal.occurred_at - admitted_at).total_seconds()
    return LifecycleEnding(terminal.type, seconds)


def count_endings(endings: Iterable[LifecycleEnding]) -> None:
    for ending in endings:
        LIFECYCLES_ENDED.labels(ending.outcome.value).inc()
        if ending.seconds is not None:
            LIFECYCLE_DURATION.labels(ending.outcome.value).observe(ending.seconds)
