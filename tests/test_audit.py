"""The audit consumer against real RabbitMQ and PostgreSQL: events stored once, the read model
projected without ever moving back, bad events dead-lettered, outages waited out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
import pytest_asyncio
from aio_pika import IncomingMessage
from aio_pika.abc import AbstractQueue
from aiormq.exceptions import ChannelInvalidStateError
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from services.audit.consumer import AuditLog, run_audit
from services.audit.projection import record_events
from services.audit.reconciliation import repair_rows_behind
from shared.broker import ERROR_HEADER, declare_audit_queue
from shared.contracts import (
    Address,
    CommandRejectedData,
    CommandType,
    CompletedData,
    EventType,
    OrderEvent,
    OrderState,
)
from shared.db import AuditEvent, Order, transaction
from shared.settings import Settings
from testsupport.amqp import (
    Broker,
    consumer_queue,
    dead_letter_of,
    dead_lettered,
    own_queues,
    publish,
    publish_raw,
    verdict,
    was_dead_lettered,
)
from testsupport.orders import ADDRESS, NEW_ADDRESS, unique_id
from testsupport.polling import eventually
from testsupport.read_model import EVENTS_START, event, insert_order
from testsupport.services import DownDatabase, running

Sessions = async_sessionmaker[AsyncSession]
Acks = list[tuple[int | None, bool]]
"""The acks a channel was sent, in order: each delivery tag, and whether it acked all up to it."""

START = EVENTS_START
# as the events carry it: every field, unset ones null
NEWEST_ADDRESS: dict[str, Any] = Address.model_validate(
    {**ADDRESS, "line1": "221B Baker Street", "postal_code": "NW1 6XE"}
).model_dump()


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def audit_settings(base_settings: Settings) -> Settings:
    """An audit queue of this test's own; a poison event gets two tries."""
    return own_queues(base_settings, max_event_deliveries=2)


@pytest_asyncio.fixture
async def audit_queue(audit_settings: Settings, broker_channel: Broker) -> AsyncIterator[str]:
    channel, topology = broker_channel
    async with consumer_queue(declare_audit_queue(channel, topology, audit_settings)):
        yield audit_settings.audit_queue


@pytest_asyncio.fixture
async def audit(audit_settings: Settings, audit_queue: str, db_sessions: Sessions) -> AsyncIterator[Settings]:
    async with running(run_audit, audit_settings):
        yield audit_settings


@pytest.fixture
def acks(monkeypatch: pytest.MonkeyPatch) -> Acks:
    """Every ack of a message this process consumes from the broker."""
    sent: Acks = []
    ack = IncomingMessage.ack

    async def recorded(message: IncomingMessage, multiple: bool = False) -> None:
        sent.append((message.delivery_tag, multiple))
        await ack(message, multiple)

    monkeypatch.setattr(IncomingMessage, "ack", recorded)
    return sent


@pytest_asyncio.fixture
async def order_id(db_sessions: Sessions) -> str:
    """An order whose read-model row exists, as `order_received` inserts it."""
    order_id = unique_id("ord")
    await insert_order(db_sessions, order_id, OrderState.RECEIVED, created_at=START)
    return order_id


# --- helpers -------------------------------------------------------------------------------------
def settled(acks: Acks) -> set[int | None]:
    """The deliveries `acks` settled, each once: a second ack of one (the broker would close the
    channel) means a multiple ack swept a delivery whose settling was someone else's."""
    done: set[int | None] = set()
    for tag, multiple in acks:
        assert tag not in done, f"delivery {tag} acked twice"
        done |= set(range(1, (tag or 0) + 1)) if multiple else {tag}
    return done


async def stored_events(sessions: Sessions, order_id: str) -> list[AuditEvent]:
    async with sessions() as session:
        rows = await session.scalars(
            select(AuditEvent).where(col(AuditEvent.order_id) == order_id).order_by(col(AuditEvent.seq))
        )
        return list(rows)


async def stored(sessions: Sessions, *events: OrderEvent) -> None:
    """Wait until every one of `events` is in the audit table."""

    async def all_stored() -> bool:
        async with sessions() as session:
            found = await session.scalars(
                select(col(AuditEvent.event_id)).where(
                    col(AuditEvent.event_id).in_([e.event_id for e in events])
                )
            )
            return len(list(found)) == len(events)

    await eventually(all_stored)


