"""Alembic environment: runs the migrations over asyncpg against ORDERFLOW_DATABASE_URL, with its
password file and TLS settings (or what `shared.schema.upgrade` was given)."""

import asyncio
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import shared.db  # noqa: F401  (registers the tables on SQLModel.metadata for autogenerate)
from shared import connection_security
from shared.settings import Settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name)
target_metadata = SQLModel.metadata


def database_url() -> str:
    return config.attributes.get("database_url") or connection_security.database_url(Settings())


def connect_args() -> dict[str, Any]:
    """asyncpg's `ssl`: as given by `shared.schema.upgrade`, else from the settings."""
    if "database_url" in config.attributes:
        ssl = config.attributes.get("ssl")
        return {} if ssl is None else {"ssl": ssl}
    return {"ssl": connection_security.postgres_ssl(Settings())}


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = create_async_engine(database_url(), connect_args=connect_args())
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
