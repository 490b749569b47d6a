"""The RabbitMQ topology, declared here once, and publishing.

On connect each service looks up what it uses and declares only what is missing: a provisioned
broker (`orderflow broker provision`, `make run`) has it all in place, so a service's own broker user
needs no configure permission (a passive declare needs none); on a bare vhost a user allowed to
configure (the development account) declares it. A service whose user may not, on a broker not
provisioned, stops with `TopologyMissing`.

Exchanges (public contract): `orders.commands` and `orders.events`, both durable topic exchanges.
Queues (owned by orderflow):
- the placement queue (`order.place`): PlaceOrder commands wait here, durably, until the bridge
  admits their lifecycle. It is bounded: once `placement_backlog_limit` placements are waiting the
  broker refuses new ones with a negative publisher confirm (`x-overflow: reject-publish`), so a
  placement is either refused at the door or accepted for good;
- the command queue (approve, cancel, update address): never behind waiting placements;
- the audit consumer's event queue, and one dead-letter queue that keeps every message a consumer
  gave up on, with the reason in its headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    HeadersType,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelNotFoundEntity, DeliveryError
from aiormq.abc import DeliveredMessage, FieldTable
from aiormq.exceptions import ChannelAccessRefused

from shared.connection_security import amqp_ssl_context, amqp_url
from shared.contracts import COMMAND_ROUTING_KEYS, Command, CommandType, OrderEvent
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
CONNECT_PATIENCE_SECONDS = 60.0
CONNECT_RETRY_SECONDS = 1.0
# a message in the dead-letter queue shows that exchange as its own: keep where it came from, so a
# replay can send it back there
EXCHANGE_HEADER = "x-orderflow-exchange"
EXCHANGES = (COMMANDS_EXCHANGE, EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE)

T = TypeVar("T")


class CommandNotRouted(Exception):
    """The broker returned a command: no queue is bound for its routing key, so nobody would get it."""


class CommandRefused(Exception):
    """The broker negatively confirmed a command: the placement backlog is full."""


class TopologyMissing(Exception):
    """An exchange or queue the service needs is missing and its broker user may not declare it."""


@dataclass(frozen=True)
class Topology:
    commands: AbstractExchange
    events: AbstractExchange
    dead_letter: AbstractExchange
    publisher: str | None = None
    """The connection's broker user, sent as every message's `user_id`: the broker checks it, so a
    consumer knows for certain who published (the bridge authorizes commands by it)."""


async def connect(
    settings: Settings, name: str, patience: float = CONNECT_PATIENCE_SECONDS
) -> AbstractRobustConnection:
    """A robust connection: it reconnects and re-declares what its channels declared. It does so
    only once it has connected, so the first connection waits up to `patience` seconds for a broker
    that is down or restarting: a service started meanwhile waits for it instead of exiting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            return await aio_pika.connect_robust(
                amqp_url(settings),
                ssl_context=amqp_ssl_context(settings),
                client_properties={"connection_name": name},
            )
        except CONNECTION_EXCEPTIONS as error:
            if loop.time() >= deadline:
                raise
            structlog.get_logger().info("waiting for the broker", connection=name, error=str(error))
            await asyncio.sleep(CONNECT_RETRY_SECONDS)


async def declare_topology(channel: AbstractChannel, publisher: str | None = None) -> Topology:
    """The exchanges and the dead-letter queue: looked up when in place, else declared."""
    if await in_place(channel, exchanges=EXCHANGES, queues=(DEAD_LETTER_QUEUE,)):
        return Topology(
            commands=await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False),
            events=await channel.get_exchange(EVENTS_EXCHANGE, ensure=False),
            dead_letter=await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False),
            publisher=publisher,
        )
    return await configuring(create_topology(channel, publisher))


async def create_topology(channel: AbstractChannel, publisher: str | None = None) -> Topology:
    commands = await channel.declare_exchange(COMMANDS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    events = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dead_letter = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead_letter_queue = await channel.declare_queue(
        DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_letter_queue.bind(dead_letter, routing_key="#")
    return Topology(commands=commands, events=events, dead_letter=dead_letter, publisher=publisher)


async def in_place(
    channel: AbstractChannel, *, exchanges: tuple[str, ...] = (), queues: tuple[str, ...] = ()
) -> bool:
    """Whether these exchanges and queues exist, asked with passive declares (which need no
    permission) on a channel of their own: the broker closes the channel that asks for a missing one."""
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
    channel: AbstractChannel,
    name: str,
    exchange: AbstractExchange,
    routing_keys: tuple[str, ...],
    arguments: FieldTable | None = None,
) -> AbstractQueue:
    """A durable quorum queue (it counts redeliveries in `x-delivery-count`) that dead-letters;
    looked up when in place (it was declared with its bindings), else declared."""
    if await in_place(channel, queues=(name,)):
        return await channel.get_queue(name)
    return await configuring(create_consumer_queue(channel, name, exchange, routing_keys, arguments))


async def create_consumer_queue(
    channel: AbstractChannel,
    name: str,
    exchange: AbstractExchange,
    routing_keys: tuple[str, ...],
    arguments: FieldTable | None = None,
) -> AbstractQueue:
    queue = await channel.declare_queue(
        name,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            **(arguments or {}),
        },
    )
    for routing_key in routing_keys:
        await queue.bind(exchange, routing_key=routing_key)
    return queue


