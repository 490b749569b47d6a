"""`orderflow dlq`: look into the dead-letter queue and replay what a consumer gave up on.

AMQP reads a queue only by taking from it. Every waiting dead letter is taken with basic.get and
not acknowledged, then each one not replayed is given back with basic.nack (requeue), in the order
it was taken. All of them are taken because a quorum queue (RabbitMQ 3.10, see
tests/test_cli_dlq.py) puts a requeued message behind the messages still waiting: giving back only
the first few would move them to the end. Closing the channel instead gives them back in no
particular order. Only a dead letter that arrives between the last get and the nacks lands ahead of
them. A nack, not a reject: RabbitMQ 4.3 and later count rejects towards a quorum queue's delivery
limit.

A replay publishes the dead letter to the exchange it came from, waits for the broker's confirm,
and only then acks it: a crash in between leaves it in both places, and the command ids and event
ids that consumers de-duplicate on make that harmless.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
    HeadersType,
)
from aio_pika.exceptions import AMQPError, ChannelNotFoundEntity
from aiormq.abc import DeliveredMessage

from services.cli import render
from services.cli.errors import fail, reason
from shared import broker
from shared.settings import Settings

CONNECTION_NAME = "orderflow-cli-dlq"
DIAGNOSIS_HEADER_PREFIX = "x-orderflow-"
# the count of the queue it was last in: left on a replayed message, it would make the consumer
# give up on it too soon
DELIVERY_COUNT_HEADER = "x-delivery-count"
SHORT_ERROR_LENGTH = 60

T = TypeVar("T")


class DeadLetterError(Exception):
    """A dlq command cannot do what it was asked; the message says why, for the operator."""


@dataclass(frozen=True)
class DeadLetter:
    """A message in the dead-letter queue and what its headers say about it."""

    message_id: str | None
    routing_key: str
    exchange: str | None  # None: dead-lettered before orderflow kept the exchange
    reason: str | None
    consumer: str | None
    deliveries: int | None
    error: str | None
    content_type: str | None
    type: str | None
    correlation_id: str | None
    headers: HeadersType
    body: bytes

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> DeadLetter:
        headers = dict(message.headers or {})
        deliveries = headers.get(broker.DELIVERIES_HEADER)
        return cls(
            message_id=message.message_id,
            routing_key=message.routing_key or "",
            exchange=header_text(headers, broker.EXCHANGE_HEADER),
            reason=header_text(headers, broker.REASON_HEADER),
            consumer=header_text(headers, broker.CONSUMER_HEADER),
            deliveries=deliveries if isinstance(deliveries, int) else None,
            error=header_text(headers, broker.ERROR_HEADER),
            content_type=message.content_type,
            type=message.type,
            correlation_id=message.correlation_id,
            headers=headers,
            body=message.body,
        )

    def original_headers(self) -> HeadersType:
        """Its headers as its publisher sent them: without orderflow's diagnosis and the count."""
        return {
            name: value
            for name, value in self.headers.items()
            if not name.startswith(DIAGNOSIS_HEADER_PREFIX) and name != DELIVERY_COUNT_HEADER
        }


def header_text(headers: Mapping[str, object], name: str) -> str | None:
    value = headers.get(name)
    return None if value is None else str(value)


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command is about; an empty field does not narrow it."""

    message_ids: frozenset[str] = frozenset()
    reason: str | None = None
    consumer: str | None = None

    def matches(self, dead_letter: DeadLetter) -> bool:
        return (
            (not self.message_ids or dead_letter.message_id in self.message_ids)
            and (self.reason is None or dead_letter.reason == self.reason)
            and (self.consumer is None or dead_letter.consumer == self.consumer)
        )

    def chosen(self, messages: Iterable[AbstractIncomingMessage]) -> list[AbstractIncomingMessage]:
        """The messages selected, oldest first; an error when a message id is not among them."""
        chosen = [message for message in messages if self.matches(DeadLetter.of(message))]
        missing = self.message_ids - {message.message_id for message in chosen}
        if missing:
            raise DeadLetterError(f"no dead letter has the message id {', '.join(sorted(missing))}")
        return chosen


@dataclass(frozen=True)
class Replayed:
    """A dead letter sent back: which, and where to."""

    message_id: str | None
    exchange: str
    routing_key: str


@dataclass(frozen=True)
class Taken:
    """The dead letters taken, and the connection and channel they were taken on."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    messages: list[AbstractIncomingMessage]


