"""The gateway's connections to RabbitMQ, PostgreSQL and Temporal, opened once per process.

The broker and Temporal are connected at start-up when they are up and otherwise on first use, so
the gateway starts (and reports not ready) while a dependency is down instead of crash-looping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from temporalio.client import Client

from shared import broker, db
from shared.settings import Settings
from shared.temporal import connect_temporal

CONNECT_TIMEOUT_SECONDS = 5.0

log = structlog.get_logger(__name__)
T = TypeVar("T")


class DependencyUnavailable(Exception):
    """A dependency the request needs is down; the gateway answers 503."""

    def __init__(self, dependency: str, reason: str) -> None:
        super().__init__(f"{dependency} unavailable: {reason}")
        self.dependency = dependency
        self.reason = reason


def describe(error: BaseException) -> str:
    """A one-line reason for an error, even for exceptions without a message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def _nothing_to_close(_: object) -> None:
    """The Temporal client has no close(); its connection ends with the process."""


class LazyConnection(Generic[T]):
    """A connection opened once, on the first `get()` that finds its dependency up."""

    def __init__(
        self,
        name: str,
        open_: Callable[[], Awaitable[T]],
        close: Callable[[T], Awaitable[None]] = _nothing_to_close,
    ) -> None:
        self.name = name
        self._open = open_
        self._close = close
        self._value: T | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> T:
        """The open connection; raises `DependencyUnavailable` if it cannot be opened now."""
        if self._value is None:
            async with self._lock:  # one connection attempt at a time, not one per request
                if self._value is None:
                    self._value = await self._open_in_time()
        return self._value

    async def _open_in_time(self) -> T:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                return await self._open()
        except Exception as error:  # whatever stops the connection, the dependency is unavailable
            raise DependencyUnavailable(self.name, describe(error)) from error

    async def close(self) -> None:
        value, self._value = self._value, None
        if value is not None:
            await self._close(value)


@dataclass(frozen=True)
class BrokerLink:
    connection: AbstractRobustConnection
    channel: AbstractChannel
    topology: broker.Topology


async def open_broker(settings: Settings) -> BrokerLink:
    connection = await broker.connect(settings, "orderflow-api", patience=0)
    try:
        channel, topology = await broker.open_channel(connection)
        await broker.declare_command_queues(channel, topology, settings)
    except BaseException:
        await connection.close()
        raise
    return BrokerLink(connection=connection, channel=channel, topology=topology)


async def close_broker(link: BrokerLink) -> None:
    await link.connection.close()


@dataclass(frozen=True)
class Connections:
    broker: LazyConnection[BrokerLink]
    temporal: LazyConnection[Client]
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]

    @classmethod
    async def open(cls, settings: Settings) -> Connections:
        # connects lazily, from its pool; a request is not retried, so each connection is checked
        engine = db.create_engine(settings, pre_ping=True)
        connections = cls(
            broker=LazyConnection("broker", partial(open_broker, settings), close_broker),
            temporal=LazyConnection("temporal", partial(connect_temporal, settings, patience=0)),
            engine=engine,
            sessions=db.session_factory(engine),
        )
        await asyncio.gather(_warm_up(connections.broker), _warm_up(connections.temporal))
        return connections

    async def close(self) -> None:
        await self.broker.close()
        await self.temporal.close()
        await self.engine.dispose()


async def _warm_up(connection: LazyConnection[T]) -> None:
    try:
        await connection.get()
    except DependencyUnavailable as error:
        log.warning("dependency unavailable at start-up", dependency=error.dependency, reason=error.reason)
