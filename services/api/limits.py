"""The gateway's abuse limits: body size, write rate and event streams per caller, and 422s that do
not echo oversized input back."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, cast

from fastapi import Depends, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from limits import parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.auth import AnyRole
from services.api.errors import Responses, documented_error

# a validation error's `input` longer than this (as JSON) is left out of the answer
ECHOED_INPUT_LIMIT = 200

BODY_LIMIT_RESPONSES: Responses = {
    status.HTTP_413_CONTENT_TOO_LARGE: documented_error("The request body is larger than the gateway takes."),
}
WRITE_LIMIT_RESPONSES: Responses = {
    **BODY_LIMIT_RESPONSES,
    status.HTTP_429_TOO_MANY_REQUESTS: documented_error(
        "The caller sent more state-changing requests than its rate limit allows; nothing was done. "
        "Retry after `Retry-After` seconds.",
        retry_after=True,
    ),
}
STREAM_LIMIT_RESPONSES: Responses = {
    status.HTTP_429_TOO_MANY_REQUESTS: documented_error(
        "The caller has as many event streams open as it may; close one, or retry after `Retry-After`.",
        retry_after=True,
    ),
}


class BodySizeLimit:
    """A 413 for a body over `max_bytes`, before any parsing: by Content-Length, or as a chunked one comes."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is None:
            replay = await self._read_ahead(receive)
        else:  # the server holds the body to its declared length
            replay = None if declared.isdigit() and int(declared) > self.max_bytes else receive
        if replay is None:
            too_large = {"detail": f"the request body is larger than {self.max_bytes} bytes"}
            answer = JSONResponse(too_large, status.HTTP_413_CONTENT_TOO_LARGE, {"Connection": "close"})
            await answer(scope, receive, send)
        else:
            await self.app(scope, replay, send)

    async def _read_ahead(self, receive: Receive) -> Receive | None:
        """A `receive` handing out the whole body, read ahead; None once it grows past the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left: the app sees that
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return None
            if not message.get("more_body", False):
                message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        pending = [message]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        return replay


class WriteRateLimit:
    """Per-caller limits on state-changing requests (a moving window, in this gateway process)."""

    def __init__(self, limits: str) -> None:
        self._limits = parse_many(limits)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    async def check(self, subject: str) -> None:
        """Counts one write of `subject`; raises a 429 with Retry-After once a limit is reached."""
        for limit in self._limits:
            if not await self._limiter.hit(limit, subject):
                stats = await self._limiter.get_window_stats(limit, subject)
                retry_after = max(1, math.ceil(stats.reset_time - time.time()))
                raise HTTPException(
                    status.HTTP_429_TOO_MANY_REQUESTS,
                    detail=f"too many requests: at most {limit} per caller; retry after {retry_after} s",
                    headers={"Retry-After": str(retry_after)},
                )


@dataclass
class StreamSlots:
    """How many event streams each caller has open; a caller at the cap gets a 429."""

    per_subject: int
    open: Counter[str] = field(default_factory=Counter)


def stream_slots(request: Request) -> StreamSlots:
    return cast(StreamSlots, request.app.state.stream_slots)


async def holding_stream_slot(
    slots: Annotated[StreamSlots, Depends(stream_slots)], actor: AnyRole
) -> AsyncIterator[None]:
    """Holds one of the caller's stream slots until the stream ends (FastAPI resumes it once sent)."""
    if slots.open[actor.subject] >= slots.per_subject:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"at most {slots.per_subject} event streams per caller are open at once",
            headers={"Retry-After": "5"},
        )
    slots.open[actor.subject] += 1
    try:
        yield
    finally:
        slots.open[actor.subject] -= 1
        if not slots.open[actor.subject]:
            del slots.open[actor.subject]


async def validation_error(_: Request, error: Exception) -> JSONResponse:
    """FastAPI's 422, without echoing an input larger than `ECHOED_INPUT_LIMIT` back."""
    assert isinstance(error, RequestValidationError)
    problems: list[dict[str, object]] = jsonable_encoder(error.errors())
    for problem in problems:
        if len(json.dumps(problem.get("input"), default=str)) > ECHOED_INPUT_LIMIT:
            del problem["input"]
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT, content={"detail": problems})


StreamSlot = Annotated[None, Depends(holding_stream_slot)]
