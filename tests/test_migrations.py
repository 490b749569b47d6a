"""The migrations and the sqlmodel tables describe the same schema, and the migrations go both ways."""

import asyncio

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import shared.db  # noqa: F401  (registers the tables)
from shared.schema import ALEMBIC_INI, drop_database, ensure_database, upgrade
from shared.settings import Settings


def differences(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, SQLModel.metadata))


async def test_the_migrated_schema_matches_the_models(migrated_database: str) -> None:
    engine = create_async_engine(migrated_database)
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(differences)
    finally:
        await engine.dispose()
    assert diff == []


async def test_the_migrations_downgrade_and_upgrade_again(
    base_settings: Settings, migrated_database: str
) -> None:
    scratch = base_settings.database_url + "_migration_check"
    await drop_database(scratch)
    await ensure_database(scratch)
    config = Config(str(ALEMBIC_INI))
    config.attributes.update({"database_url": scratch, "configure_logging": False})

    def round_trip() -> None:
        command.upgrade(config, "head")
        command.downgrade(config, "base")
        command.upgrade(config, "head")

    await asyncio.to_thread(round_trip)
    engine = create_async_engine(scratch)
    try:
        async with engine.connect() as connection:
            tables = await connection.run_sync(lambda c: set(inspect(c).get_table_names()))
    finally:
        await engine.dispose()
        await drop_database(scratch)
    assert {"orders", "payments", "order_events", "processed_commands"} <= tables


async def test_two_databases_migrate_at_once_in_one_process(base_settings: Settings) -> None:
    # a benchmark starts two systems side by side; alembic's context is one per process
    scratches = [base_settings.database_url + f"_concurrent_{n}" for n in (1, 2)]
    for scratch in scratches:
        await drop_database(scratch)
        await ensure_database(scratch)
    try:
        await asyncio.gather(*(asyncio.to_thread(upgrade, scratch) for scratch in scratches))
        for scratch in scratches:
            engine = create_async_engine(scratch)
            try:
                async with engine.connect() as connection:
                    assert await connection.run_sync(differences) == []
            finally:
                await engine.dispose()
    finally:
        for scratch in scratches:
            await drop_database(scratch)