@asynccontextmanager
async def dead_letters_taken(settings: Settings) -> AsyncIterator[Taken]:
    """Every message in the dead-letter queue, oldest first, taken unacknowledged; those the block
    does not ack go back, in the same order, when it ends."""
    # an operator's command says at once that the broker is down, rather than wait like a service
    connection = await broker.connect(settings, CONNECTION_NAME, patience=0)
    async with connection:
        channel, _ = await broker.open_channel(connection)
        queue = await channel.get_queue(broker.DEAD_LETTER_QUEUE)
        messages: list[AbstractIncomingMessage] = []
        try:
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                messages.append(message)
            yield Taken(connection, channel, messages)
        finally:
            await give_back(messages)


async def give_back(messages: Sequence[AbstractIncomingMessage]) -> None:
    # a channel that is gone already gave them back, in whatever order the broker chose
    with suppress(AMQPError, RuntimeError):
        for message in messages:
            if not message.processed:
                await message.nack(requeue=True)


async def find(settings: Settings, selection: Selection) -> list[DeadLetter]:
    """The dead letters selected, oldest first; the queue is left as it was."""
    async with dead_letters_taken(settings) as taken:
        return [DeadLetter.of(message) for message in selection.chosen(taken.messages)]


async def replay(
    settings: Settings,
    selection: Selection,
    exchange_if_unknown: str | None,
    on_replayed: Callable[[Replayed], None],
) -> None:
    """Republish the selected dead letters, oldest first, each to the exchange it came from, and
    remove each from the dead-letter queue once the broker confirmed it. Nothing is replayed unless
    each has an exchange to go to; the first that the broker routes to no queue stops the replay."""
    async with dead_letters_taken(settings) as taken:
        chosen = selection.chosen(taken.messages)
        if not chosen:
            raise DeadLetterError("no dead letter matches")
        dead_letters = [DeadLetter.of(message) for message in chosen]
        destinations = [destination(dead_letter, exchange_if_unknown) for dead_letter in dead_letters]
        await check_exchanges_exist(taken.connection, set(destinations))
        for message, dead_letter, exchange in zip(chosen, dead_letters, destinations, strict=True):
            await republish(taken.channel, exchange, dead_letter, broker.connection_user(taken.connection))
            await message.ack()
            on_replayed(Replayed(dead_letter.message_id, exchange, dead_letter.routing_key))


def destination(dead_letter: DeadLetter, exchange_if_unknown: str | None) -> str:
    if dead_letter.exchange is not None:
        return dead_letter.exchange
    if exchange_if_unknown is not None:
        return exchange_if_unknown
    raise DeadLetterError(
        f"dead letter {dead_letter.message_id} does not say which exchange it came from (it was "
        f"dead-lettered before orderflow kept that): name it with --exchange"
    )


async def check_exchanges_exist(connection: AbstractRobustConnection, names: set[str]) -> None:
    """Publishing to a missing exchange would close the channel, which gives the taken messages
    back out of order: ask on a channel of its own first."""
    for name in sorted(names - {""}):  # the default exchange always exists, and cannot be declared
        channel = await connection.channel()
        try:
            await channel.get_exchange(name)  # a passive declare
        except ChannelNotFoundEntity:
            raise DeadLetterError(f"there is no exchange {name!r} to replay to") from None
        finally:
            await channel.close()


async def republish(
    channel: AbstractChannel, exchange_name: str, dead_letter: DeadLetter, publisher: str | None
) -> None:
    """Publish it as its publisher did, and wait for the broker's confirm. The broker lets nobody
    publish in another's name: a replayed command is the replaying operator's (`user_id`)."""
    exchange = await channel.get_exchange(exchange_name, ensure=False)
    confirmation = await exchange.publish(
        aio_pika.Message(
            body=dead_letter.body,
            headers=dead_letter.original_headers(),
            content_type=dead_letter.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=dead_letter.message_id,
            correlation_id=dead_letter.correlation_id,
            type=dead_letter.type,
            user_id=publisher,
        ),
        routing_key=dead_letter.routing_key,
        mandatory=True,
    )
    # mandatory: an unroutable message comes back instead of vanishing, and stays a dead letter
    if isinstance(confirmation, DeliveredMessage):
        raise DeadLetterError(
            f"exchange {exchange_name!r} routes {dead_letter.routing_key!r} to no queue: dead letter "
            f"{dead_letter.message_id} and those after it stay in {broker.DEAD_LETTER_QUEUE}"
        )


