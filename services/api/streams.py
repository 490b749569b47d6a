"""Server-sent event streams of the audit table's committed events: one order's, and every order's.
An event's SSE `id` is its `position` (commit order, migration 0004), so `Last-Event-ID` resumes right
after it. Streams wake on the table trigger's NOTIFY, and poll every `POLL_SECONDS` while it is not heard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated, cast

import structlog
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, status
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import WithJsonSchema
from sqlalchemy import exists, func
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from services.api.auth import AUTH_RESPONSES, AnyRole, Overseer, readable_by
from services.api.connections import Connections, ConnectionsDep
from services.api.errors import json_error
from services.api.limits import STREAM_LIMIT_RESPONSES, StreamSlot
from services.api.schemas import OrderIdPath, StreamedEvent
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
        self.stored = asyncio.Event()  # set once events are stored, then replaced by an unset one
        self.stopping = asyncio.Event()
        self.listener = ChannelListener(settings, EVENTS_CHANNEL, self._wake)

    async def wait(self, stored: asyncio.Event, timeout: float | None) -> None:
        """Until `stored` is set, the server stops or `timeout` passes; polls while NOTIFY is not heard."""
        if not self.listener.listening:
            timeout = POLL_SECONDS if timeout is None else min(timeout, POLL_SECONDS)
        await first_of(stored, self.stopping, timeout)

    def _wake(self) -> None:
        stored, self.stored = self.stored, asyncio.Event()
        stored.set()


@asynccontextmanager
async def event_feed(app: FastAPI) -> AsyncIterator[None]:
    """`app.state.event_feed`, listening while the app runs (the server stops it before it drains)."""
    feed = app.state.event_feed = EventFeed(app.state.settings)
    listener = asyncio.create_task(feed.listener.run(feed.stopping))
    try:
        yield
    finally:
        feed.stopping.set()
        listener.cancel()  # it may be connecting to a database that does not answer
        with suppress(asyncio.CancelledError):
            await listener


router = APIRouter(tags=["orders"], lifespan=event_feed)


def get_feed(request: Request) -> EventFeed:
    return cast(EventFeed, request.app.state.event_feed)


FeedDep = Annotated[EventFeed, Depends(get_feed)]

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
    return header if header is not None else last_event_id


ResumeDep = Annotated[int | None, Depends(resume_point)]


def stream_description(what: str, ends: str) -> str:
    return (
        f"{what} as server-sent events (`text/event-stream`), each event's `data` a JSON "
        "`StreamedEvent`. An event's SSE `id` is its `position`: its place in the audit table, "
        "counting in the order events were committed, across all orders. Resume with `Last-Event-ID` "
        "(header) or `last_event_id` (query) to get exactly the events after that one. The stream "
        "first sends an `id` with no data (the point it starts from), then events in `position` order, "
        f"with a `: ping` comment every 15 s while there is nothing to send. {ends}"
    )


async def follow(
    feed: EventFeed,
    connections: Connections,
    after: int,
    order_id: str | None = None,
    ended: bool = False,
    limit: int | None = None,
    timeout: int | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """The events after `after`: every order's, or `order_id`'s until its ending (`ended`: it had ended)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    context = {"stream": "all"} if order_id is None else {"stream": "order", "order_id": order_id}
    # no data, so no event: the client resumes from `after` even before its first event, and learns `retry`
    yield ServerSentEvent(id=str(after), retry=RECONNECT_MILLISECONDS)
    sent = 0
    try:
        while not feed.stopping.is_set() and (deadline is None or loop.time() < deadline):
            stored = feed.stored  # taken before reading, so nothing stored during the read goes unnoticed
            wanted = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - sent)
            async with connections.sessions() as session:
                events = await events_after(session, after, wanted, order_id)
            for event in events:
                yield ServerSentEvent(data=event, id=str(event.position))
                after = event.position
                ended = ended or (order_id is not None and event.type.is_terminal)
            sent += len(events)
            if (limit is not None and sent >= limit) or (ended and len(events) < wanted):
                break  # the limit is reached, or all of the order up to its ending and after it is sent
            if len(events) < wanted:
                await feed.wait(stored, timeout=None if deadline is None else deadline - loop.time())
    except (asyncio.CancelledError, GeneratorExit):
        log.info("event stream closed: the client left", **context)
        raise
    if feed.stopping.is_set():
        log.info("event stream closed: the gateway is stopping", **context)


async def order_has_ended(
    actor: AnyRole, order_id: OrderIdPath, connections: ConnectionsDep, after: ResumeDep
) -> bool:
    """Whether the order has ended; 404 if unknown (or, to a customer, another's), 204 if all is sent."""
    of_order = col(AuditEvent.order_id) == order_id
    known = exists().where(of_order) | exists().where(col(Order.id) == order_id)
    ending = exists().where(of_order, col(AuditEvent.type).in_(TERMINAL_TYPES))
    async with connections.sessions() as session:
        is_known, ended = (await session.execute(select(known, ending))).one()
        if not is_known or not await readable_by(session, actor, order_id):
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                detail=f"order {order_id!r} is unknown: no events and no row in the orders table",
            )
        if ended and not await events_after(session, after or 0, 1, order_id):
            raise HTTPException(status.HTTP_204_NO_CONTENT)  # an EventSource stops reconnecting on a 204
    return bool(ended)


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
    responses={
        **AUTH_RESPONSES,
        **STREAM_LIMIT_RESPONSES,
        status.HTTP_204_NO_CONTENT: {
            "description": "The order has ended and nothing of it comes after `Last-Event-ID`: there "
            "is nothing more to stream (an `EventSource` stops reconnecting)."
        },
        status.HTTP_404_NOT_FOUND: json_error(
            "Neither the audit table nor the orders table knows the order (or, to a customer, it is "
            "another's)."
        ),
    },
)
async def order_event_stream(
    _slot: StreamSlot,
    order_id: OrderIdPath,
    after: ResumeDep,
    ended: Annotated[bool, Depends(order_has_ended)],
    feed: FeedDep,
    connections: ConnectionsDep,
) -> AsyncIterator[StreamedEvent]:
    async for event in follow(feed, connections, after or 0, order_id, ended):
        # the annotation documents the events' data; a ServerSentEvent is sent as it is
        yield event  # type: ignore[misc]


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
    if after is None:
        async with connections.sessions() as session:
            after = await newest_position(session)
    async for event in follow(feed, connections, after, limit=limit, timeout=timeout):
        yield event  # type: ignore[misc]  # as in order_event_stream


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
    return await session.scalar(select(func.max(col(AuditEvent.position)))) or 0
