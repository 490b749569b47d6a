"""The command bridge: commands from `orders.commands` become workflow starts and signals, each
applied once in its order's arrival order, recorded in `processed_commands`, then acked. Placements
are held, unacked, until the admission gate gives them a slot; other commands never wait behind them."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar
from uuid import uuid5

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from services.bridge.admission_gate import (
    ALREADY_PROCESSED,
    CANCELLED_BEFORE_ADMISSION,
    CANCELLED_SEQ,
    WAITING_FOR_PLACEMENT,
    AdmissionLedger,
    Registration,
    Signal,
    Slot,
    SlotGate,
    cancel_reason,
)
from services.bridge.issuers import PublisherIdentities
from services.bridge.lifecycles import (
    QUEUED_SEQ,
    UNKNOWN_ORDER,
    OrderLifecycles,
    Outcome,
    OutcomeKind,
    SteeringCommand,
)
from shared import broker, db
from shared.admission_table import AdmissionStatus
from shared.broker import Topology, declare_command_queue, declare_placement_queue, publish_event
from shared.consuming import QueueConsumer, Stopping, periodically, retry_transient
from shared.contracts import (
    CancelledData,
    Command,
    CommandRejectedData,
    EventPayload,
    OrderEvent,
    PlaceOrder,
    QueuedData,
    command_adapter,
    event_of,
)
from shared.settings import Settings
from shared.temporal import connect_temporal, tracing_interceptors

T = TypeVar("T")

CONSUMER_NAME = "bridge"
SWEEP_INTERVAL_SECONDS = 1.0

NO_SUCH_ORDER = Outcome(OutcomeKind.REJECTED, UNKNOWN_ORDER)

LOG_EVENT_OF_OUTCOME: dict[OutcomeKind, str] = {
    OutcomeKind.ACCEPTED: "command accepted",
    OutcomeKind.REJECTED: "command rejected",
    OutcomeKind.DUPLICATE: "duplicate command",
}

log = structlog.get_logger(__name__)


async def run_bridge(settings: Settings, stop: asyncio.Event) -> None:
    """Consume commands until `stop` is set, let in-flight ones finish, then disconnect."""
    temporal = await connect_temporal(settings, interceptors=tracing_interceptors())
    engine = db.create_engine(settings)
    connection = await broker.connect(settings, CONSUMER_NAME)
    try:
        # two channels: the prefetch of one bounds held placements, of the other commands in hand
        command_channel, topology = await broker.open_channel(connection, settings.command_prefetch)
        placement_channel, _ = await broker.open_channel(connection, settings.placement_prefetch)
        placements = await declare_placement_queue(placement_channel, topology, settings)
        commands = await declare_command_queue(command_channel, topology, settings)
        bridge = Bridge(
            OrderLifecycles(temporal, settings),
            AdmissionLedger(engine, settings.max_running_lifecycles),
            SlotGate(settings),
            PublisherIdentities(settings.amqp_publisher_roles, settings.amqp_delegates),
            topology,
            stop,
        )

        consumer = partial(
            QueueConsumer,
            CONSUMER_NAME,
            topology,
            settings.max_command_deliveries,
            stop,
            settings.drain_seconds,
        )
        sweep = partial(bridge.sweep, placements)
        await asyncio.gather(
            consumer().run(placements, PlaceOrder.model_validate_json, bridge.handle),
            consumer().run(commands, command_adapter.validate_json, bridge.handle),
            periodically(stop, SWEEP_INTERVAL_SECONDS, sweep, "housekeeping failed; trying again"),
            bridge.gate.listen(stop),
        )
    finally:
        await connection.close()
        await engine.dispose()


class Bridge:
    """Applies each command once, in its order's arrival order, then acks it."""

    def __init__(
        self,
        lifecycles: OrderLifecycles,
        ledger: AdmissionLedger,
        gate: SlotGate,
        identities: PublisherIdentities,
        topology: Topology,
        stop: asyncio.Event,
    ) -> None:
        self._lifecycles = lifecycles
        self._ledger = ledger
        self.gate = gate
        self._identities = identities
        self._topology = topology
        self._stop = stop
        self._order_locks = OrderLocks()
        self._drained_at: datetime | None = None  # when the sweep last saw the placement queue empty

    async def handle(self, message: AbstractIncomingMessage, command: Command) -> None:
        """A command from either queue (a placement published to the command queue is one too)."""
        structlog.contextvars.bind_contextvars(
            order_id=command.order_id, command_id=str(command.command_id), command_type=command.type.value
        )
        issuer = self._identities.authorize(message.user_id, command)
        if isinstance(issuer, Outcome):  # forbidden, unless its id was processed before
            async with self._ordered(command.order_id):
                processed = await self._retry(lambda: self._ledger.is_processed(command))
                outcome = ALREADY_PROCESSED if processed else await self._conclude(command, issuer)
        elif isinstance(command, PlaceOrder):
            outcome = await self._place(command.model_copy(update={"issued_by": issuer}))
        else:
            steering: SteeringCommand = command.model_copy(update={"issued_by": issuer})
            async with self._ordered(command.order_id):
                outcome = await self._conclude(steering, await self._steer(steering))
        await message.ack()
        log.info(LOG_EVENT_OF_OUTCOME[outcome.kind], outcome=outcome.kind.value, reason=outcome.detail)

    async def _conclude(self, command: Command, outcome: Outcome) -> Outcome:
        """Publish a rejection, then record the outcome (a processed command has its record)."""
        if outcome is not ALREADY_PROCESSED:
            if outcome.kind is OutcomeKind.REJECTED:
                await self._publish(rejection_event(command, outcome))
            await self._retry(lambda: self._ledger.record(command, outcome))
        return outcome

    async def _place(self, command: PlaceOrder) -> Outcome:
        """Register the placement, wait for a slot (without the order's lock), start the lifecycle."""
        async with self._ordered(command.order_id):
            registration = await self._retry(
                lambda: self._ledger.register(
                    command,
                    lambda registration: self._publish(*registration_events(command, registration)),
                    # only while none of this bridge's placements waits, so none is overtaken
                    take_free_slot=self.gate.idle(),
                )
            )
        if isinstance(registration, Outcome):
            return await self._conclude(command, registration)
        if registration.status is AdmissionStatus.CANCELLED:
            return await self._conclude(command, CANCELLED_BEFORE_ADMISSION)
        return await self._admit(command, registration.slot)

    async def _admit(self, command: PlaceOrder, slot: Slot | None) -> Outcome:
        """Start the registered order's lifecycle in its slot, once it has one."""
        taken = slot or await self.gate.wait_for(
            lambda: self._retry(lambda: self._ledger.take_slot(command.order_id)), self._stop
        )
        if taken is AdmissionStatus.WAITING:
            raise Stopping  # still waiting: the broker keeps the placement for the next bridge
        if isinstance(taken, AdmissionStatus):
            return await self._conclude(command, CANCELLED_BEFORE_ADMISSION)
        log.info(
            "lifecycle admitted",
            admission_wait_seconds=round((datetime.now(UTC) - taken.queued_at).total_seconds(), 3),
        )
        outcome = await self._retry(
            lambda: self._lifecycles.start(command, taken.queued_at, taken.early_commands)
        )
        if outcome.kind is OutcomeKind.REJECTED:
            await self._publish(rejection_event(command, outcome))
        await self._retry(lambda: self._ledger.settle_start(command, outcome))
        return outcome

    async def _steer(self, command: SteeringCommand) -> Outcome:
        publish_cancelled = partial(self._publish, cancelled_before_admission(command))
        while True:
            steered = await self._retry(lambda: self._ledger.steer(command, publish_cancelled))
            if isinstance(steered, Outcome):
                return steered
            outcome = await self._retry(lambda: self._lifecycles.signal(command))
            if steered is Signal.STARTED or outcome.detail != UNKNOWN_ORDER:
                return outcome
            if await self._retry(lambda: self._ledger.park(command)):
                return WAITING_FOR_PLACEMENT
            # the placement registered meanwhile: steer again

    async def sweep(self, placements: AbstractQueue) -> None:
        """Reject as `unknown order` the commands parked before the placement queue was last seen
        empty: every placement published by then is registered, none is still coming for them."""
        if (await placements.declare()).message_count:
            self._drained_at = None
            return
        if self._drained_at is not None:
            for order_id in await self._ledger.unplaced_before(self._drained_at):
                try:
                    await self._ledger.give_up_unplaced(order_id, self._reject_parked)
                except Exception as error:  # noqa: BLE001 (one order's trouble must not keep the others parked)
                    log.warning("could not reject parked commands", order_id=order_id, error=repr(error))
        self._drained_at = await self._ledger.now()

    async def _reject_parked(self, commands: list[Command]) -> None:
        for command in commands:
            await self._publish(rejection_event(command, NO_SUCH_ORDER))
            await self._ledger.record(command, NO_SUCH_ORDER, replace=True)
            log.info("parked command rejected", order_id=command.order_id, command_id=str(command.command_id))

    @asynccontextmanager
    async def _ordered(self, order_id: str) -> AsyncIterator[None]:
        """This bridge's commands of one order, one at a time in delivery order."""
        # nothing before this yields to the event loop, so locks are asked for in delivery order
        async with self._order_locks.hold(order_id):
            if self._stop.is_set():
                raise Stopping  # later commands of this order must not overtake this one
            yield

    async def _publish(self, *events: OrderEvent) -> None:
        for event in events:
            await self._retry(partial(publish_event, self._topology, event))

    async def _retry(self, operation: Callable[[], Awaitable[T]]) -> T:
        return await retry_transient(operation, self._stop)


