"""The one way tests wait for something that happens elsewhere: poll until it holds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

TIMEOUT_SECONDS = 15.0


async def eventually(
    check: Callable[[], Awaitable[T | None]], timeout: float = TIMEOUT_SECONDS, what: str | None = None
) -> T:
    """Poll `check` until it returns something truthy, and return that; fail, naming `what` is
    awaited (else `check`), if it has not within `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := await check()):
        if loop.time() > deadline:
            raise AssertionError(f"{what or check} was not met within {timeout} s (last: {result!r})")
        await asyncio.sleep(0.05)
    return result