async def order_row(sessions: Sessions, order_id: str) -> Order:
    async with sessions() as session:
        order = await session.get(Order, order_id, populate_existing=True)
    assert order is not None
    return order


async def progress(sessions: Sessions, order_id: str) -> tuple[str, int, datetime | None]:
    order = await order_row(sessions, order_id)
    return order.state, order.last_event_seq, order.updated_at


# --- storing -------------------------------------------------------------------------------------
async def test_an_event_delivered_twice_is_stored_once(
    audit_settings: Settings,
    audit_queue: str,
    broker_channel: Broker,
    dead_letters: AbstractQueue,
    db_sessions: Sessions,
    order_id: str,
) -> None:
    received, validated = (
        event(order_id, 1, EventType.RECEIVED),
        event(order_id, 2, EventType.VALIDATED),
    )
    await publish(broker_channel, received, received, validated)

    # one message at a time, in queue order: once `validated` is stored, the repeat was handled
    async with running(run_audit, audit_settings.model_copy(update={"audit_prefetch": 1})):
        await stored(db_sessions, validated)

    assert [(row.event_id, row.seq) for row in await stored_events(db_sessions, order_id)] == [
        (received.event_id, 1),
        (validated.event_id, 2),
    ]
    assert not await was_dead_lettered(dead_letters, str(received.event_id))


async def test_events_are_stored_whole(
    audit: Settings, broker_channel: Broker, db_sessions: Sessions
) -> None:
    rejection = OrderEvent(
        event_id=uuid4(),
        type=EventType.COMMAND_REJECTED,
        order_id=unique_id("ord"),
        seq=0,
        occurred_at=START,
        correlation_id="corr-7",
        command_id=uuid4(),
        data=CommandRejectedData(command_type=CommandType.APPROVE, reason="unknown order"),
    )
    await publish(broker_channel, rejection)
    await stored(db_sessions, rejection)

    [row] = await stored_events(db_sessions, rejection.order_id)
    # the table adds when it recorded the event and where in commit order
    assert OrderEvent.model_validate(row.model_dump(exclude={"recorded_at", "position"})) == rejection


async def test_rejections_outside_a_lifecycle_are_all_kept(
    audit: Settings, broker_channel: Broker, db_sessions: Sessions
) -> None:
    """seq 0 is not unique per order: each rejection of an unknown order is its own event."""
    unknown_order = unique_id("ord")
    rejections = [
        event(unknown_order, 0, EventType.COMMAND_REJECTED, reason="unknown order") for _ in range(2)
    ]
    await publish(broker_channel, *rejections)

    await stored(db_sessions, *rejections)


# --- the read model ------------------------------------------------------------------------------
async def test_an_older_event_arriving_late_does_not_move_the_state_back(
    audit: Settings, broker_channel: Broker, db_sessions: Sessions, order_id: str
) -> None:
    received, validated, awaiting = (
        event(order_id, 1, EventType.RECEIVED),
        event(order_id, 2, EventType.VALIDATED),
        event(order_id, 3, EventType.AWAITING_APPROVAL),
    )
    await publish(broker_channel, received, awaiting)
    await stored(db_sessions, received, awaiting)
    assert await progress(db_sessions, order_id) == ("awaiting_approval", 3, awaiting.occurred_at)

    await publish(broker_channel, validated)
    await stored(db_sessions, validated)
    assert await progress(db_sessions, order_id) == ("awaiting_approval", 3, awaiting.occurred_at)


async def test_the_newest_address_wins_whatever_the_arrival_order(
    audit: Settings, broker_channel: Broker, db_sessions: Sessions, order_id: str
) -> None:
    first_change = event(order_id, 2, EventType.ADDRESS_UPDATED, address=NEW_ADDRESS)
    second_change = event(order_id, 3, EventType.ADDRESS_UPDATED, address=NEWEST_ADDRESS)
    approved = event(order_id, 4, EventType.APPROVED)
    # the newest state first: a late address change still applies, it does not change the state
    await publish(broker_channel, approved)
    await stored(db_sessions, approved)
    await publish(broker_channel, second_change)
    await stored(db_sessions, second_change)
    await publish(broker_channel, first_change)
    await stored(db_sessions, first_change)

    order = await order_row(db_sessions, order_id)
    assert (order.state, order.last_event_seq, order.address) == ("approved", 4, NEWEST_ADDRESS)


