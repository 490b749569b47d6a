"""The audit table and the `orders` read model, written from a batch of events in two statements.

A repeated event stores and projects nothing; the projection never moves an order back. Storing
holds the table's position lock until the commit (migration 0004), so batches project in turn."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pydantic import JsonValue
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts import (
    Address,
    CancelledData,
    EventPayload,
    EventType,
    FailedData,
    OrderEvent,
    OrderState,
    RecordedEvent,
    TerminatedData,
)

# `address_updated` and `command_rejected` leave the state as it is
STATE_OF_EVENT: dict[EventType, OrderState] = {
    EventType.QUEUED: OrderState.QUEUED,
    EventType.ADMITTED: OrderState.RECEIVED,
    EventType.RECEIVED: OrderState.RECEIVED,
    EventType.VALIDATED: OrderState.VALIDATED,
    EventType.AWAITING_APPROVAL: OrderState.AWAITING_APPROVAL,
    EventType.APPROVED: OrderState.APPROVED,
    EventType.PAYMENT_CHARGED: OrderState.PAID,
    EventType.SHIPPING_STARTED: OrderState.SHIPPING,
    EventType.PACKAGE_PREPARED: OrderState.SHIPPING,
    EventType.CARRIER_DISPATCHED: OrderState.SHIPPING,
    EventType.DISPATCH_FAILED: OrderState.SHIPPING,
    EventType.SHIPPED: OrderState.SHIPPED,
    EventType.COMPLETED: OrderState.COMPLETED,
    EventType.CANCELLED: OrderState.CANCELLED,
    EventType.FAILED: OrderState.FAILED,
    EventType.TERMINATED: OrderState.TERMINATED,
}

# the order column each of these events carries: its data's field of that name
FACT_OF_EVENT: dict[EventType, str] = {
    EventType.QUEUED: "placed_by",
    EventType.RECEIVED: "placed_by",
    EventType.APPROVED: "approved_by",
    EventType.ADDRESS_UPDATED: "address",
    EventType.CARRIER_DISPATCHED: "tracking_number",
    EventType.SHIPPED: "tracking_number",
}

Event = OrderEvent | RecordedEvent
Key = TypeVar("Key", bound=Hashable)

# `position` comes from the table's trigger (per row: the position lock, already held after the
# first, the next number and a NOTIFY, which PostgreSQL sends once at commit)
STORE_EVENTS = text(
    """
    INSERT INTO order_events
        (event_id, order_id, seq, type, occurred_at, correlation_id, command_id, data)
    SELECT event_id, order_id, seq, type, occurred_at, correlation_id, command_id, CAST(data AS jsonb)
    FROM unnest(
        CAST(:event_ids AS uuid[]), CAST(:order_ids AS text[]), CAST(:seqs AS integer[]),
        CAST(:types AS text[]), CAST(:occurred_ats AS timestamptz[]),
        CAST(:correlation_ids AS text[]), CAST(:command_ids AS uuid[]), CAST(:data AS text[])
    ) WITH ORDINALITY AS event
        (event_id, order_id, seq, type, occurred_at, correlation_id, command_id, data, place)
    -- in the batch's order: positions follow it, and of two copies of one event the first is stored
    ORDER BY place
    ON CONFLICT DO NOTHING
    RETURNING event_id
    """
)

# The state (and reason) apply if newer than `last_event_seq`. A fact applies unless an event of
# its type with a higher seq is recorded; of two for one column (`tracking_number`), the newer
# wins. `updated_at`: the state's event's time, or a later fact's.
PROJECT_ONTO_ORDERS = text(
    """
    WITH state_change AS (
        SELECT * FROM unnest(
            CAST(:state_order_ids AS text[]), CAST(:state_seqs AS integer[]),
            CAST(:states AS text[]), CAST(:state_times AS timestamptz[]),
            CAST(:reason_seqs AS integer[]), CAST(:reasons AS text[])
        ) AS change (order_id, state_seq, state, state_at, reason_seq, reason)
    ),
    fact_change AS (
        SELECT
            fact.order_id,
            (array_agg(CAST(fact.value AS jsonb) ORDER BY fact.seq DESC)
                FILTER (WHERE fact.column_name = 'address'))[1] AS address,
            (array_agg(fact.value ORDER BY fact.seq DESC)
                FILTER (WHERE fact.column_name = 'tracking_number'))[1] AS tracking_number,
            (array_agg(fact.value ORDER BY fact.seq DESC)
                FILTER (WHERE fact.column_name = 'placed_by'))[1] AS placed_by,
            (array_agg(fact.value ORDER BY fact.seq DESC)
                FILTER (WHERE fact.column_name = 'approved_by'))[1] AS approved_by,
            max(fact.occurred_at) AS fact_at
        FROM unnest(
            CAST(:fact_order_ids AS text[]), CAST(:fact_types AS text[]), CAST(:fact_seqs AS integer[]),
            CAST(:fact_times AS timestamptz[]), CAST(:fact_columns AS text[]), CAST(:fact_values AS text[])
        ) AS fact (order_id, type, seq, occurred_at, column_name, value)
        WHERE NOT EXISTS (
            SELECT FROM order_events AS newer
            -- seq > 0 as well: the (order_id, seq) index covers lifecycle events only
            WHERE newer.order_id = fact.order_id AND newer.type = fact.type
                AND newer.seq > 0 AND newer.seq > fact.seq
        )
        GROUP BY fact.order_id
    ),
    change AS (
        SELECT * FROM state_change FULL JOIN fact_change USING (order_id)
    )
    UPDATE orders SET
        state = CASE WHEN change.state_seq > orders.last_event_seq
            THEN change.state ELSE orders.state END,
        last_event_seq = greatest(orders.last_event_seq, change.state_seq),
        reason = CASE WHEN change.reason_seq > orders.last_event_seq
            THEN change.reason ELSE orders.reason END,
        address = coalesce(change.address, orders.address),
        tracking_number = coalesce(change.tracking_number, orders.tracking_number),
        placed_by = coalesce(change.placed_by, orders.placed_by),
        approved_by = coalesce(change.approved_by, orders.approved_by),
        updated_at = greatest(
            CASE WHEN change.state_seq > orders.last_event_seq
                THEN change.state_at ELSE orders.updated_at END,
            change.fact_at
        )
    FROM change
    WHERE orders.id = change.order_id
        AND (change.state_seq > orders.last_event_seq OR change.fact_at IS NOT NULL)
    """
)


@dataclass(frozen=True)
class Changes:
    """The newest state-changing event and reason of each order, and its newest fact of each type."""

    states: dict[str, Event]
    reasons: dict[str, Event]
    facts: list[Event]


def changes_of(events: Iterable[Event]) -> Changes:
    states: dict[str, Event] = {}
    reasons: dict[str, Event] = {}
    facts: dict[tuple[str, EventType], Event] = {}
    for event in events:
        if event.seq == 0:  # a rejection outside any lifecycle
            continue
        if event.type in STATE_OF_EVENT:
            _keep_newest(states, event.order_id, event)
            if reason_of(event.data):
                _keep_newest(reasons, event.order_id, event)
        if event.type in FACT_OF_EVENT:
            _keep_newest(facts, (event.order_id, event.type), event)
    # the newest event of a fact's type wins: one without a value leaves the column as it is
    return Changes(states, reasons, [event for event in facts.values() if fact_value(event) is not None])


def fact_value(event: Event) -> str | Address | None:
    """The value the event gives its type's column in FACT_OF_EVENT (None for data of another shape)."""
    value: str | Address | None = getattr(event.data, FACT_OF_EVENT[event.type], None)
    return value


