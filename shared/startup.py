"""How a service starts: its probes served, its servers waited for (`startup_patience_seconds`, else one
line on stderr and exit code 2). How it stops: `drain_seconds` for the work in hand, a second to close,
then it exits, within the 10 s a platform gives before SIGKILL."""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import NoReturn

import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from shared import broker, db
from shared.consuming import stopped_within
from shared.probes import (
    CONNECT_TIMEOUT_SECONDS,
    Check,
    LazyConnection,
    channel_open,
    database_answers,
    serve_endpoints,
    temporal_serving,
)
from shared.reachability import Whereabouts, diagnose, unreachable_reason, without_password
from shared.settings import ENV_PREFIX, Settings
from shared.temporal import connect_config, connect_temporal

EXIT_UNREACHABLE = 2
EXIT_STOPPED_LATE = 1
CLOSE_SECONDS = 1.0  # after the drain, for closing the connections
RETRY_SECONDS = 1.0

log = structlog.get_logger(__name__)


class Dependency(StrEnum):
    """A server a service may depend on, by the name /readyz gives it."""

    BROKER = "broker"
    DATABASE = "database"
    TEMPORAL = "temporal"


def whereabouts(dependency: Dependency, settings: Settings) -> Whereabouts:
    match dependency:
        case Dependency.BROKER:
            return Whereabouts("RabbitMQ", without_password(settings.amqp_url), f"{ENV_PREFIX}AMQP_URL")
        case Dependency.DATABASE:
            url = without_password(settings.database_url)
            return Whereabouts("PostgreSQL", url, f"{ENV_PREFIX}DATABASE_URL")
        case Dependency.TEMPORAL:
            target = connect_config(settings)["target_host"]
            # Temporal's own variables (or profile) win over ours (shared/temporal.py)
            own = target == settings.temporal_address
            return Whereabouts(
                "Temporal", target, f"{ENV_PREFIX}TEMPORAL_ADDRESS" if own else "TEMPORAL_ADDRESS"
            )


@dataclass(frozen=True)
class ProbeChannel:
    connection: AbstractRobustConnection
    channel: AbstractChannel


class ServiceConnections:
    """The service's own connection to each server it uses, for /readyz (beside those its work uses)."""

    def __init__(self, settings: Settings, program: str, dependencies: Collection[Dependency]) -> None:
        self.broker = LazyConnection(
            Dependency.BROKER, partial(_open_channel, settings, program), _close_channel
        )
        self.database = db.create_engine(settings)  # connects on first use
        self.temporal = LazyConnection(Dependency.TEMPORAL, partial(connect_temporal, settings, patience=0))
        every: dict[Dependency, Check] = {
            Dependency.BROKER: self._check_broker,
            Dependency.DATABASE: partial(database_answers, self.database),
            Dependency.TEMPORAL: self._check_temporal,
        }
        self.checks = {name.value: check for name, check in every.items() if name in dependencies}

    async def _check_broker(self) -> str:
        return await channel_open((await self.broker.get()).channel)

    async def _check_temporal(self) -> str:
        return await temporal_serving(await self.temporal.get())

    async def close(self) -> None:
        await self.broker.close()
        await self.database.dispose()


async def _open_channel(settings: Settings, program: str) -> ProbeChannel:
    connection = await broker.connect(settings, f"{program}-probes", patience=0)
    return ProbeChannel(connection, await connection.channel())


async def _close_channel(link: ProbeChannel) -> None:
    await link.connection.close()


@dataclass(frozen=True)
class Started:
    stop: asyncio.Event  # set by SIGINT or SIGTERM
    connections: ServiceConnections


@asynccontextmanager
async def started(
    settings: Settings, service: str, endpoints_port: int, dependencies: Collection[Dependency]
) -> AsyncIterator[Started]:
    """Serve metrics and probes on `endpoints_port` (0: none) and wait for `dependencies` (else exit)."""
    program = f"orderflow-{service}"
    stop = stop_on_signals(settings.drain_seconds)
    connections = ServiceConnections(settings, program, dependencies)
    try:
        serve_endpoints(settings.metrics_host, endpoints_port, connections.checks)
        await _reach_or_exit(settings, program, connections.checks, stop)
        yield Started(stop, connections)
    finally:
        await connections.close()


async def reach_or_exit(settings: Settings, service: str, dependencies: Collection[Dependency]) -> None:
    """Wait for `dependencies` as `started` does, then let go of them (the gateway opens its own)."""
    async with started(settings, service, 0, dependencies):
        pass


async def _reach_or_exit(
    settings: Settings, program: str, checks: dict[str, Check], stop: asyncio.Event
) -> None:
    deadline = asyncio.get_running_loop().time() + settings.startup_patience_seconds
    waits = (_wait_for(settings, Dependency(name), check, deadline, stop) for name, check in checks.items())
    reasons = await asyncio.gather(*waits)
    if stop.is_set():
        _exit_before_starting(0)
    if reason := next(filter(None, reasons), None):
        print(f"{program}: {reason}", file=sys.stderr)
        _exit_before_starting(EXIT_UNREACHABLE)


async def _wait_for(
    settings: Settings, dependency: Dependency, check: Check, deadline: float, stop: asyncio.Event
) -> str | None:
    """Why the dependency did not answer by `deadline`; None once it answers, or the service stops."""
    where = whereabouts(dependency, settings)
    loop = asyncio.get_running_loop()
    while True:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                await check()
            return None
        except Exception as error:  # noqa: BLE001 (whatever the reason, the server did not answer)
            if loop.time() + RETRY_SECONDS > deadline:
                return unreachable_reason(where, error)
            why = diagnose(error).reason
            log.info("waiting for a server", server=where.product, address=where.address, reason=why)
        if await stopped_within(stop, RETRY_SECONDS):
            return None


def stop_on_signals(drain_seconds: int) -> asyncio.Event:
    """Set by SIGINT or SIGTERM; the process ends at the latest `drain_seconds` + `CLOSE_SECONDS` later."""
    stop = asyncio.Event()

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            exit_unless_ended_within(drain_seconds + CLOSE_SECONDS)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    return stop


def exit_unless_ended_within(seconds: float) -> None:
    """Exit `seconds` from now, with a line saying so, whatever the process still waits for then."""
    # run in this context, so that its log line names the service as the others do
    watchdog = threading.Timer(seconds, contextvars.copy_context().run, [_exit_now])
    watchdog.daemon = True
    watchdog.start()


def _exit_before_starting(code: int) -> NoReturn:
    # no interpreter shutdown: beside the threads of Temporal's core it can abort, losing the exit code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_now() -> None:
    log.error("not stopped within the drain time; exiting without closing what is still open")
    _exit_before_starting(EXIT_STOPPED_LATE)
