"""The audit consumer: every event on `orders.events` lands once in `order_events`, and the
`orders` read model follows it (`projection`), in one transaction acked after its commit."""

from __future__ import annotations

import asyncio

import structlog
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.audit.projection import record_event
from shared import db
from shared.broker import declare_audit_queue
from shared.consuming import QueueConsumer, consumer_channel, retry_transient
from shared.contracts import OrderEvent
from shared.settings import Settings

CONSUMER_NAME = "audit"

log = structlog.get_logger(__name__)


async def run_audit(settings: Settings, stop: asyncio.Event) -> None:
    """Consume events until `stop` is set, let in-flight ones finish, then disconnect."""
    engine = db.create_engine(settings)
    broker_channel = consumer_channel(settings, CONSUMER_NAME, settings.audit_prefetch)
    try:
        async with broker_channel as (channel, topology):
            queue = await declare_audit_queue(channel, topology, settings)
            audit = AuditLog(db.session_factory(engine), stop)
            consumer = QueueConsumer(CONSUMER_NAME, topology, settings.max_event_deliveries, stop)
            await consumer.run(queue, OrderEvent.model_validate_json, audit.handle)
    finally:
        await engine.dispose()


class AuditLog:
    """Records each event (and its projection) in one transaction, then acks it."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], stop: asyncio.Event) -> None:
        self._sessions = sessions
        self._stop = stop

    async def handle(self, message: AbstractIncomingMessage, event: OrderEvent) -> None:
        structlog.contextvars.bind_contextvars(
            order_id=event.order_id,
            event_id=str(event.event_id),
            event_type=event.type.value,
            seq=event.seq,
        )
        recorded = await retry_transient(lambda: self._record(event), self._stop)
        await message.ack()
        log.info(
            "event recorded" if recorded else "duplicate event",
            outcome="recorded" if recorded else "duplicate",
        )

    async def _record(self, event: OrderEvent) -> bool:
        async with db.transaction(self._sessions) as session:
            return await record_event(session, event)
