"""The gateway's connections to RabbitMQ, PostgreSQL and Temporal, opened once per process (the broker and
Temporal, once lost, again on the next request that needs them), and the routes' dependencies on them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, cast

import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from temporalio.client import Client

from shared import broker, db
from shared.probes import DependencyUnavailable, LazyConnection
from shared.settings import Settings
from shared.temporal import connect_temporal

log = structlog.get_logger(__name__)


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
            broker=LazyConnection(
                "broker", partial(open_broker, settings), lambda link: link.connection.close()
            ),
            temporal=LazyConnection("temporal", partial(connect_temporal, settings, patience=0)),
            engine=engine,
            sessions=db.session_factory(engine),
        )
        await asyncio.gather(warm_up(connections.broker), warm_up(connections.temporal))
        return connections

    async def close(self) -> None:
        await self.broker.close()
        await self.temporal.close()
        await self.engine.dispose()


async def warm_up(connection: LazyConnection[Any]) -> None:  # a connection to any kind of server
    """Connect now if the dependency is up; one that is down is only logged (and tried again on use)."""
    try:
        await connection.get()
    except DependencyUnavailable as error:
        log.warning("dependency unavailable at start-up", dependency=error.dependency, reason=error.reason)


def get_connections(request: Request) -> Connections:
    return cast(Connections, request.app.state.connections)


ConnectionsDep = Annotated[Connections, Depends(get_connections)]


async def get_session(connections: ConnectionsDep) -> AsyncIterator[AsyncSession]:
    async with connections.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]
