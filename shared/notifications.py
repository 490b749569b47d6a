"""Hearing PostgreSQL NOTIFY: one LISTEN connection on a channel, opened again while it is down."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import structlog

from shared import db
from shared.settings import Settings

RETRY_SECONDS = 2.0  # the pause before connecting again, and how long a connection attempt may take

log = structlog.get_logger(__name__)


class ChannelListener:
    """Calls `on_notify` per notification on `channel`, and as each LISTEN begins (for any it missed)."""

    def __init__(self, settings: Settings, channel: str, on_notify: Callable[[], None]) -> None:
        self._settings = settings
        self._channel = channel
        self._on_notify = on_notify
        self.listening = False

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until `stop` is set, connecting again `RETRY_SECONDS` after each failure."""
        while not stop.is_set():
            try:
                await self._listen_while_connected(stop)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("cannot listen; polling meanwhile", channel=self._channel, error=repr(error))
                await first_of(stop, stop, RETRY_SECONDS)

    async def _listen_while_connected(self, stop: asyncio.Event) -> None:
        connection = await db.listening_connection(self._settings, timeout=RETRY_SECONDS)
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _: lost.set())
        try:
            await connection.add_listener(self._channel, lambda *_: self._on_notify())
            self.listening = True
            self._on_notify()
            await first_of(lost, stop, timeout=None)
        finally:
            self.listening = False
            connection.terminate()  # no goodbye to wait for: an unanswering server must not hold us


async def first_of(a: asyncio.Event, b: asyncio.Event, timeout: float | None) -> asyncio.Event | None:
    """Wait until `a` or `b` is set (returns it) or `timeout` seconds pass (None; no limit if None)."""
    waits = {asyncio.create_task(a.wait()): a, asyncio.create_task(b.wait()): b}
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    return waits[next(iter(done))] if done else None
