"""The LISTEN helper against real PostgreSQL: it hears a NOTIFY, and listens again after its
connection is killed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import db
from shared.notifications import ChannelListener
from shared.settings import Settings
from testsupport.orders import unique_id
from testsupport.polling import eventually

LISTENERS = text("SELECT pid FROM pg_stat_activity WHERE query = :listen AND pid <> pg_backend_pid()")


@pytest_asyncio.fixture(loop_scope="session")
async def engine(base_settings: Settings, migrated_database: str) -> AsyncIterator[AsyncEngine]:
    engine = db.create_engine(base_settings)
    yield engine
    await engine.dispose()


async def notify(engine: AsyncEngine, channel: str) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel})


async def listener_pids(engine: AsyncEngine, channel: str) -> list[int]:
    async with engine.connect() as connection:
        return list(await connection.scalars(LISTENERS, {"listen": f'LISTEN "{channel}"'}))


async def new_listener(engine: AsyncEngine, channel: str, old: int) -> bool:
    return await listener_pids(engine, channel) not in ([], [old])


async def test_a_notification_is_heard_and_a_killed_connection_listens_again(
    base_settings: Settings, engine: AsyncEngine
) -> None:
    channel = "test_" + unique_id("channel").replace("-", "_")
    heard = asyncio.Event()
    listener = ChannelListener(base_settings, channel, heard.set)
    stop = asyncio.Event()
    running = asyncio.create_task(listener.run(stop))
    try:
        await eventually(lambda: asyncio.sleep(0, listener.listening), what="listening")
        heard.clear()  # the wake-up every LISTEN begins with
        await notify(engine, channel)
        await asyncio.wait_for(heard.wait(), 5)

        [pid] = await listener_pids(engine, channel)
        async with engine.connect() as connection:
            await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        await eventually(lambda: new_listener(engine, channel, pid), what="listening again")
        await eventually(lambda: asyncio.sleep(0, listener.listening), what="listening again")

        heard.clear()
        await notify(engine, channel)
        await asyncio.wait_for(heard.wait(), 5)
    finally:
        stop.set()
        await asyncio.wait_for(running, 5)
    assert not listener.listening
