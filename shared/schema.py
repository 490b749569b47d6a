"""Create the database if it is missing and bring its schema to the newest migration; `ssl` is what
`connection_security.postgres_ssl` makes of the settings (None: asyncpg's default)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

from shared.connection_security import PostgresSSL

ALEMBIC_INI = Path(__file__).resolve().parents[1] / "alembic.ini"


async def ensure_database(database_url: str, ssl: PostgresSSL | None = None) -> None:
    async with _server(database_url, ssl) as (server, name):
        exists = await server.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await server.execute(f'CREATE DATABASE "{name}"')


async def drop_database(database_url: str, ssl: PostgresSSL | None = None) -> None:
    """Drop the database if it exists, disconnecting whoever uses it (tests and benchmarks)."""
    async with _server(database_url, ssl) as (server, name):
        await server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@asynccontextmanager
async def _server(
    database_url: str, ssl: PostgresSSL | None
) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A connection to the server's `postgres` database, and the name of the URL's database."""
    url = make_url(database_url)
    server_url = url.set(drivername="postgresql", database="postgres")
    server = await asyncpg.connect(server_url.render_as_string(hide_password=False), ssl=ssl)
    try:
        yield server, str(url.database)
    finally:
        await server.close()


def upgrade(database_url: str, ssl: PostgresSSL | None = None) -> None:
    """Apply every migration (alembic runs its own event loop, so call this outside one)."""
    config = Config(str(ALEMBIC_INI))
    config.attributes.update(database_url=database_url, ssl=ssl, configure_logging=False)
    # alembic's migration context is one per process: two threads migrating at once (two
    # systems a benchmark starts side by side) would run each other's migrations
    with _MIGRATING:
        command.upgrade(config, "head")


_MIGRATING = threading.Lock()


def migrate(database_url: str, ssl: PostgresSSL | None = None) -> None:
    asyncio.run(ensure_database(database_url, ssl))
    upgrade(database_url, ssl)
