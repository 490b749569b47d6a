"""Server-sent event streams from the audit table: one order's events, and every order's.

A stream sends only committed events. An event's SSE `id` is its `position`, which numbers the
table's rows in commit order (migration 0004), so a client reconnecting with `Last-Event-ID` gets
exactly the events after the last one it saw. Streams wake on the NOTIFY the table's trigger sends
at each commit (one LISTEN connection per gateway process, so an idle stream costs no query), and
poll every `POLL_SECONDS` while that connection is down.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, status
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import WithJsonSchema
from sqlalchemy import exists, func
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from services.api.auth import AUTH_RESPONSES, AnyRole, Overseer, readable_by
from services.api.dependencies import ConnectionsDep, OrderIdPath
from services.api.errors import Responses, json_error
from services.api.limits import STREAM_LIMIT_RESPONSES, StreamSlot
from services.api.schemas import StreamedEvent
from shared.contracts import TERMINAL_EVENTS
from shared.db import AuditEvent, Order
from shared.notifications import ChannelListener, first_of
from shared.settings import Settings

EVENTS_CHANNEL = "orderflow_events"  # NOTIFY'd by the audit table's trigger (migration 0004)
POLL_SECONDS = 1.0
PAGE_SIZE = 500  # events read per query
RECONNECT_MILLISECONDS = 1000  # the SSE `retry`: how soon a client reconnects after a lost stream
MAX_POSITION = 2**63 - 1  # positions are BIGINT
TERMINAL_TYPES = [event_type.value for event_type in TERMINAL_EVENTS]

log = structlog.get_logger(__name__)


class EventFeed:
    """Tells this process's streams when events were stored, and when the server stops."""

    def __init__(self, settings: Settings) -> None:
        self._stored = asyncio.Event()
        self.stopping = asyncio.Event()
        self._listener = ChannelListener(settings, EVENTS_CHANNEL, self._wake)

    def next_store(self) -> asyncio.Event:
        """An event set once events are stored after this call: take it before reading, so that
        nothing stored during the read goes unnoticed."""
        return self._stored

    async def wait(self, stored: asyncio.Event, timeout: float | None) -> None:
        """Until `stored` is set, the server stops or `timeout` seconds pass (None: no limit); no
        longer than `POLL_SECONDS` while notifications cannot be heard."""
        if not self._listener.listening:
            timeout = POLL_SECONDS if timeout is None else min(timeout, POLL_SECONDS)
        await first_of(stored, self.stopping, timeout)

    def _wake(self) -> None:
        stored, self._stored = self._stored, asyncio.Event()
        stored.set()

    async def listen(self) -> None:
        """Hear the NOTIFYs until the server stops; reconnects, and polling covers the gaps."""
        await self._listener.run(self.stopping)


SignalHandler = Callable[[int, FrameType | None], object]


