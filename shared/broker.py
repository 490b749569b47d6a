"""The RabbitMQ topology, declared here once, and publishing. A service declares only what is missing,
so on a provisioned broker its user needs no configure permission."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import TypeVar
from uuid import UUID

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelNotFoundEntity, DeliveryError
from aiormq.abc import DeliveredMessage, FieldTable
from aiormq.exceptions import ChannelAccessRefused
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from shared.connection_security import amqp_ssl_context, amqp_url
from shared.contracts import COMMAND_ROUTING_KEYS, Command, CommandType, OrderEvent
from shared.reachability import CONNECT_PATIENCE_SECONDS, patiently
from shared.settings import Settings
from shared.tracing import trace_headers

COMMANDS_EXCHANGE = "orders.commands"
EVENTS_EXCHANGE = "orders.events"
DEAD_LETTER_EXCHANGE = "orders.dead-letter"
DEAD_LETTER_QUEUE = "orders.dead-letter"
REASON_HEADER = "x-orderflow-reason"
ERROR_HEADER = "x-orderflow-error"
CONSUMER_HEADER = "x-orderflow-consumer"
# the broker's own x-delivery-count starts again in the dead-letter queue: keep what it said
DELIVERIES_HEADER = "x-orderflow-deliveries"
EXCHANGE_HEADER = "x-orderflow-exchange"
EXCHANGES = (COMMANDS_EXCHANGE, EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE)
MAX_ERROR_HEADER_LENGTH = 2000

PLACE_ROUTING_KEY = COMMAND_ROUTING_KEYS[CommandType.PLACE]
STEERING_ROUTING_KEYS = tuple(key for key in COMMAND_ROUTING_KEYS.values() if key != PLACE_ROUTING_KEY)
AUDIT_ROUTING_KEYS = ("order.#",)

T = TypeVar("T")


class CommandNotRouted(Exception):
    """The broker returned a command: no queue is bound for its routing key, so nobody would get it."""


class CommandRefused(Exception):
    """The broker negatively confirmed a command: the placement backlog is full."""


class TopologyMissing(Exception):
    """An exchange or queue the service needs is missing and its broker user may not declare it."""


class DeadLetterHeaders(BaseModel):
    """The original message's headers, plus why a consumer gave up on it."""

    model_config = ConfigDict(extra="allow", validate_by_name=True)

    reason: str = Field(
        alias=REASON_HEADER,
        description="Why: the body was not valid JSON, failed validation, or kept failing (was "
        "delivered too many times).",
    )
    error: str = Field(alias=ERROR_HEADER, description="The error text (truncated).")
    consumer: str = Field(
        alias=CONSUMER_HEADER,
        description="The consumer that gave up, such as the bridge or the audit consumer.",
    )
    deliveries: int = Field(
        alias=DELIVERIES_HEADER,
        ge=1,
        description="How many times the consumer had received the message when it gave up.",
    )
    exchange: str | SkipJsonSchema[None] = Field(
        default=None,
        alias=EXCHANGE_HEADER,
        description="The exchange the message was first published to (its own is now the dead-letter "
        "exchange), where a replay sends it back. Absent on messages dead-lettered before orderflow set it.",
    )


@dataclass(frozen=True)
class Topology:
    commands: AbstractExchange
    events: AbstractExchange
    dead_letter: AbstractExchange
    publisher: str | None = None
    """The connection's broker user, sent as every message's `user_id`, which the broker checks."""


@dataclass(frozen=True)
class ConsumerQueue:
    """A durable quorum queue (it counts redeliveries in `x-delivery-count`) that dead-letters."""

    name: str
    routing_keys: tuple[str, ...]
    limits: FieldTable = field(default_factory=dict)


async def connect(
    settings: Settings, name: str, patience: float = CONNECT_PATIENCE_SECONDS
) -> AbstractRobustConnection:
    """A robust connection; it reconnects only once connected, so the first try waits `patience` seconds."""
    connecting = partial(
        aio_pika.connect_robust,
        amqp_url(settings),
        ssl_context=amqp_ssl_context(settings),
        client_properties={"connection_name": name},
    )
    return await patiently(
        connecting, CONNECTION_EXCEPTIONS, patience, "waiting for the broker", connection=name
    )