def reason_of(data: EventPayload | dict[str, JsonValue]) -> str | None:
    """Why an order ended, if it did and says why."""
    match data:
        case CancelledData(reason=reason) | FailedData(reason=reason) | TerminatedData(reason=reason):
            return reason or None
    return None


async def record_events(session: AsyncSession, events: Sequence[OrderEvent]) -> list[bool]:
    """Store the events and project the new ones; per event, False if it was stored before."""
    inserted = await session.execute(STORE_EVENTS, _store_parameters(events))
    inserted_ids = set(inserted.scalars())
    recorded: list[bool] = []
    for event in events:
        recorded.append(event.event_id in inserted_ids)
        inserted_ids.discard(event.event_id)  # a second copy of it is a duplicate
    await project(session, [event for event, is_new in zip(events, recorded, strict=True) if is_new])
    return recorded


async def project(session: AsyncSession, events: Iterable[Event]) -> None:
    """Project stored events onto their orders' rows (a missing row is skipped)."""
    changes = changes_of(events)
    if changes.states or changes.facts:
        await session.execute(PROJECT_ONTO_ORDERS, _projection_parameters(changes))


def _store_parameters(events: Sequence[OrderEvent]) -> dict[str, Sequence[object]]:
    return {
        "event_ids": [event.event_id for event in events],
        "order_ids": [event.order_id for event in events],
        "seqs": [event.seq for event in events],
        "types": [event.type.value for event in events],
        "occurred_ats": [event.occurred_at for event in events],
        "correlation_ids": [event.correlation_id for event in events],
        "command_ids": [event.command_id for event in events],
        "data": [event.data.model_dump_json() for event in events],
    }


def _projection_parameters(changes: Changes) -> dict[str, Sequence[object]]:
    states = list(changes.states.values())
    reasons = [changes.reasons.get(event.order_id) for event in states]
    facts = changes.facts
    values = [fact_value(event) for event in facts]
    return {
        "state_order_ids": [event.order_id for event in states],
        "state_seqs": [event.seq for event in states],
        "states": [STATE_OF_EVENT[event.type].value for event in states],
        "state_times": [event.occurred_at for event in states],
        "reason_seqs": [None if event is None else event.seq for event in reasons],
        "reasons": [None if event is None else reason_of(event.data) for event in reasons],
        "fact_order_ids": [event.order_id for event in facts],
        "fact_types": [event.type.value for event in facts],
        "fact_seqs": [event.seq for event in facts],
        "fact_times": [event.occurred_at for event in facts],
        "fact_columns": [FACT_OF_EVENT[event.type] for event in facts],
        "fact_values": [value.model_dump_json() if isinstance(value, Address) else value for value in values],
    }


def _keep_newest(newest: dict[Key, Event], key: Key, event: Event) -> None:
    if key not in newest or newest[key].seq < event.seq:
        newest[key] = event
