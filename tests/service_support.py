"""Helpers for tests that run a consumer service (bridge, audit) in-process against real servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import aio_pika
import pytest_asyncio
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue

from services.stack import isolated_settings
from shared import broker
from shared.contracts import Actor, Role
from shared.settings import Settings

T = TypeVar("T")
Runner = Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]]

TIMEOUT_SECONDS = 15.0

BROKER_USER = "guest"
"""The tests' broker user (the connections' `user_id`): the base settings give it every role and
make it a delegate, so a test may also publish on behalf of another actor."""
GUEST = Actor(subject=BROKER_USER, roles=frozenset(Role))
"""The tests' broker user as an issuer: the bridge resolves it for a command without `issued_by`."""
TEST_REVIEWER = Actor(subject="test-reviewer", roles=frozenset({Role.REVIEWER}))
"""Who approves: never the placer (four eyes), so `GUEST` names this reviewer in approvals."""


def moved_to(settings: Settings, name: str) -> Settings:
    """The session's `settings` (identities, keys, publishers' roles) on a database and a vhost
    called `name`, made anew."""
    broker_root = urlunsplit(urlsplit(settings.amqp_url)._replace(path="/"))
    return isolated_settings(settings.model_copy(update={"amqp_url": broker_root}), name)


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = TIMEOUT_SECONDS) -> T:
    """Poll `check` until it returns something truthy; fail if it has not within `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := await check()):
        if loop.time() > deadline:
            raise AssertionError(f"{check} was not met within {timeout} s (last: {result!r})")
        await asyncio.sleep(0.05)
    return result


@asynccontextmanager
async def running(runner: Runner, settings: Settings) -> AsyncIterator[None]:
    """Run a service in the background; on exit stop it and surface any error it died of."""
    stop = asyncio.Event()
    service = asyncio.create_task(runner(settings, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(service, timeout=30)


@pytest_asyncio.fixture
async def broker_channel(
    base_settings: Settings,
) -> AsyncIterator[tuple[AbstractChannel, broker.Topology]]:
    """The test's own connection to the test vhost, with the topology declared."""
    connection = await broker.connect(base_settings, "tests")
    try:
        yield await broker.open_channel(connection)
    finally:
        await connection.close()


@pytest_asyncio.fixture
async def dead_letters(broker_channel: tuple[AbstractChannel, broker.Topology]) -> AbstractQueue:
    """orderflow's dead-letter queue."""
    channel, _ = broker_channel
    return await channel.declare_queue(broker.DEAD_LETTER_QUEUE, passive=True)


@asynccontextmanager
async def consumer_queue(declared: Awaitable[AbstractQueue]) -> AsyncIterator[AbstractQueue]:
    """A service's queue, declared (as the service declares it) before the service starts, so
    nothing published early is lost; deleted afterwards."""
    queue = await declared
    try:
        yield queue
    finally:
        await queue.delete(if_unused=False, if_empty=False)


async def take_messages(
    queue: AbstractQueue,
    matching: Callable[[AbstractIncomingMessage], bool],
    count: int = 1,
    timeout: float = TIMEOUT_SECONDS,
) -> list[AbstractIncomingMessage]:
    """The first `count` messages of `queue` that match; those passed on the way are taken too."""
    taken: list[AbstractIncomingMessage] = []

    async def all_taken() -> bool:
        while len(taken) < count and (message := await queue.get(no_ack=True, fail=False)) is not None:
            if matching(message):
                taken.append(message)
        return len(taken) == count

    await eventually(all_taken, timeout)
    return taken


async def next_message(
    queue: AbstractQueue,
    matching: Callable[[AbstractIncomingMessage], bool],
    timeout: float = TIMEOUT_SECONDS,
) -> AbstractIncomingMessage:
    """The first message of `queue` that matches; those passed on the way are taken too."""
    [message] = await take_messages(queue, matching, 1, timeout)
    return message


async def drain(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    """Every message waiting in `queue` now."""
    taken = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        taken.append(message)
    return taken


async def publish_raw(
    exchange: AbstractExchange, routing_key: str, body: bytes, user_id: str | None = BROKER_USER
) -> str:
    """Publish a body as is (valid or not); returns the message id it was given."""
    message_id = str(uuid4())
    await exchange.publish(
        aio_pika.Message(body=body, message_id=message_id, content_type="application/json", user_id=user_id),
        routing_key=routing_key,
    )
    return message_id


async def dead_lettered(
    dead_letters: AbstractQueue, message_ids: Collection[str]
) -> dict[str, AbstractIncomingMessage]:
    """The dead letters of these messages, by message id, once all have arrived."""
    messages = await take_messages(
        dead_letters, lambda message: message.message_id in message_ids, len(message_ids)
    )
    return {str(message.message_id): message for message in messages}


async def dead_letter_of(dead_letters: AbstractQueue, message_id: str) -> AbstractIncomingMessage:
    return (await dead_lettered(dead_letters, {message_id}))[message_id]


async def was_dead_lettered(dead_letters: AbstractQueue, message_id: str) -> bool:
    """Whether the message is among those waiting in the dead-letter queue now."""
    return message_id in [message.message_id for message in await drain(dead_letters)]


def verdict(dead_letter: AbstractIncomingMessage) -> tuple[object, object]:
    """Why a message was dead-lettered, and by which consumer."""
    headers = dead_letter.headers
    return headers[broker.REASON_HEADER], headers[broker.CONSUMER_HEADER]


class DownDatabase:
    """A PostgreSQL address whose server resets every connection, counting the attempts."""

    def __init__(self) -> None:
        self.attempts = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._reset, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def settings_for(self, settings: Settings) -> Settings:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return settings.model_copy(
            update={"database_url": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/down"}
        )

    async def retried(self) -> bool:
        """True once a service has tried to connect more than once."""
        return self.attempts > 1

    def _reset(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts += 1
        writer.close()