async def declare_topology(channel: AbstractChannel, publisher: str | None = None) -> Topology:
    """The exchanges and the dead-letter queue: looked up when in place, else declared."""
    if await in_place(channel, exchanges=EXCHANGES, queues=(DEAD_LETTER_QUEUE,)):
        commands, events, dead_letter = [await channel.get_exchange(name, ensure=False) for name in EXCHANGES]
        return Topology(commands, events, dead_letter, publisher)
    return await configuring(create_topology(channel, publisher))


async def create_topology(channel: AbstractChannel, publisher: str | None = None) -> Topology:
    commands, events, dead_letter = [
        await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True) for name in EXCHANGES
    ]
    # classic: `orderflow dlq` reads by taking and giving back, which a classic queue neither reorders
    # nor counts as a delivery (a quorum queue's delivery limit would drop a dead letter read often)
    dead_letter_queue = await channel.declare_queue(
        DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "classic"}
    )
    await dead_letter_queue.bind(dead_letter, routing_key="#")
    return Topology(commands, events, dead_letter, publisher)


async def in_place(
    channel: AbstractChannel, *, exchanges: tuple[str, ...] = (), queues: tuple[str, ...] = ()
) -> bool:
    """Whether these exist, asked by passive declares (no permission needed) on a channel a miss closes."""
    underlay = await channel.get_underlay_channel()
    probe = await underlay.connection.channel()
    try:
        for exchange in exchanges:
            await probe.exchange_declare(exchange, passive=True)
        for queue in queues:
            await probe.queue_declare(queue, passive=True)
    except ChannelNotFoundEntity:
        return False
    finally:
        if not probe.is_closed:
            await probe.close()
    return True


async def configuring(declaring: Awaitable[T]) -> T:
    """`declaring`, for what is missing; `TopologyMissing` when this user may not declare it."""
    try:
        return await declaring
    except ChannelAccessRefused as refused:
        raise TopologyMissing(
            f"orderflow's exchanges and queues are not all on the broker, and this user may not declare "
            f"them ({refused}): provision the broker first (`orderflow broker provision` as an "
            "administrator; `make run` does it)"
        ) from None


async def declare_consumer_queue(
    channel: AbstractChannel, exchange: AbstractExchange, queue: ConsumerQueue
) -> AbstractQueue:
    """Looked up when in place (it was declared with its bindings), else declared."""
    if await in_place(channel, queues=(queue.name,)):
        return await channel.get_queue(queue.name)
    return await configuring(create_consumer_queue(channel, exchange, queue))