async def test_the_lifecycle_projects_onto_the_order(
    audit: Settings, broker_channel: Broker, db_sessions: Sessions, order_id: str
) -> None:
    lifecycle_and_state = [
        (event(order_id, 1, EventType.RECEIVED), "received"),
        (event(order_id, 2, EventType.VALIDATED), "validated"),
        (event(order_id, 3, EventType.AWAITING_APPROVAL), "awaiting_approval"),
        (event(order_id, 4, EventType.APPROVED), "approved"),
        (event(order_id, 5, EventType.PAYMENT_CHARGED), "paid"),
        (event(order_id, 6, EventType.SHIPPING_STARTED), "shipping"),
        (event(order_id, 7, EventType.CARRIER_DISPATCHED, tracking_number="TRK-1"), "shipping"),
        (event(order_id, 8, EventType.CANCELLED, reason="customer request"), "cancelled"),
    ]
    for one, state in lifecycle_and_state:
        await publish(broker_channel, one)
        await stored(db_sessions, one)
        assert await progress(db_sessions, order_id) == (state, one.seq, one.occurred_at)

    order = await order_row(db_sessions, order_id)
    assert (order.reason, order.tracking_number, order.last_event_seq) == (
        "customer request",
        "TRK-1",
        8,
    )


# --- failures ------------------------------------------------------------------------------------
async def test_invalid_events_are_dead_lettered_and_the_consumer_keeps_going(
    audit: Settings, broker_channel: Broker, dead_letters: AbstractQueue, db_sessions: Sessions, acks: Acks
) -> None:
    events = broker_channel[1].events
    received = event(unique_id("ord"), 1, EventType.RECEIVED).model_dump_json()
    first = event(unique_id("ord"), 1, EventType.RECEIVED)
    await publish(broker_channel, first)
    not_json = await publish_raw(events, "order.received", b"\xff not json")
    not_an_event = await publish_raw(
        events, "order.received", received.replace('"seq":1', '"seq":-1').encode()
    )
    valid = event(unique_id("ord"), 1, EventType.RECEIVED)
    await publish(broker_channel, valid)

    await stored(db_sessions, first, valid)
    dead = await dead_lettered(dead_letters, {not_json, not_an_event})
    assert verdict(dead[not_json]) == ("invalid_json", "audit")
    assert verdict(dead[not_an_event]) == ("schema_invalid", "audit")
    assert "seq" in str(dead[not_an_event].headers[ERROR_HEADER])

    # each of the four deliveries settled once: no ack of the audit's swept a dead letter's
    async def all_settled() -> bool:
        return settled(acks) == {1, 2, 3, 4}

    await eventually(all_settled)


async def test_an_event_that_keeps_failing_is_dead_lettered_after_its_deliveries(
    audit: Settings,
    broker_channel: Broker,
    dead_letters: AbstractQueue,
    db_sessions: Sessions,
    order_id: str,
) -> None:
    # the tracking_number column holds 64 characters: projecting this event fails every time
    unfit = event(order_id, 1, EventType.CARRIER_DISPATCHED, tracking_number="T" * 65)
    await publish(broker_channel, unfit)

    dead = await dead_letter_of(dead_letters, str(unfit.event_id))
    assert verdict(dead) == ("processing_failed", "audit")
    assert "too long" in str(dead.headers[ERROR_HEADER])
    assert await stored_events(db_sessions, order_id) == []  # its transaction rolled back whole


