"""The audit table and the `orders` read model, written from a batch of events in one transaction.

Events may arrive twice or out of order. The audit row is unique on `event_id` and on
`(order_id, seq)`, so a repeat inserts nothing and projects nothing. The projection never moves an
order back: `state` comes from the newest state-changing event (`last_event_seq` is that event's
seq), and `address`, `tracking_number`, `placed_by` and `approved_by` from the newest event of the
type that carries them.

A batch costs two statements whatever its size: one insert of all its events, then one update of
the orders that its new events project onto, with the outcome of applying those events one at a
time in seq order. A missing order row (no `order_received` yet) is skipped.

Consumers may record batches concurrently. Every transaction that stores events holds the audit
table's position lock from its first insert until it commits (migration 0004), and the projection
runs after the insert: it sees every event committed before, and a transaction storing events
later waits for this one and then sees them all. Batches project one after another, so they
neither miss a newer event of a fact's type nor deadlock on the orders' rows.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts import (
    Address,
    AddressUpdatedData,
    ApprovedData,
    CancelledData,
    CarrierDispatchedData,
    EventPayload,
    EventType,
    FailedData,
    OrderEvent,
    OrderState,
    QueuedData,
    ReceivedData,
    ShippedData,
    TerminatedData,
)

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
"""`address_updated` and `command_rejected` leave the state as it is."""

# the order column each of these events carries (`_fact_of` reads it)
FACT_OF_EVENT: dict[EventType, str] = {
    EventType.QUEUED: "placed_by",
    EventType.RECEIVED: "placed_by",
    EventType.APPROVED: "approved_by",
    EventType.ADDRESS_UPDATED: "address",
    EventType.CARRIER_DISPATCHED: "tracking_number",
    EventType.SHIPPED: "tracking_number",
}

Key = TypeVar("Key", bound=Hashable)

# `position` comes from the table's trigger (per row: the position lock, already held after the
# first, the next number and a NOTIFY, which PostgreSQL sends once at commit), `recorded_at` from
# its default
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

# Per order, from the batch's new events: the newest state-changing one applies if newer than
# `last_event_seq`, and the reason of the newest one with a reason if that is newer too (as
# applying them one at a time in seq order would). The newest event of each fact's type applies
# unless an event of that type with a higher seq is recorded; of two applied to one column
# (`tracking_number`), the newer wins. `updated_at`: the state's event's time, or a later fact's.
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
            (array_agg(CAST(fact.address AS jsonb) ORDER BY fact.seq DESC)
                FILTER (WHERE fact.address IS NOT NULL))[1] AS address,
            (array_agg(fact.tracking_number ORDER BY fact.seq DESC)
                FILTER (WHERE fact.tracking_number IS NOT NULL))[1] AS tracking_number,
            (array_agg(fact.placed_by ORDER BY fact.seq DESC)
                FILTER (WHERE fact.placed_by IS NOT NULL))[1] AS placed_by,
            (array_agg(fact.approved_by ORDER BY fact.seq DESC)
                FILTER (WHERE fact.approved_by IS NOT NULL))[1] AS approved_by,
            max(fact.occurred_at) AS fact_at
        FROM unnest(
            CAST(:fact_order_ids AS text[]), CAST(:fact_types AS text[]),
            CAST(:fact_seqs AS integer[]), CAST(:fact_times AS timestamptz[]),
            CAST(:addresses AS text[]), CAST(:tracking_numbers AS text[]),
            CAST(:placed_bys AS text[]), CAST(:approved_bys AS text[])
        ) AS fact (order_id, type, seq, occurred_at, address, tracking_number, placed_by, approved_by)
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


async def record_events(session: AsyncSession, events: Sequence[OrderEvent]) -> list[bool]:
    """Store the events and project the new ones; per event, False if it was stored before (or
    earlier in `events`), and nothing was done for it."""
    inserted = await session.execute(STORE_EVENTS, _store_parameters(events))
    inserted_ids = set(inserted.scalars())
    recorded: list[bool] = []
    new_events: list[OrderEvent] = []
    for event in events:
        is_new = event.event_id in inserted_ids
        inserted_ids.discard(event.event_id)  # a second copy of it is a duplicate
        recorded.append(is_new)
        if is_new:
            new_events.append(event)
    projection = _projection_parameters(new_events)
    if projection is not None:
        await session.execute(PROJECT_ONTO_ORDERS, projection)
    return recorded


async def record_event(session: AsyncSession, event: OrderEvent) -> bool:
    """Store one event and project it; False if it was stored before (nothing done)."""
    [is_new] = await record_events(session, [event])
    return is_new


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


def _projection_parameters(new_events: list[OrderEvent]) -> dict[str, Sequence[object]] | None:
    """`PROJECT_ONTO_ORDERS`'s parameters for these newly stored events; None if they project
    nothing."""
    newest_state: dict[str, OrderEvent] = {}
    newest_reason: dict[str, OrderEvent] = {}
    newest_fact: dict[tuple[str, EventType], OrderEvent] = {}
    for event in new_events:
        if event.seq == 0:  # a rejection outside any lifecycle, nothing to project
            continue
        if event.type in STATE_OF_EVENT:
            _keep_newest(newest_state, event.order_id, event)
            if _reason_of(event.data):
                _keep_newest(newest_reason, event.order_id, event)
        if event.type in FACT_OF_EVENT:
            _keep_newest(newest_fact, (event.order_id, event.type), event)
    # the newest event of a fact's type wins: one that carries no value leaves the column as it is
    facts = [event for event in newest_fact.values() if _fact_of(event.data) is not None]
    if not newest_state and not facts:
        return None
    state_orders = list(newest_state)
    reasons = [newest_reason.get(order_id) for order_id in state_orders]
    return {
        "state_order_ids": state_orders,
        "state_seqs": [newest_state[order_id].seq for order_id in state_orders],
        "states": [STATE_OF_EVENT[newest_state[order_id].type].value for order_id in state_orders],
        "state_times": [newest_state[order_id].occurred_at for order_id in state_orders],
        "reason_seqs": [None if event is None else event.seq for event in reasons],
        "reasons": [None if event is None else _reason_of(event.data) for event in reasons],
        "fact_order_ids": [event.order_id for event in facts],
        "fact_types": [event.type.value for event in facts],
        "fact_seqs": [event.seq for event in facts],
        "fact_times": [event.occurred_at for event in facts],
        "addresses": [None if value is None else value.model_dump_json() for value in _addresses(facts)],
        "tracking_numbers": _values(facts, "tracking_number"),
        "placed_bys": _values(facts, "placed_by"),
        "approved_bys": _values(facts, "approved_by"),
    }


def _keep_newest(newest: dict[Key, OrderEvent], key: Key, event: OrderEvent) -> None:
    if key not in newest or newest[key].seq < event.seq:
        newest[key] = event


def _values(facts: list[OrderEvent], column: str) -> list[str | None]:
    """Per fact event, the value it carries for `column`; None where it carries another's."""
    values = [_fact_of(event.data) if FACT_OF_EVENT[event.type] == column else None for event in facts]
    return [value if isinstance(value, str) else None for value in values]


def _addresses(facts: list[OrderEvent]) -> list[Address | None]:
    return [event.data.address if isinstance(event.data, AddressUpdatedData) else None for event in facts]


def _fact_of(data: EventPayload) -> str | Address | None:
    """The value an event carries for its type's column in FACT_OF_EVENT."""
    match data:
        case QueuedData(placed_by=value) | ReceivedData(placed_by=value) | ApprovedData(approved_by=value):
            return value
        case AddressUpdatedData(address=value):
            return value
        case CarrierDispatchedData(tracking_number=value) | ShippedData(tracking_number=value):
            return value
    return None


def _reason_of(data: EventPayload) -> str | None:
    """Why an order ended, if it did and says why."""
    match data:
        case CancelledData(reason=reason) | FailedData(reason=reason) | TerminatedData(reason=reason):
            return reason or None
    return None