@contextmanager
def on_exit_signals(callback: Callable[[], None]) -> Iterator[None]:
    """Call `callback` (in the event loop) on SIGINT and SIGTERM, then the handler installed before:
    ASGI tells a stream nothing when the server stops, and uvicorn's graceful shutdown waits for
    every response to end. A default handler ends the process anyway, so it is not wrapped."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    loop = asyncio.get_running_loop()
    previous: dict[signal.Signals, SignalHandler] = {}

    def chained(handler: SignalHandler, sig: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(callback)
        handler(sig, frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler):
            previous[sig] = handler
            signal.signal(sig, partial(chained, handler))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@asynccontextmanager
async def event_feed(app: FastAPI) -> AsyncIterator[None]:
    """The process's `EventFeed` (`app.state.event_feed`), listening while the app runs; the streams
    end when the server is told to stop, and at the latest when the app shuts down."""
    feed = EventFeed(app.state.settings)
    app.state.event_feed = feed
    listener = asyncio.create_task(feed.listen())
    try:
        with on_exit_signals(feed.stopping.set):
            yield
    finally:
        feed.stopping.set()
        listener.cancel()  # it may be connecting to a database that does not answer
        with suppress(asyncio.CancelledError):
            await listener


router = APIRouter(tags=["orders"], lifespan=event_feed)


def get_feed(request: Request) -> EventFeed:
    feed: EventFeed = request.app.state.event_feed
    return feed


FeedDep = Annotated[EventFeed, Depends(get_feed)]

# --- the resume point -----------------------------------------------------------------------------
# documented without the `null` of `int | None`: a header has no null (absent is absent)
POSITION_SCHEMA = WithJsonSchema({"type": "integer", "minimum": 0, "maximum": MAX_POSITION})
LastEventIdHeader = Annotated[
    int | None,
    Header(
        alias="Last-Event-ID",
        ge=0,
        le=MAX_POSITION,
        description="Resume after this event: the `id` of the last event received (an `EventSource` "
        "sends it by itself when it reconnects). Wins over `last_event_id`.",
    ),
    POSITION_SCHEMA,
]
LastEventIdQuery = Annotated[
    int | None,
    Query(
        ge=0,
        le=MAX_POSITION,
        description="The same as the `Last-Event-ID` header, for clients that cannot send headers.",
    ),
    POSITION_SCHEMA,
]


def resume_point(header: LastEventIdHeader = None, last_event_id: LastEventIdQuery = None) -> int | None:
    """The position after which the client wants events, if it said."""
    return header if header is not None else last_event_id


ResumeDep = Annotated[int | None, Depends(resume_point)]


def streamed(event: StreamedEvent) -> ServerSentEvent:
    return ServerSentEvent(data=event, id=str(event.position))


def starting_point(position: int) -> ServerSentEvent:
    """No data, so no event for the client: its last event id becomes `position` (where it resumes
    even before its first event), and it learns how soon to reconnect."""
    return ServerSentEvent(id=str(position), retry=RECONNECT_MILLISECONDS)


@contextmanager
def logging_early_ends(feed: EventFeed, **context: object) -> Iterator[None]:
    """Log a stream that ends before its time: its client left, or the gateway is stopping."""
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        log.info("event stream closed: the client left", **context)
        raise
    if feed.stopping.is_set():
        log.info("event stream closed: the gateway is stopping", **context)


def stream_description(what: str, ends: str) -> str:
    return (
        f"{what} as server-sent events (`text/event-stream`), each event's `data` a JSON "
        "`StreamedEvent`. An event's SSE `id` is its `position`: its place in the audit table, "
        "counting in the order events were committed, across all orders. Resume with `Last-Event-ID` "
        "(header) or `last_event_id` (query) to get exactly the events after that one. The stream "
        "first sends an `id` with no data (the point it starts from), then events in `position` order, "
        f"with a `: ping` comment every 15 s while there is nothing to send. {ends}"
    )


# --- one order ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OrderStream:
    order_id: str
    after: int
    ended: bool  # the order's ending (its terminal event) is at or before `after`


async def order_stream_start(
    actor: AnyRole, order_id: OrderIdPath, connections: ConnectionsDep, after: ResumeDep
) -> OrderStream:
    """Where the order's stream starts; answers 404 for an unknown order (to a customer, one it did
    not place) and 204 for an ended one with nothing after the resume point, before any stream begins."""
    start = after or 0
    async with connections.sessions() as session:
        known = await order_is_known(session, order_id)
        if not known or not await readable_by(session, actor, order_id):
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                detail=f"order {order_id!r} is unknown: no events and no row in the orders table",
            )
        ending = await ending_position(session, order_id)
        if ending is not None and not await events_after(session, start, 1, order_id):
            # an EventSource stops reconnecting on a 204
            raise HTTPException(status.HTTP_204_NO_CONTENT)
    return OrderStream(order_id, start, ended=ending is not None and ending <= start)


ORDER_STREAM_RESPONSES: Responses = {
    **AUTH_RESPONSES,
    **STREAM_LIMIT_RESPONSES,
    status.HTTP_204_NO_CONTENT: {
        "description": "The order has ended and nothing of it comes after `Last-Event-ID`: there is "
        "nothing more to stream (an `EventSource` stops reconnecting)."
    },
    status.HTTP_404_NOT_FOUND: json_error(
        "Neither the audit table nor the orders table knows the order (or, to a customer, it is another's)."
    ),
}


@router.get(
    "/orders/{order_id}/events/stream",
    summary="Follow an order's events",
    description=stream_description(
        "The order's events from the audit table (all of them, or those after `Last-Event-ID`), then "
        "each one as it is stored,",
        "The stream ends after the order's terminal event (`completed`, `cancelled`, `failed` or "
        "`terminated`) and whatever of the order was stored by then (a late command's "
        "`command_rejected`), and when the gateway stops (reconnect to resume).",
    ),
    response_class=EventSourceResponse,
    response_description="The order's events.",
    responses=ORDER_STREAM_RESPONSES,
)
async def order_event_stream(
    _slot: StreamSlot,
    start: Annotated[OrderStream, Depends(order_stream_start)],
    feed: FeedDep,
    connections: ConnectionsDep,
) -> AsyncIterator[StreamedEvent]:
    # the annotation documents the events' data; a ServerSentEvent is sent as it is
    yield starting_point(start.after)  # type: ignore[misc]
    after, ended = start.after, start.ended
    with logging_early_ends(feed, stream="order", order_id=start.order_id):
        while not feed.stopping.is_set():
            stored = feed.next_store()
            async with connections.sessions() as session:
                events = await events_after(session, after, PAGE_SIZE, start.order_id)
            for event in events:
                yield streamed(event)  # type: ignore[misc]
                after = event.position
                ended = ended or event.type.is_terminal
            if len(events) == PAGE_SIZE:
                continue
            if ended:  # everything stored up to the ending and after it is sent
                return
            await feed.wait(stored, timeout=None)


# --- every order ----------------------------------------------------------------------------------
@router.get(
    "/events/stream",
    summary="Follow every order's events",
    description=stream_description(
        "Every order's events from the audit table as they are stored (without `Last-Event-ID`: from "
        "now on; `0`: from the first),",
        "The stream runs until the client leaves, unless `limit` or `timeout` ends it sooner, and "
        "ends when the gateway stops (reconnect to resume).",
    ),
    response_class=EventSourceResponse,
    response_description="Every order's events.",
    responses={**AUTH_RESPONSES, **STREAM_LIMIT_RESPONSES},
)
async def event_stream(
    _: Overseer,
    _slot: StreamSlot,
    feed: FeedDep,
    connections: ConnectionsDep,
    after: ResumeDep,
    limit: Annotated[
        int | None, Query(ge=1, le=10_000, description="End the stream after this many events.")
    ] = None,
    timeout: Annotated[
        int | None,
        Query(ge=1, le=3600, description="End the stream after this many seconds (events or not)."),
    ] = None,
) -> AsyncIterator[StreamedEvent]:
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    if after is None:
        async with connections.sessions() as session:
            after = await newest_position(session)
    yield starting_point(after)  # type: ignore[misc]  # as in order_event_stream
    sent = 0
    with logging_early_ends(feed, stream="all"):
        while not feed.stopping.is_set() and (deadline is None or loop.time() < deadline):
            stored = feed.next_store()
            wanted = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - sent)
            async with connections.sessions() as session:
                events = await events_after(session, after, wanted)
            for event in events:
                yield streamed(event)  # type: ignore[misc]
                after = event.position
            sent += len(events)
            if limit is not None and sent >= limit:
                return
            if len(events) < wanted:
                await feed.wait(stored, timeout=None if deadline is None else deadline - loop.time())


# --- queries of the audit table -------------------------------------------------------------------
async def order_is_known(session: AsyncSession, order_id: str) -> bool:
    has_events = exists().where(col(AuditEvent.order_id) == order_id)
    has_row = exists().where(col(Order.id) == order_id)
    return bool(await session.scalar(select(has_events | has_row)))


async def ending_position(session: AsyncSession, order_id: str) -> int | None:
    """The position of the order's terminal event, if it has ended."""
    query = select(func.min(col(AuditEvent.position))).where(
        col(AuditEvent.order_id) == order_id, col(AuditEvent.type).in_(TERMINAL_TYPES)
    )
    position: int | None = await session.scalar(query)
    return position


async def events_after(
    session: AsyncSession, position: int, limit: int, order_id: str | None = None
) -> list[StreamedEvent]:
    """The first `limit` events after `position` (of `order_id` alone, if given), in position order."""
    query = select(AuditEvent).where(col(AuditEvent.position) > position)
    if order_id is not None:
        query = query.where(col(AuditEvent.order_id) == order_id)
    query = query.order_by(col(AuditEvent.position)).limit(limit)
    return [StreamedEvent.model_validate(row, from_attributes=True) for row in await session.scalars(query)]


async def newest_position(session: AsyncSession) -> int:
    position: int | None = await session.scalar(select(func.max(col(AuditEvent.position))))
    return position or 0