async def test_a_database_outage_neither_loses_nor_dead_letters_an_event(
    audit_settings: Settings,
    audit_queue: str,
    broker_channel: Broker,
    dead_letters: AbstractQueue,
    db_sessions: Sessions,
) -> None:
    received = event(unique_id("ord"), 1, EventType.RECEIVED)
    await publish(broker_channel, received)
    async with DownDatabase() as down, running(run_audit, down.settings_for(audit_settings)):
        await eventually(down.retried)

    assert not await was_dead_lettered(dead_letters, str(received.event_id))
    async with running(run_audit, audit_settings):
        await stored(db_sessions, received)


class Deliveries:
    """A channel's deliveries, just enough of each for `AuditLog`; their acks are kept."""

    def __init__(self) -> None:
        self.acks: Acks = []
        self.closed = False
        self._delivered = 0

    def next(self) -> AckedMessage:
        self._delivered += 1
        return AckedMessage(self, self._delivered)


class AckedMessage:
    """An incoming message as `AuditLog` uses it: a delivery tag on a channel, and its ack."""

    def __init__(self, deliveries: Deliveries, delivery_tag: int) -> None:
        self._deliveries, self.delivery_tag = deliveries, delivery_tag

    @property
    def channel(self) -> Deliveries:
        if self._deliveries.closed:
            raise ChannelInvalidStateError  # as aio-pika's message does
        return self._deliveries

    @property
    def acked(self) -> bool:
        return self.delivery_tag in settled(self._deliveries.acks)

    async def ack(self, multiple: bool = False) -> None:
        self.channel.acks.append((self.delivery_tag, multiple))


async def test_events_arriving_together_share_a_transaction_and_a_bad_one_fails_alone(
    db_sessions: Sessions, order_id: str
) -> None:
    audit_log = AuditLog(db_sessions, asyncio.Event(), max_batch=50)
    good = [event(order_id, seq, EventType.VALIDATED) for seq in (1, 2, 3)]
    unfit = event(order_id, 4, EventType.CARRIER_DISPATCHED, tracking_number="T" * 65)
    deliveries = Deliveries()
    messages = [deliveries.next() for _ in range(4)]

    outcomes = await asyncio.gather(
        *(audit_log.handle(m, e) for m, e in zip(messages, [*good, unfit], strict=True)),  # type: ignore[arg-type]
        return_exceptions=True,
    )

    assert outcomes[:3] == [None, None, None]
    assert "too long" in str(outcomes[3])
    assert [m.acked for m in messages] == [True, True, True, False]
    assert [row.seq for row in await stored_events(db_sessions, order_id)] == [1, 2, 3]
    # the bad one is its consumer's to requeue or dead-letter: no later ack may settle it
    later = deliveries.next()
    await audit_log.handle(later, event(order_id, 5, EventType.VALIDATED))  # type: ignore[arg-type]
    assert (deliveries.acks[-1], messages[3].acked) == ((later.delivery_tag, False), False)


async def test_a_batch_with_every_delivery_not_acked_yet_is_acked_at_once(
    db_sessions: Sessions, order_id: str
) -> None:
    audit_log = AuditLog(db_sessions, asyncio.Event(), max_batch=3)
    deliveries = Deliveries()

    for seqs in ((1, 2, 3), (4, 5, 6)):
        batch = [(deliveries.next(), event(order_id, seq, EventType.VALIDATED)) for seq in seqs]
        await asyncio.gather(*(audit_log.handle(m, e) for m, e in batch))  # type: ignore[arg-type]

    assert deliveries.acks == [(3, True), (6, True)]


async def test_after_a_delivery_settled_elsewhere_each_event_is_acked_alone(
    db_sessions: Sessions, order_id: str
) -> None:
    """A message the consumer dead-letters never reaches the log, and is acked by the consumer when
    it is in the dead-letter queue: a multiple ack must not settle it before."""
    audit_log = AuditLog(db_sessions, asyncio.Event(), max_batch=2)
    deliveries = Deliveries()
    dead_lettered = deliveries.next()

    for seqs in ((1, 2), (3, 4)):
        batch = [(deliveries.next(), event(order_id, seq, EventType.VALIDATED)) for seq in seqs]
        await asyncio.gather(*(audit_log.handle(m, e) for m, e in batch))  # type: ignore[arg-type]

    assert deliveries.acks == [(2, False), (3, False), (4, False), (5, False)]
    assert not dead_lettered.acked
    # a new channel (after a reconnect) has nothing unacked before its first delivery
    reconnected = Deliveries()
    batch = [(reconnected.next(), event(order_id, seq, EventType.VALIDATED)) for seq in (5, 6)]
    await asyncio.gather(*(audit_log.handle(m, e) for m, e in batch))  # type: ignore[arg-type]
    assert reconnected.acks == [(2, True)]