def run(operation: Coroutine[Any, Any, T]) -> T:
    """Run one dlq operation; a refusal or an unreachable broker ends the command with a message."""
    try:
        return asyncio.run(operation)
    except DeadLetterError as error:
        fail(str(error))
    except (AMQPError, OSError) as error:
        fail(f"cannot work on the dead-letter queue: {reason(error)}")


# --- how the CLI shows them -------------------------------------------------------------------------
def as_json(dead_letter: DeadLetter, *, with_body: bool) -> dict[str, object]:
    item: dict[str, object] = {
        "message_id": dead_letter.message_id,
        "consumer": dead_letter.consumer,
        "reason": dead_letter.reason,
        "deliveries": dead_letter.deliveries,
        "exchange": dead_letter.exchange,
        "routing_key": dead_letter.routing_key,
        "error": dead_letter.error,
    }
    if with_body:
        body, is_json = readable_body(dead_letter.body)
        item |= {
            "content_type": dead_letter.content_type,
            "type": dead_letter.type,
            "correlation_id": dead_letter.correlation_id,
            "headers": dead_letter.headers,
            "body_is_json": is_json,
            "body": body,
        }
    return item


def readable_body(body: bytes) -> tuple[object, bool]:
    """The body parsed if it is JSON (and whether it was), else the repr of its bytes."""
    try:
        return json.loads(body), True
    except ValueError:  # not UTF-8 or not JSON
        return repr(body), False


def summaries(dead_letters: Sequence[DeadLetter]) -> str:
    if not dead_letters:
        return "no dead letters"
    rows = [
        [
            dead_letter.message_id or "-",
            dead_letter.consumer or "-",
            dead_letter.reason or "-",
            "-" if dead_letter.deliveries is None else str(dead_letter.deliveries),
            dead_letter.routing_key,
            shortened(dead_letter.error or ""),
        ]
        for dead_letter in dead_letters
    ]
    return render.table(["MESSAGE ID", "CONSUMER", "REASON", "DELIVERIES", "ROUTING KEY", "ERROR"], rows)


def shortened(error: str) -> str:
    one_line = " ".join(error.split())
    return one_line if len(one_line) <= SHORT_ERROR_LENGTH else one_line[: SHORT_ERROR_LENGTH - 3] + "..."


def details(dead_letter: DeadLetter) -> str:
    body, is_json = readable_body(dead_letter.body)
    publisher_headers = dead_letter.original_headers()
    headers = json.dumps(publisher_headers, default=str, sort_keys=True) if publisher_headers else None
    rows = [
        ("reason", dead_letter.reason),
        ("consumer", dead_letter.consumer),
        ("deliveries", dead_letter.deliveries),
        ("exchange", dead_letter.exchange if dead_letter.exchange is not None else "(not recorded)"),
        ("routing key", dead_letter.routing_key),
        ("content", dead_letter.content_type),
        ("type", dead_letter.type),
        ("correlation", dead_letter.correlation_id),
        ("headers", headers),
    ]
    lines = [f"dead letter {dead_letter.message_id or '(no message id)'}"]
    lines += [f"  {label:<12} {value}" for label, value in rows if value is not None]
    lines += ["  error", indented(dead_letter.error or "")]
    lines += ["  body", indented(json.dumps(body, indent=2, ensure_ascii=False) if is_json else str(body))]
    return "\n".join(lines)


def indented(block: str) -> str:
    return "\n".join(f"    {line}" for line in block.splitlines())


def replayed_text(replayed: Replayed) -> str:
    exchange = replayed.exchange or "the default exchange"
    return f"replayed {replayed.message_id or '-'} to {exchange} with routing key {replayed.routing_key}"
