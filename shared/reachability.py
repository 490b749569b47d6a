"""Waiting for a server that is still starting, and why one did not answer, in one line a person can
act on: what it is, where it was looked for (without a password) and the setting that says where."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import structlog

T = TypeVar("T")

CONNECT_PATIENCE_SECONDS = 60.0

# the Rust core of the Temporal SDK tells why it could not connect only inside its error's text
_TEMPORAL_OS_ERROR = re.compile(r"Os \{ code: (\d+)")
_TEMPORAL_CAUSE = re.compile(r'error: "([^"]+)"')


async def patiently(
    connect: Callable[[], Awaitable[T]],
    errors: tuple[type[BaseException], ...],
    patience: float,
    waiting: str,
    **fields: object,
) -> T:
    """`connect()`, tried again each second while it fails with `errors`, for up to `patience` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        try:
            return await connect()
        except errors as error:
            if loop.time() >= deadline:
                raise
            structlog.get_logger(__name__).info(waiting, **fields, error=str(error))
            await asyncio.sleep(1.0)


@dataclass(frozen=True)
class Whereabouts:
    """What to tell a person about a server that does not answer."""

    product: str
    address: str  # without a password
    setting: str  # the environment variable that says where it is


def without_password(url: str) -> str:
    parts = urlsplit(url)
    user, at, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}{at}{host}"))


def unreachable_reason(where: Whereabouts, error: BaseException) -> str:
    failure = diagnose(error)
    server = f"{where.product} at {where.address}"
    if failure.answered:
        return f"{server} refused the connection ({failure.reason}); check {where.setting}"
    return f"cannot reach {server} ({failure.reason}); is it running? set {where.setting}"


@dataclass(frozen=True)
class Failure:
    reason: str  # as a person would say it: `connection refused`, not the wrappers' words
    answered: bool  # the server was there, and refused (a wrong password, a missing database)


def diagnose(error: BaseException) -> Failure:
    cause = error.__cause__ or error  # what DependencyUnavailable or SQLAlchemy wraps
    if isinstance(error, TimeoutError) or isinstance(cause, TimeoutError):
        return Failure("no answer", answered=False)
    if isinstance(cause, OSError) and cause.errno is not None and cause.errno > 0:
        return Failure(os.strerror(cause.errno).lower(), answered=False)
    if isinstance(cause, OSError) and cause.errno is not None and cause.strerror:  # a name not resolved
        return Failure(cause.strerror.lower(), answered=False)
    if os_error := _TEMPORAL_OS_ERROR.search(str(cause)):
        return Failure(os.strerror(int(os_error[1])).lower(), answered=False)
    if temporal_cause := _TEMPORAL_CAUSE.search(str(cause)):
        return Failure(temporal_cause[1].lower(), answered=False)
    return Failure((str(cause).strip() or type(cause).__name__).splitlines()[0], answered=True)