def batches_written() -> tuple[float, float]:
    """How many batches the audit consumers of this process committed, and how many events."""
    return (
        REGISTRY.get_sample_value("orderflow_audit_batch_events_count") or 0.0,
        REGISTRY.get_sample_value("orderflow_audit_batch_events_sum") or 0.0,
    )


async def test_events_published_apart_gather_in_one_batch_for_its_linger(
    audit_settings: Settings,
    audit_queue: str,
    broker_channel: Broker,
    db_sessions: Sessions,
    order_id: str,
    acks: Acks,
) -> None:
    lifecycle = [event(order_id, seq, EventType.VALIDATED) for seq in range(1, 9)]
    before = batches_written()

    async with running(run_audit, audit_settings.model_copy(update={"audit_batch_linger_ms": 1000})):
        # each apart long enough for a batch of its own to commit, all within the first one's linger
        for one in lifecycle:
            await publish(broker_channel, one)
            await asyncio.sleep(0.04)
        await stored(db_sessions, *lifecycle)

    batches, events = batches_written()
    assert (batches, events) == (before[0] + 1, before[1] + len(lifecycle))
    assert acks == [(len(lifecycle), True)]  # the broker's consumer channel delivered them, from tag 1
    queue = await broker_channel[0].declare_queue(audit_queue, passive=True)
    assert queue.declaration_result.message_count == 0  # all acked: none handed back when it stopped


async def test_a_full_batch_is_written_without_waiting_out_its_linger(
    db_sessions: Sessions, order_id: str
) -> None:
    audit_log = AuditLog(db_sessions, asyncio.Event(), max_batch=3, linger_seconds=60)
    events = [event(order_id, seq, EventType.VALIDATED) for seq in (1, 2, 3)]
    deliveries = Deliveries()
    messages = [deliveries.next() for _ in events]
    before = batches_written()

    handling = (audit_log.handle(m, e) for m, e in zip(messages, events, strict=True))  # type: ignore[arg-type]
    await asyncio.wait_for(asyncio.gather(*handling), timeout=10)

    assert batches_written() == (before[0] + 1, before[1] + 3)
    assert all(m.acked for m in messages)


async def test_a_handler_cancelled_mid_batch_holds_up_no_later_event(
    db_sessions: Sessions, order_id: str
) -> None:
    """When the broker connection drops, the handlers of its deliveries are cancelled, possibly
    while their batch is being written (the broker delivers those events again: their channel,
    closed, can ack nothing). The events that arrive meanwhile must still be recorded and acked."""
    audit_log = AuditLog(db_sessions, asyncio.Event())
    dropped, kept = event(order_id, 1, EventType.RECEIVED), event(order_id, 2, EventType.VALIDATED)
    lost, reconnected = Deliveries(), Deliveries()
    kept_message = reconnected.next()

    dropped_handler = asyncio.create_task(audit_log.handle(lost.next(), dropped))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # it has handed its event to the writer and waits for the batch
    dropped_handler.cancel()
    lost.closed = True
    await asyncio.wait_for(audit_log.handle(kept_message, kept), timeout=10)  # type: ignore[arg-type]

    assert (lost.acks, reconnected.acks) == ([], [(1, True)])
    assert [row.seq for row in await stored_events(db_sessions, order_id)] == [1, 2]


# --- batches ---------------------------------------------------------------------------------------
async def record(sessions: Sessions, *events: OrderEvent) -> list[bool]:
    """The events recorded in one transaction, as one batch of the consumer."""
    async with transaction(sessions) as session:
        return await record_events(session, events)