PLACE_ROUTING_KEY = COMMAND_ROUTING_KEYS[CommandType.PLACE]
STEERING_ROUTING_KEYS = tuple(key for key in COMMAND_ROUTING_KEYS.values() if key != PLACE_ROUTING_KEY)
# before placements had a queue of their own, the command queue took every command with this key
LEGACY_COMMAND_BINDING = "order.*"
AUDIT_ROUTING_KEYS = ("order.#",)


async def declare_command_queue(
    channel: AbstractChannel, topology: Topology, settings: Settings
) -> AbstractQueue:
    """The bridge's queue of approve, cancel and update-address commands. The gateway declares it
    (and the placement queue) too, so a command accepted before the bridge first started waits
    for it instead of being unroutable."""
    return await declare_consumer_queue(
        channel, settings.command_queue, topology.commands, STEERING_ROUTING_KEYS
    )


async def declare_placement_queue(
    channel: AbstractChannel, topology: Topology, settings: Settings
) -> AbstractQueue:
    """Where placements wait for admission; full at `placement_backlog_limit` ready messages.

    A queue's arguments are fixed when it is first declared: to change the limit on a broker that
    has the queue, delete the (drained) queue or set a `max-length` policy on it."""
    return await declare_consumer_queue(
        channel, settings.placement_queue, topology.commands, (PLACE_ROUTING_KEY,), placement_limit(settings)
    )


def placement_limit(settings: Settings) -> FieldTable:
    return {"x-max-length": settings.placement_backlog_limit, "x-overflow": "reject-publish"}


async def declare_command_queues(
    channel: AbstractChannel, topology: Topology, settings: Settings
) -> tuple[AbstractQueue, AbstractQueue]:
    """The placement queue and the command queue, for publishers that must not go unrouted."""
    return (
        await declare_placement_queue(channel, topology, settings),
        await declare_command_queue(channel, topology, settings),
    )


async def declare_audit_queue(
    channel: AbstractChannel, topology: Topology, settings: Settings
) -> AbstractQueue:
    """The audit consumer's queue of events. The workers declare it too, so an event published
    before the audit consumer first started still reaches the audit table."""
    return await declare_consumer_queue(channel, settings.audit_queue, topology.events, AUDIT_ROUTING_KEYS)


async def provision(channel: AbstractChannel, settings: Settings) -> None:
    """Every exchange and queue the services use, declared by an administrator (`orderflow broker
    provision`, `make run`), so that the services' own users need no configure permission."""
    topology = await create_topology(channel)
    await create_consumer_queue(
        channel, settings.placement_queue, topology.commands, (PLACE_ROUTING_KEY,), placement_limit(settings)
    )
    commands = await create_consumer_queue(
        channel, settings.command_queue, topology.commands, STEERING_ROUTING_KEYS
    )
    await commands.unbind(topology.commands, LEGACY_COMMAND_BINDING)
    await create_consumer_queue(channel, settings.audit_queue, topology.events, AUDIT_ROUTING_KEYS)


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
    """Publish one command; returns once the broker confirmed it. Raises `CommandRefused` when
    the broker refused it (placement backlog full), `CommandNotRouted` when no queue took it."""
    routing_key = COMMAND_ROUTING_KEYS[command.type]
    # without an issuer the body names none (revisions before issuers knew no such field)
    unnamed = {"issued_by"} if command.issued_by is None else None
    try:
        confirmation = await topology.commands.publish(
            aio_pika.Message(
                body=command.model_dump_json(exclude=unnamed).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(command.command_id),
                correlation_id=command.correlation_id,
                type=command.type.value,
                user_id=topology.publisher,
                headers=trace_headers(),
            ),
            routing_key=routing_key,
            mandatory=True,
        )
    except DeliveryError as refused:
        raise CommandRefused(f"the broker refused {routing_key!r}: its queue is full") from refused
    # a channel without on_return_raises hands an unroutable mandatory message back instead of raising
    if isinstance(confirmation, DeliveredMessage):
        raise CommandNotRouted(f"no queue is bound to {COMMANDS_EXCHANGE} for {routing_key!r}")


async def publish_event(topology: Topology, event: OrderEvent) -> None:
    await topology.events.publish(
        aio_pika.Message(
            body=event.model_dump_json().encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(event.event_id),
            correlation_id=event.correlation_id,
            type=event.type.value,
            user_id=topology.publisher,
            timestamp=event.occurred_at,
            headers=trace_headers(),
        ),
        routing_key=event.type.routing_key,
    )


async def dead_letter(
    topology: Topology,
    message: AbstractIncomingMessage,
    *,
    consumer: str,
    reason: str,
    error: str,
) -> None:
    """Move a message the consumer gave up on to the dead-letter queue, saying why, then ack it.

    Publishing (confirmed) comes before the ack, so a crash in between duplicates the message in
    the dead-letter queue rather than losing it.
    """
    headers: HeadersType = dict(message.headers or {})
    headers.update(
        {
            REASON_HEADER: reason,
            ERROR_HEADER: error[:2000],
            CONSUMER_HEADER: consumer,
            DELIVERIES_HEADER: delivery_count(message) + 1,
            EXCHANGE_HEADER: message.exchange,
        }
    )
    await topology.dead_letter.publish(
        aio_pika.Message(
            body=message.body,
            headers=headers,
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
    headers: Mapping[str, object] = message.headers or {}
    count = headers.get("x-delivery-count", 0)
    return int(count) if isinstance(count, int) else 0
