"""A consumer service (bridge, audit) run in-process against real servers, and a database that is
down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Self

from shared.settings import Settings

Runner = Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]]


@asynccontextmanager
async def running(runner: Runner, settings: Settings) -> AsyncIterator[None]:
    """Run a service in the background; on exit stop it and surface any error it died of."""
    stop = asyncio.Event()
    service = asyncio.create_task(runner(settings, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(service, timeout=30)


class DownDatabase:
    """A PostgreSQL address whose server resets every connection, counting the attempts."""

    def __init__(self) -> None:
        self.attempts = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._reset, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def settings_for(self, settings: Settings) -> Settings:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return settings.model_copy(
            update={"database_url": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/down"}
        )

    async def retried(self) -> bool:
        """True once a service has tried to connect more than once."""
        return self.attempts > 1

    def _reset(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts += 1
        writer.close()