def ended(outcome: str) -> tuple[float, float, float]:
    """The lifecycles counted as ended with `outcome`, and the count and sum of their durations."""
    labels = {"outcome": outcome}
    return (
        REGISTRY.get_sample_value("orderflow_lifecycles_ended_total", labels) or 0.0,
        REGISTRY.get_sample_value("orderflow_lifecycle_duration_seconds_count", labels) or 0.0,
        REGISTRY.get_sample_value("orderflow_lifecycle_duration_seconds_sum", labels) or 0.0,
    )


async def test_a_batch_tells_new_events_from_repeats(db_sessions: Sessions, order_id: str) -> None:
    received, validated, approved = (
        event(order_id, 1, EventType.RECEIVED),
        event(order_id, 2, EventType.VALIDATED),
        event(order_id, 4, EventType.APPROVED),
    )
    await record(db_sessions, validated)
    # another event under a seq already stored is a repeat too, whatever its id
    same_seq = event(order_id, 2, EventType.AWAITING_APPROVAL)

    outcomes = await record(db_sessions, received, validated, received, same_seq, approved)

    assert outcomes == [True, False, False, False, True]
    assert [(row.seq, row.type) for row in await stored_events(db_sessions, order_id)] == [
        (1, "received"),
        (2, "validated"),
        (4, "approved"),
    ]
    assert await progress(db_sessions, order_id) == ("approved", 4, approved.occurred_at)


async def test_a_batch_out_of_seq_order_leaves_the_order_at_its_newest_event(
    db_sessions: Sessions, order_id: str
) -> None:
    validated, awaiting, charged = (
        event(order_id, 2, EventType.VALIDATED),
        event(order_id, 3, EventType.AWAITING_APPROVAL),
        event(order_id, 5, EventType.PAYMENT_CHARGED),
    )
    await record(db_sessions, charged, validated, awaiting)
    assert await progress(db_sessions, order_id) == ("paid", 5, charged.occurred_at)

    await record(db_sessions, event(order_id, 4, EventType.APPROVED))
    assert await progress(db_sessions, order_id) == ("paid", 5, charged.occurred_at)


async def test_a_reason_stays_until_a_newer_event_brings_one(db_sessions: Sessions, order_id: str) -> None:
    """A state-changing event without a reason leaves the one an older event of the same batch
    brought, as when they come one at a time."""
    failed = event(order_id, 5, EventType.FAILED, reason="payment declined")
    terminated = event(order_id, 6, EventType.TERMINATED, reason="")
    await record(db_sessions, failed, terminated)

    order = await order_row(db_sessions, order_id)
    assert (order.state, order.last_event_seq, order.reason) == ("terminated", 6, "payment declined")


async def test_events_of_an_order_without_a_row_are_stored_and_project_nothing(
    db_sessions: Sessions,
) -> None:
    order_id = unique_id("ord")
    events = [
        event(order_id, 1, EventType.RECEIVED),
        event(order_id, 2, EventType.ADDRESS_UPDATED, address=NEW_ADDRESS),
        event(order_id, 3, EventType.CARRIER_DISPATCHED, tracking_number="TRK-1"),
    ]

    assert await record(db_sessions, *events) == [True, True, True]

    assert [row.seq for row in await stored_events(db_sessions, order_id)] == [1, 2, 3]
    async with db_sessions() as session:
        assert await session.get(Order, order_id) is None


async def test_a_row_committed_after_its_events_is_repaired_and_counted(db_sessions: Sessions) -> None:
    order_id = unique_id("ord")
    await record(
        db_sessions,
        event(order_id, 1, EventType.QUEUED, placed_by="alice"),
        event(order_id, 2, EventType.CANCELLED, reason="changed my mind"),
    )  # projected onto no row
    await insert_order(db_sessions, order_id, OrderState.QUEUED)  # committed after them
    repairs_before = REGISTRY.get_sample_value("orderflow_read_model_repairs_total") or 0.0

    repaired = await repair_rows_behind(db_sessions)

    assert order_id in repaired
    assert REGISTRY.get_sample_value("orderflow_read_model_repairs_total") == repairs_before + len(repaired)
    order = await order_row(db_sessions, order_id)
    assert (order.state, order.last_event_seq, order.reason, order.placed_by) == (
        "cancelled",
        2,
        "changed my mind",
        "alice",
    )
    assert order_id not in await repair_rows_behind(db_sessions)  # in step with its events now


