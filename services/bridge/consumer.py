"""The command bridge: commands from `orders.commands` become workflow starts and signals.

Each command, in its order's arrival order:
1. a command id already in `processed_commands` is a duplicate: acked, no effect;
2. otherwise it is applied to its order's workflow (`lifecycles`); a command that cannot reach a
   running workflow is answered with an `order.command_rejected` event (seq 0);
3. the outcome is recorded in `processed_commands`, then the message is acked.
A crash between 2 and 3 redelivers the command: the start is recognised by the workflow's memo, a
signal is de-duplicated by the workflow, and a rejection is re-published with the same event id.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TypeVar
from uuid import UUID, uuid5

import structlog
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from services.bridge.lifecycles import OrderLifecycles, Outcome, OutcomeKind
from shared import db
from shared.broker import Topology, declare_command_queue, publish_event
from shared.consuming import QueueConsumer, Stopping, consumer_channel, retry_transient
from shared.contracts import Command, EventType, OrderEvent, command_adapter
from shared.db import ProcessedCommand
from shared.settings import Settings
from shared.temporal import connect_temporal

T = TypeVar("T")

CONSUMER_NAME = "bridge"

LOG_EVENT_OF_OUTCOME: dict[OutcomeKind, str] = {
    OutcomeKind.ACCEPTED: "command accepted",
    OutcomeKind.REJECTED: "command rejected",
    OutcomeKind.DUPLICATE: "duplicate command",
}

log = structlog.get_logger(__name__)


async def run_bridge(settings: Settings, stop: asyncio.Event) -> None:
    """Consume commands until `stop` is set, let in-flight ones finish, then disconnect."""
    temporal = await connect_temporal(settings)
    engine = db.create_engine(settings)
    broker_channel = consumer_channel(settings, CONSUMER_NAME, settings.command_prefetch)
    try:
        async with broker_channel as (channel, topology):
            queue = await declare_command_queue(channel, topology, settings)
            bridge = Bridge(
                OrderLifecycles(temporal, settings),
                ProcessedCommands(db.session_factory(engine)),
                topology,
                stop,
            )
            consumer = QueueConsumer(CONSUMER_NAME, topology, settings.max_command_deliveries, stop)
            await consumer.run(queue, command_adapter.validate_json, bridge.handle)
    finally:
        await engine.dispose()


class Bridge:
    """Applies each command once, in its order's arrival order, then acks it."""

    def __init__(
        self,
        lifecycles: OrderLifecycles,
        processed: ProcessedCommands,
        topology: Topology,
        stop: asyncio.Event,
    ) -> None:
        self._lifecycles = lifecycles
        self._processed = processed
        self._topology = topology
        self._stop = stop
        self._order_locks = OrderLocks()

    async def handle(self, message: AbstractIncomingMessage, command: Command) -> None:
        structlog.contextvars.bind_contextvars(
            order_id=command.order_id,
            command_id=str(command.command_id),
            command_type=command.type.value,
        )
        # nothing above yields to the event loop, so locks are asked for in delivery order
        async with self._order_locks.hold(command.order_id):
            if self._stop.is_set():
                raise Stopping  # later commands of this order must not overtake this one
            outcome = await self._apply_once(command)
        await message.ack()
        log.info(
            LOG_EVENT_OF_OUTCOME[outcome.kind], outcome=outcome.kind.value, reason=outcome.detail
        )

    async def _apply_once(self, command: Command) -> Outcome:
        if await self._retry(lambda: self._processed.contains(command.command_id)):
            return Outcome(OutcomeKind.DUPLICATE, "command already processed")
        outcome = await self._retry(lambda: self._lifecycles.apply(command))
        if outcome.kind is OutcomeKind.REJECTED:
            await publish_event(self._topology, rejection_event(command, outcome.detail or ""))
        await self._retry(lambda: self._processed.record(command, outcome))
        return outcome

    async def _retry(self, operation: Callable[[], Awaitable[T]]) -> T:
        return await retry_transient(operation, self._stop)


def rejection_event(command: Command, reason: str) -> OrderEvent:
    """`order.command_rejected` for a command that found no running lifecycle."""
    return OrderEvent(
        # derived from the command, so a rejection re-published after a crash is seen once
        event_id=uuid5(command.command_id, EventType.COMMAND_REJECTED.value),
        type=EventType.COMMAND_REJECTED,
        order_id=command.order_id,
        seq=0,
        occurred_at=datetime.now(UTC),
        correlation_id=command.correlation_id,
        command_id=command.command_id,
        data={"command_type": command.type.value, "reason": reason},
    )


class ProcessedCommands:
    """The bridge's tracking records: a command id recorded here has had its one effect."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def contains(self, command_id: UUID) -> bool:
        async with self._sessions() as session:
            found = await session.scalar(
                select(col(ProcessedCommand.command_id)).where(
                    col(ProcessedCommand.command_id) == command_id
                )
            )
        return found is not None

    async def record(self, command: Command, outcome: Outcome) -> None:
        async with db.transaction(self._sessions) as session:
            await session.execute(
                insert(ProcessedCommand)
                .values(
                    command_id=command.command_id,
                    order_id=command.order_id,
                    type=command.type.value,
                    outcome=outcome.kind.value,
                    detail=outcome.detail,
                )
                .on_conflict_do_nothing()
            )


class OrderLocks:
    """One lock per order, granted in the order asked for; dropped once nobody holds or awaits it"""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: Counter[str] = Counter()

    @asynccontextmanager
    async def hold(self, order_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(order_id, asyncio.Lock())
        self._users[order_id] += 1
        try:
            async with lock:
                yield
        finally:
            self._users[order_id] -= 1
            if not self._users[order_id]:
                del self._users[order_id], self._locks[order_id]

    def __len__(self) -> int:
        return len(self._locks)