async def create_consumer_queue(
    channel: AbstractChannel, exchange: AbstractExchange, queue: ConsumerQueue
) -> AbstractQueue:
    arguments: FieldTable = {"x-queue-type": "quorum", "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
    declared = await channel.declare_queue(queue.name, durable=True, arguments={**arguments, **queue.limits})
    for routing_key in queue.routing_keys:
        await declared.bind(exchange, routing_key=routing_key)
    return declared


def placement_queue(settings: Settings) -> ConsumerQueue:
    """Full at `placement_backlog_limit`, fixed when first declared (a `max-length` policy overrides it)."""
    limits: FieldTable = {"x-max-length": settings.placement_backlog_limit, "x-overflow": "reject-publish"}
    return ConsumerQueue(settings.placement_queue, (PLACE_ROUTING_KEY,), limits)


def command_queue(settings: Settings) -> ConsumerQueue:
    """The bridge's approve, cancel and update-address commands, never behind waiting placements."""
    return ConsumerQueue(settings.command_queue, STEERING_ROUTING_KEYS)


def audit_queue(settings: Settings) -> ConsumerQueue:
    return ConsumerQueue(settings.audit_queue, AUDIT_ROUTING_KEYS)


async def declare_placement_queue(
    channel: AbstractChannel, topology: Topology, settings: Settings
) -> AbstractQueue:
    return await declare_consumer_queue(channel, topology.commands, placement_queue(settings))


async def declare_command_queue(
    channel: AbstractChannel, topology: Topology, settings: Settings
) -> AbstractQueue:
    return await declare_consumer_queue(channel, topology.commands, command_queue(settings))


async def declare_command_queues(
    channel: AbstractChannel, topology: Topology, settings: Settings
) -> tuple[AbstractQueue, AbstractQueue]:
    """For the gateway too: a command accepted before the bridge first started then waits for it."""
    return (
        await declare_placement_queue(channel, topology, settings),
        await declare_command_queue(channel, topology, settings),
    )


async def declare_audit_queue(
    channel: AbstractChannel, topology: Topology, settings: Settings
) -> AbstractQueue:
    """For the workers too: an event published before the audit consumer first started then waits for it."""
    return await declare_consumer_queue(channel, topology.events, audit_queue(settings))


async def provision(channel: AbstractChannel, settings: Settings) -> None:
    """Declare everything, bindings updated, as an administrator: the services' users need not configure."""
    topology = await create_topology(channel)
    await create_consumer_queue(channel, topology.commands, placement_queue(settings))
    await create_consumer_queue(channel, topology.commands, command_queue(settings))
    await create_consumer_queue(channel, topology.events, audit_queue(settings))


async def open_channel(
    connection: AbstractRobustConnection, prefetch: int = 0
) -> tuple[AbstractChannel, Topology]:
    """A channel with publisher confirms on (every publish waits for the broker's ack)."""
    channel = await connection.channel(publisher_confirms=True)
    if prefetch:
        await channel.set_qos(prefetch_count=prefetch)
    return channel, await declare_topology(channel, connection_user(connection))


def connection_user(connection: AbstractRobustConnection) -> str | None:
    """The user the connection logged in as (aio-pika's default, `guest`, when the URL names none)."""
    url = connection.url if isinstance(connection, aio_pika.Connection) else None
    return (url.user if url else None) or "guest"


async def publish_command(topology: Topology, command: Command) -> None:
    """Publish and await the confirm; `CommandRefused`: backlog full, `CommandNotRouted`: no queue bound."""
    routing_key = COMMAND_ROUTING_KEYS[command.type]
    message = _published(topology, command, command.command_id)
    try:
        confirmation = await topology.commands.publish(message, routing_key=routing_key, mandatory=True)
    except DeliveryError as refused:
        raise CommandRefused(f"the broker refused {routing_key!r}: its queue is full") from refused
    # a channel without on_return_raises hands an unroutable mandatory message back instead of raising
    if isinstance(confirmation, DeliveredMessage):
        raise CommandNotRouted(f"no queue is bound to {COMMANDS_EXCHANGE} for {routing_key!r}")


async def publish_event(topology: Topology, event: OrderEvent) -> None:
    message = _published(topology, event, event.event_id, event.occurred_at)
    await topology.events.publish(message, routing_key=event.type.routing_key)


def _published(
    topology: Topology, model: Command | OrderEvent, message_id: UUID, timestamp: datetime | None = None
) -> aio_pika.Message:
    """Persistent JSON from `topology`'s publisher, carrying the current trace."""
    return aio_pika.Message(
        body=model.model_dump_json().encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(message_id),
        correlation_id=model.correlation_id,
        type=model.type.value,
        user_id=topology.publisher,
        timestamp=timestamp,
        headers=trace_headers(),
    )


async def dead_letter(
    topology: Topology, message: AbstractIncomingMessage, *, consumer: str, reason: str, error: str
) -> None:
    """To the dead-letter queue, saying why, then acked: a crash in between duplicates it, never loses it."""
    why = DeadLetterHeaders(
        reason=reason,
        error=error[:MAX_ERROR_HEADER_LENGTH],
        consumer=consumer,
        deliveries=delivery_count(message) + 1,
        exchange=message.exchange,
    )
    await topology.dead_letter.publish(
        aio_pika.Message(
            body=message.body,
            headers={**(message.headers or {}), **why.model_dump(by_alias=True)},
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            type=message.type,
        ),
        routing_key=message.routing_key or "unknown",
    )
    await message.ack()


def delivery_count(message: AbstractIncomingMessage) -> int:
    """How many times this message was delivered before (quorum queues count it)."""
    count = (message.headers or {}).get("x-delivery-count")
    return count if isinstance(count, int) else 0