async def test_a_fact_older_than_one_recorded_changes_nothing(db_sessions: Sessions, order_id: str) -> None:
    newest = event(order_id, 3, EventType.ADDRESS_UPDATED, address=NEWEST_ADDRESS)
    await record(db_sessions, newest)

    await record(db_sessions, event(order_id, 2, EventType.ADDRESS_UPDATED, address=NEW_ADDRESS))

    order = await order_row(db_sessions, order_id)
    assert (order.address, order.updated_at) == (NEWEST_ADDRESS, newest.occurred_at)


async def test_the_newest_facts_of_a_batch_win(db_sessions: Sessions, order_id: str) -> None:
    dispatched = event(order_id, 7, EventType.CARRIER_DISPATCHED, tracking_number="TRK-1", address=ADDRESS)
    shipped = event(order_id, 8, EventType.SHIPPED, tracking_number="TRK-2")
    changes = [
        event(order_id, seq, EventType.ADDRESS_UPDATED, address=address)
        for seq, address in ((3, NEW_ADDRESS), (4, NEWEST_ADDRESS))
    ]
    await record(db_sessions, changes[1], dispatched, changes[0], shipped)

    order = await order_row(db_sessions, order_id)
    # the dispatch's `address` is where it went, not a change of the order's address
    assert (order.address, order.tracking_number) == (NEWEST_ADDRESS, "TRK-2")
    assert await progress(db_sessions, order_id) == ("shipped", 8, shipped.occurred_at)


async def test_who_placed_and_who_approved_are_projected(db_sessions: Sessions, order_id: str) -> None:
    await record(db_sessions, event(order_id, 1, EventType.QUEUED, placed_by="alice"))
    assert (await order_row(db_sessions, order_id)).placed_by == "alice"
    approved = event(order_id, 5, EventType.APPROVED, approved_by="rita", note=None)
    await record(db_sessions, event(order_id, 3, EventType.RECEIVED, placed_by="alice"), approved)

    order = await order_row(db_sessions, order_id)
    assert (order.state, order.placed_by, order.approved_by) == ("approved", "alice", "rita")


async def test_a_fact_recorded_concurrently_is_not_overtaken_by_an_older_one(
    db_sessions: Sessions, order_id: str
) -> None:
    """A batch waits for one storing events before it (the table's position lock), then sees its
    events: an older fact recorded meanwhile does not replace the newer one."""
    newer = event(order_id, 3, EventType.ADDRESS_UPDATED, address=NEWEST_ADDRESS)
    older = event(order_id, 2, EventType.ADDRESS_UPDATED, address=NEW_ADDRESS)
    async with transaction(db_sessions) as session:
        await record_events(session, [newer])
        recording_older = asyncio.create_task(record(db_sessions, older))
        await asyncio.sleep(0.3)
        assert not recording_older.done()
    assert await recording_older == [True]

    assert (await order_row(db_sessions, order_id)).address == NEWEST_ADDRESS


async def test_a_batch_with_an_ending_counts_it_once(db_sessions: Sessions, order_id: str) -> None:
    audit_log = AuditLog(db_sessions, asyncio.Event())
    admitted = event(order_id, 2, EventType.ADMITTED)
    completed = OrderEvent(
        event_id=uuid4(),
        type=EventType.COMPLETED,
        order_id=order_id,
        seq=3,
        occurred_at=admitted.occurred_at + timedelta(seconds=3.5),
        data=CompletedData(),
    )
    before = ended("completed")

    batch = [admitted, event(order_id, 1, EventType.RECEIVED), completed, completed]
    deliveries = Deliveries()
    await asyncio.gather(*(audit_log.handle(deliveries.next(), one) for one in batch))  # type: ignore[arg-type]
    await audit_log.handle(deliveries.next(), completed)  # type: ignore[arg-type]

    count, timed, seconds = ended("completed")
    assert (count, timed) == (before[0] + 1, before[1] + 1)
    assert seconds == pytest.approx(before[2] + 3.5)
    assert await progress(db_sessions, order_id) == ("completed", 3, completed.occurred_at)
