"""The audit consumer: each event on `orders.events` is stored once and projected onto the `orders`
read model, in batched transactions acked after their commit; it counts how lifecycles end."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial

import structlog
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import Counter, Histogram
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from services.audit.projection import record_events
from services.audit.reconciliation import RECONCILE_EVERY_SECONDS, repair_rows_behind
from shared import broker, db
from shared.broker import declare_audit_queue
from shared.consuming import QueueConsumer, periodically, retry_transient
from shared.contracts import EventType, OrderEvent
from shared.db import AuditEvent
from shared.settings import Settings

CONSUMER_NAME = "audit"
MAX_BATCH = 200

log = structlog.get_logger(__name__)

BATCH_SIZE = Histogram(
    "orderflow_audit_batch_events",
    "Events the audit consumer wrote per committed transaction",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200),
)
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
# the (order_id, seq) index covers lifecycle events, seq > 0
ADMISSIONS = select(col(AuditEvent.order_id), col(AuditEvent.occurred_at)).where(
    col(AuditEvent.order_id).in_(bindparam("order_ids", expanding=True)),
    col(AuditEvent.seq) > 0,
    col(AuditEvent.type) == EventType.ADMITTED.value,
)


async def run_audit(settings: Settings, stop: asyncio.Event) -> None:
    """Consume events until `stop` is set, let in-flight ones finish, then disconnect."""
    engine = db.create_engine(settings)
    sessions = db.session_factory(engine)
    try:
        async with await broker.connect(settings, CONSUMER_NAME) as connection:
            channel, topology = await broker.open_channel(connection, settings.audit_prefetch)
            queue = await declare_audit_queue(channel, topology, settings)
            audit = AuditLog(
                sessions,
                stop,
                # a batch cannot outgrow what the broker hands out unacked
                max_batch=min(MAX_BATCH, settings.audit_prefetch),
                linger_seconds=settings.audit_batch_linger_ms / 1000,
            )
            consumer = QueueConsumer(
                CONSUMER_NAME, topology, settings.max_event_deliveries, stop, settings.drain_seconds
            )
            repair = partial(repair_rows_behind, sessions)
            await asyncio.gather(
                consumer.run(queue, OrderEvent.model_validate_json, audit.handle),
                periodically(stop, RECONCILE_EVERY_SECONDS, repair, "reconciliation failed; trying again"),
            )
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class PendingEvent:
    """An event waiting for its batch; its handler awaits `recorded`."""

    message: AbstractIncomingMessage
    event: OrderEvent
    recorded: asyncio.Future[bool]
    write_by: float  # the loop's time when its linger ends


class AuditLog:
    """Records events in batches (of up to `max_batch`, lingering `linger_seconds`), acked once
    committed; a batch that fails is retried one event at a time, so a bad event fails alone."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        stop: asyncio.Event,
        max_batch: int = MAX_BATCH,
        linger_seconds: float = 0.0,
    ) -> None:
        self._sessions = sessions
        self._stop = stop
        self._max_batch = max_batch
        self._linger_seconds = linger_seconds
        self._pending: list[PendingEvent] = []
        self._batch_full = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._first_unacked: tuple[object, int] = (None, 1)  # a channel and its first delivery not acked

    async def handle(self, message: AbstractIncomingMessage, event: OrderEvent) -> None:
        structlog.contextvars.bind_contextvars(
            order_id=event.order_id, event_id=str(event.event_id), event_type=event.type.value, seq=event.seq
        )
        loop = asyncio.get_running_loop()
        recorded: asyncio.Future[bool] = loop.create_future()
        self._pending.append(PendingEvent(message, event, recorded, loop.time() + self._linger_seconds))
        if len(self._pending) >= self._max_batch:
            self._batch_full.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        if await recorded:
            log.debug("event recorded", outcome="recorded")  # the workers log each transition already
        else:
            log.info("duplicate event", outcome="duplicate")

    async def _write_pending(self) -> None:
        while self._pending:
            # a batch is written once its oldest event has lingered, it is full, or on stop
            linger_left = self._pending[0].write_by - asyncio.get_running_loop().time()
            if linger_left > 0 and len(self._pending) < self._max_batch and not self._stop.is_set():
                self._batch_full.clear()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_full.wait(), linger_left)
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            await self._write(batch)

    async def _write(self, batch: list[PendingEvent]) -> None:
        events = [pending.event for pending in batch]
        try:
            outcomes = await retry_transient(lambda: self._record(events), self._stop)
            await self._ack([pending.message for pending in batch])
        except Exception as error:  # noqa: BLE001 (whatever failed, each event is tried alone)
            if len(batch) > 1:
                for single in batch:
                    await self._write([single])
            elif not batch[0].recorded.cancelled():
                batch[0].recorded.set_exception(error)
            return
        for pending, is_new in zip(batch, outcomes, strict=True):
            # a handler cancelled meanwhile (its event is stored and acked all the same) must not stop it
            if not pending.recorded.cancelled():
                pending.recorded.set_result(is_new)

    async def _ack(self, messages: list[AbstractIncomingMessage]) -> None:
        """One multiple ack when `messages` are all that their channel (a new one's tags start at 1) has
        not acked, else one each: a gap is a message dead-lettered, requeued or left for redelivery."""
        channel = messages[0].channel
        first = self._first_unacked[1] if self._first_unacked[0] is channel else 1
        whole = all(m.channel is channel and m.delivery_tag == first + i for i, m in enumerate(messages))
        self._first_unacked = (channel, first + len(messages) if whole else 0)  # 0: single acks for good
        for message in messages[-1:] if whole else messages:
            await message.ack(multiple=whole)

    async def _record(self, events: list[OrderEvent]) -> list[bool]:
        async with db.transaction(self._sessions) as session:
            recorded = await record_events(session, events)
            new = zip(events, recorded, strict=True)
            endings = await lifecycle_endings(session, [event for event, is_new in new if is_new])
        # once committed: a batch rolled back is recorded (and counted) again
        for outcome, seconds in endings:
            LIFECYCLES_ENDED.labels(outcome.value).inc()
            if seconds is not None:
                LIFECYCLE_DURATION.labels(outcome.value).observe(seconds)
        BATCH_SIZE.observe(len(events))
        return recorded


async def lifecycle_endings(
    session: AsyncSession, events: Sequence[OrderEvent]
) -> list[tuple[EventType, float | None]]:
    """Each terminal event's type and the seconds since its order's `admitted` (None if not recorded)."""
    terminals = [event for event in events if event.type.is_terminal]
    if not terminals:
        return []
    order_ids = sorted({terminal.order_id for terminal in terminals})
    admitted_at = dict((await session.execute(ADMISSIONS, {"order_ids": order_ids})).all())
    return [
        (terminal.type, None if admitted is None else (terminal.occurred_at - admitted).total_seconds())
        for terminal in terminals
        for admitted in [admitted_at.get(terminal.order_id)]
    ]
