"""PostgreSQL and RabbitMQ servers of our own, for what restarts them (tests/test_crash.py,
bench/chaos.py), the settings of a system on them, and a client's publish that rides out such a
restart.

The machine's servers on 5432 and 5672 are shared with whoever else runs tests at the same time, so
whatever restarts a server restarts one started here (devstack/servers.py): on free ports, with its
data in a temporary directory that goes when it stops. A restart keeps the data, as a real one does.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from devstack.servers import (
    PrivatePostgres,
    PrivateRabbitMQ,
    embedded_postgres,
    machine_postgres,
    rabbitmq_server,
)
from devstack.stack import METRICS_PORT_SETTINGS, TemporalDevServer, free_port
from shared import broker
from shared.contracts import Command
from shared.settings import Settings

PUBLISH_ATTEMPT_SECONDS = 5.0
PUBLISH_RETRY_SECONDS = 0.2
PUBLISH_PATIENCE_SECONDS = 60.0


@dataclass(frozen=True)
class ServerPrograms:
    """What private servers are started from: the folder of PostgreSQL's server programs and the
    rabbitmq-server script."""

    postgres: Path
    rabbitmq_server: Path

    @classmethod
    def found(cls) -> ServerPrograms:
        """The machine's PostgreSQL, else the embedded one's; ServerUnavailable without them."""
        return cls(machine_postgres() or embedded_postgres(), rabbitmq_server())


def reachable_directory() -> Path:
    """A new temporary directory that the postgres account, which runs PostgreSQL for root, can
    reach (pytest's own are the user's alone)."""
    base = Path(tempfile.mkdtemp(prefix="orderflow-servers-"))
    base.chmod(0o755)
    return base


@asynccontextmanager
async def private_servers(programs: ServerPrograms) -> AsyncIterator[tuple[PrivatePostgres, PrivateRabbitMQ]]:
    """A PostgreSQL and a RabbitMQ server; stopped, and their data deleted, at the end."""
    base = reachable_directory()
    async with AsyncExitStack() as exits:
        exits.callback(shutil.rmtree, base, ignore_errors=True)
        (base / "postgres").mkdir()
        (base / "rabbitmq").mkdir()
        postgres = PrivatePostgres(base / "postgres", free_port(), programs.postgres)
        await postgres.start()
        exits.push_async_callback(postgres.stop)
        rabbitmq = PrivateRabbitMQ(base / "rabbitmq", free_port(), programs.rabbitmq_server)
        exits.push_async_callback(rabbitmq.stop)  # also stops a node that never opened its port
        await rabbitmq.start()
        yield postgres, rabbitmq


def unhurried(settings: Settings) -> Settings:
    """`settings` for a system whose tests check what happens, not how fast (bench/ measures that
    with the shipped timings): a slow machine must not turn an order into a timeout, and a
    person-like client gets time to act. Its API and metrics listen on free ports, so that sessions
    side by side (pytest-xdist's workers) each run a system."""
    port = free_port()
    return settings.model_copy(
        update={
            "api_port": port,
            "api_url": f"http://127.0.0.1:{port}",
            **{setting: free_port() for setting in METRICS_PORT_SETTINGS.values()},
            "review_window_seconds": 30.0,
            "lifecycle_deadline_seconds": 45.0,
        }
    )


def on_private_servers(
    settings: Settings,
    postgres: PrivatePostgres,
    rabbitmq: PrivateRabbitMQ,
    temporal: TemporalDevServer,
    database: str,
) -> Settings:
    """`settings` for a system on these servers (its database called `database`), unhurried: a
    server's restart must not turn an order into a timeout."""
    return unhurried(settings).model_copy(
        update={
            "database_url": postgres.database_url(database),
            "amqp_url": rabbitmq.amqp_url,
            "temporal_address": f"127.0.0.1:{temporal.port}",
        }
    )


async def publish_until_confirmed(
    topology: broker.Topology, command: Command, patience: float = PUBLISH_PATIENCE_SECONDS
) -> None:
    """Publish as a client riding out a broker restart does: again, with the same command id (so
    one effect), until the broker confirms it; TimeoutError after `patience` seconds. The robust
    connection reconnects meanwhile."""
    async with asyncio.timeout(patience):
        while True:
            try:
                async with asyncio.timeout(PUBLISH_ATTEMPT_SECONDS):
                    await broker.publish_command(topology, command)
                return
            except (TimeoutError, *CONNECTION_EXCEPTIONS):
                await asyncio.sleep(PUBLISH_RETRY_SECONDS)
