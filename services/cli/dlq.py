"""`orderflow dlq`: look into the dead-letter queue and replay what a consumer gave up on. Reading
takes dead letters unacked and nacks them back (requeue), in place and counting no delivery; a replayed
one is acked once its republication is confirmed (a crash in between is harmless: ids are taken once)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TypeVar

import aio_pika
import typer
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, HeadersType
from aio_pika.exceptions import AMQPError
from aiormq.abc import DeliveredMessage

from services.cli import render
from services.cli.errors import fail, unreachable
from shared import broker
from shared.settings import ENV_PREFIX, Settings

CONNECTION_NAME = "orderflow-cli-dlq"
DIAGNOSIS_HEADER_PREFIX = "x-orderflow-"
# left on a replayed message, the count of its quorum queue would make its consumer give up too soon
DELIVERY_COUNT_HEADER = "x-delivery-count"
SHORT_ERROR_LENGTH = 60

T = TypeVar("T")


@dataclass(frozen=True)
class DeadLetter:
    """A message in the dead-letter queue, and why it is there (orderflow's headers on it)."""

    message_id: str | None
    consumer: str | None
    reason: str | None
    deliveries: int | None
    exchange: str | None  # None: dead-lettered before orderflow kept the exchange
    routing_key: str
    error: str | None
    message: AbstractIncomingMessage

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> DeadLetter:
        headers = message.headers or {}
        text = {name: str(value) for name, value in headers.items() if value is not None}
        deliveries = headers.get(broker.DELIVERIES_HEADER)
        return cls(
            message.message_id,
            consumer=text.get(broker.CONSUMER_HEADER),
            reason=text.get(broker.REASON_HEADER),
            deliveries=deliveries if isinstance(deliveries, int) else None,
            exchange=text.get(broker.EXCHANGE_HEADER),
            routing_key=message.routing_key or "",
            error=text.get(broker.ERROR_HEADER),
            message=message,
        )

    def diagnosis(self) -> dict[str, object]:
        """What `dlq list --json` prints: all but the message."""
        return {name: value for name, value in vars(self).items() if name != "message"}

    def original_headers(self) -> HeadersType:
        """Its headers as its publisher sent them: without orderflow's diagnosis and the count."""
        return {
            name: value
            for name, value in (self.message.headers or {}).items()
            if not name.startswith(DIAGNOSIS_HEADER_PREFIX) and name != DELIVERY_COUNT_HEADER
        }


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


@dataclass
class DeadLetterQueue:
    """The dead-letter queue as one connection reads it: what it took, and how many it left behind."""

    queue: AbstractQueue
    publisher: str | None  # the user replayed dead letters are published as
    taken: list[AbstractIncomingMessage] = field(default_factory=list)
    unread: int = 0

    async def take(self, selection: Selection, limit: int | None = None) -> list[DeadLetter]:
        """The selected dead letters, oldest first, up to `limit`; an error if a message id is missing."""
        chosen: list[DeadLetter] = []
        while limit is None or len(chosen) < limit:
            message = await self.queue.get(no_ack=False, fail=False)
            if message is None:
                break
            self.taken.append(message)
            self.unread = message.message_count or 0  # those behind it
            if selection.matches(dead_letter := DeadLetter.of(message)):
                chosen.append(dead_letter)
        missing = selection.message_ids - {dead_letter.message_id for dead_letter in chosen}
        if missing:
            fail(f"no dead letter has the message id {', '.join(sorted(missing))}")
        return chosen


@asynccontextmanager
async def dead_letter_queue(settings: Settings) -> AsyncIterator[DeadLetterQueue]:
    """The dead-letter queue; what the block takes and does not ack goes back when it ends."""
    # an operator's command says at once that the broker is down, rather than wait like a service
    async with await broker.connect(settings, CONNECTION_NAME, patience=0) as connection:
        channel, topology = await broker.open_channel(connection)
        queue = DeadLetterQueue(await channel.get_queue(broker.DEAD_LETTER_QUEUE), topology.publisher)
        try:
            yield queue
        finally:
            with suppress(AMQPError, RuntimeError):  # a channel that is gone gave them back already
                for message in queue.taken:
                    if not message.processed:
                        await message.nack(requeue=True)


async def find(
    settings: Settings, selection: Selection, limit: int | None = None
) -> tuple[list[DeadLetter], int]:
    """The selected dead letters (no more than `limit`), and how many were left unread behind them."""
    async with dead_letter_queue(settings) as dead_letters:
        return await dead_letters.take(selection, limit), dead_letters.unread


async def replay(
    settings: Settings, selection: Selection, exchange_if_unknown: str | None, as_json: bool
) -> None:
    """Republish the selected dead letters, oldest first, each acked once the broker confirmed it;
    nothing is replayed unless each has an exchange, and the first one routed nowhere stops it."""
    async with dead_letter_queue(settings) as dead_letters:
        chosen = await dead_letters.take(selection)
        if not chosen:
            fail("no dead letter matches")
        destinations = [destination(dead_letter, exchange_if_unknown) for dead_letter in chosen]
        # asked first, as publishing to a missing exchange would close the channel halfway through
        for name in sorted(set(destinations) - {""}):  # the default exchange cannot be declared
            if not await broker.in_place(dead_letters.queue.channel, exchanges=(name,)):
                fail(f"there is no exchange {name!r} to replay to")
        for dead_letter, exchange in zip(chosen, destinations, strict=True):
            await republish(dead_letter, exchange, dead_letters.publisher)
            await dead_letter.message.ack()
            message_id, routing_key = dead_letter.message_id, dead_letter.routing_key
            if as_json:
                typer.echo(
                    json.dumps({"message_id": message_id, "exchange": exchange, "routing_key": routing_key})
                )
            else:
                where = exchange or "the default exchange"
                typer.echo(f"replayed {message_id or '-'} to {where} with routing key {routing_key}")


def destination(dead_letter: DeadLetter, exchange_if_unknown: str | None) -> str:
    if dead_letter.exchange is not None:
        return dead_letter.exchange
    if exchange_if_unknown is not None:
        return exchange_if_unknown
    fail(
        f"dead letter {dead_letter.message_id} does not say which exchange it came from (it was "
        f"dead-lettered before orderflow kept that): name it with --exchange"
    )


async def republish(dead_letter: DeadLetter, exchange: str, publisher: str | None) -> None:
    """Publish it as its publisher did, but as `publisher` (nobody may publish in another's name)."""
    properties = dead_letter.message.properties  # a copy of those it came with
    properties.headers = dead_letter.original_headers()
    properties.delivery_mode = aio_pika.DeliveryMode.PERSISTENT
    properties.user_id = publisher
    # mandatory: an unroutable message comes back instead of vanishing, and stays a dead letter
    confirmation = await dead_letter.message.channel.basic_publish(
        dead_letter.message.body,
        exchange=exchange,
        routing_key=dead_letter.routing_key,
        properties=properties,
        mandatory=True,
    )
    if isinstance(confirmation, DeliveredMessage):
        fail(
            f"exchange {exchange!r} routes {dead_letter.routing_key!r} to no queue: dead letter "
            f"{dead_letter.message_id} and those after it stay in {broker.DEAD_LETTER_QUEUE}"
        )


def run(settings: Settings, operation: Coroutine[object, object, T]) -> T:
    """Run one dlq operation; an unreachable broker ends the command with a message."""
    try:
        return asyncio.run(operation)
    except (AMQPError, OSError) as error:
        unreachable("RabbitMQ", settings.amqp_url, f"{ENV_PREFIX}AMQP_URL", error)


def in_full(dead_letter: DeadLetter) -> dict[str, object]:
    """What `dlq show --json` prints: the diagnosis, the message's properties and its body."""
    message = dead_letter.message
    body, is_json = readable_body(message.body)
    return dead_letter.diagnosis() | {
        "content_type": message.content_type,
        "type": message.type,
        "correlation_id": message.correlation_id,
        "headers": message.headers,
        "body_is_json": is_json,
        "body": body,
    }


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
    message = dead_letter.message
    body, is_json = readable_body(message.body)
    headers = dead_letter.original_headers()
    rows = [
        ("reason", dead_letter.reason),
        ("consumer", dead_letter.consumer),
        ("deliveries", dead_letter.deliveries),
        ("exchange", "(not recorded)" if dead_letter.exchange is None else dead_letter.exchange),
        ("routing key", dead_letter.routing_key),
        ("content", message.content_type),
        ("type", message.type),
        ("correlation", message.correlation_id),
        ("headers", json.dumps(headers, default=str, sort_keys=True) if headers else None),
    ]
    lines = [f"dead letter {dead_letter.message_id or '(no message id)'}"]
    lines += [f"  {label:<12} {value}" for label, value in rows if value is not None]
    lines += ["  error", indented(dead_letter.error or "")]
    lines += ["  body", indented(json.dumps(body, indent=2, ensure_ascii=False) if is_json else str(body))]
    return "\n".join(lines)


def indented(block: str) -> str:
    return "\n".join(f"    {line}" for line in block.splitlines())