def bridge_event(command: Command, data: EventPayload, seq: int) -> OrderEvent:
    """An event on behalf of `command`, its id derived from the command's: re-published, it is the same."""
    return event_of(
        data,
        event_id=uuid5(command.command_id, data.event_type.value),
        order_id=command.order_id,
        seq=seq,
        occurred_at=datetime.now(UTC),
        correlation_id=command.correlation_id,
        command_id=command.command_id,
    )


def registration_events(command: PlaceOrder, registration: Registration) -> list[OrderEvent]:
    """`queued`, the rejections of refused parked commands, and `cancelled` if a parked cancel ends it."""
    placed_by = command.issued_by.subject if command.issued_by else None
    queued = QueuedData(queued_at=registration.queued_at, placed_by=placed_by)
    rejections = [rejection_event(*refused) for refused in registration.refused]
    ended = [cancelled_before_admission(registration.cancel)] if registration.cancel else []
    return [bridge_event(command, queued, QUEUED_SEQ), *rejections, *ended]


def rejection_event(command: Command, rejection: Outcome) -> OrderEvent:
    """`order.command_rejected`; its `detail` explains a `forbidden`."""
    rejected = CommandRejectedData(
        command_type=command.type, reason=rejection.detail or "", detail=rejection.explanation or None
    )
    return bridge_event(command, rejected, seq=0)


def cancelled_before_admission(command: SteeringCommand) -> OrderEvent:
    cancelled = CancelledData(reason=cancel_reason(command), refunded=False, admitted=False)
    return bridge_event(command, cancelled, seq=CANCELLED_SEQ)


class OrderLocks:
    """One lock per order, granted in the order asked for; dropped once nobody holds or awaits it."""

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
