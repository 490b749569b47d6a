"""The gateway's event streams (`/orders/{id}/events/stream`, `/events/stream`) against a gateway
process and the real audit table: what they send, how they resume, when they end.

Events are stored as the audit consumer stores them (`record_events`, one transaction per batch);
the audit table's trigger numbers them and wakes the gateway's streams.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col

from services.api.schemas import StreamedEvent
from services.audit.projection import record_events
from services.cli.watch import server_sent_events
from shared.contracts import EventType, OrderState, Role
from shared.db import AuditEvent, transaction
from shared.settings import Settings
from testsupport.gateway import bearer, gateway_process
from testsupport.orders import example_event, unique_id
from testsupport.polling import eventually
from testsupport.read_model import insert_order

READ_TIMEOUT_SECONDS = 10.0
Block = tuple[str | None, str | None]
"""A block of an event stream: the last event id, and the data (None: the block only moved the id)."""
R, V, A = EventType.RECEIVED, EventType.VALIDATED, EventType.AWAITING_APPROVAL


async def store(
    sessions: async_sessionmaker[AsyncSession], order_id: str, *kinds: tuple[int, EventType]
) -> None:
    """Events of one order, stored in one transaction as the audit consumer stores a batch."""
    async with transaction(sessions) as session:
        for seq, event_type in kinds:
            await record_events(session, [example_event(order_id, seq, event_type)])


async def newest_position(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return await session.scalar(select(func.max(col(AuditEvent.position)))) or 0


class Stream:
    """An open event stream: its response, and its blocks read with a time limit."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._messages = server_sent_events(response)

    async def next(self) -> Block:
        return await asyncio.wait_for(anext(self._messages), READ_TIMEOUT_SECONDS)

    async def events(self, count: int) -> list[StreamedEvent]:
        """The next `count` events (blocks with data)."""
        found: list[StreamedEvent] = []
        while len(found) < count:
            event_id, data = await self.next()
            if data is not None:
                found.append(carried(event_id, data))
        return found

    async def rest(self) -> list[StreamedEvent]:
        """The events until the stream ends (which it must within the time limit)."""

        async def to_the_end() -> list[StreamedEvent]:
            return [carried(event_id, data) async for event_id, data in self._messages if data is not None]

        return await asyncio.wait_for(to_the_end(), READ_TIMEOUT_SECONDS)


def carried(event_id: str | None, data: str) -> StreamedEvent:
    """The event a block carries; its SSE id is its position."""
    event = StreamedEvent.model_validate_json(data)
    assert event_id == str(event.position)
    return event


@pytest.fixture(scope="module")
def reviewer(base_settings: Settings) -> dict[str, str]:
    """Who follows the streams here: a reviewer sees every order (test_authorization.py has the rest)."""
    return bearer(base_settings, "rita", Role.REVIEWER)


@asynccontextmanager
async def streaming(url: str, caller: dict[str, str], **request: Any) -> AsyncIterator[Stream]:
    async with (
        httpx.AsyncClient(headers=caller, timeout=httpx.Timeout(READ_TIMEOUT_SECONDS, read=None)) as client,
        client.stream("GET", url, **request) as response,
    ):
        yield Stream(response)


def kinds_of(events: list[StreamedEvent]) -> list[tuple[int, EventType]]:
    return [(event.seq, event.type) for event in events]


# --- positions ------------------------------------------------------------------------------------
async def test_positions_follow_the_order_of_commits(db_sessions: async_sessionmaker[AsyncSession]) -> None:
    first, second = unique_id("pos"), unique_id("pos")

    async with transaction(db_sessions) as session:
        await record_events(session, [example_event(first, 1, R)])  # its position drawn, not committed
        storing_second = asyncio.create_task(store(db_sessions, second, (1, R)))
        await asyncio.sleep(0.5)
        second_waited = not storing_second.done()
    await storing_second

    async with db_sessions() as session:
        rows = await session.execute(
            select(col(AuditEvent.order_id), col(AuditEvent.position)).where(
                col(AuditEvent.order_id).in_([first, second])
            )
        )
        positions = dict(rows.all())
    assert second_waited, "events were stored while an earlier transaction had not committed"
    first_position, second_position = positions[first], positions[second]
    assert first_position is not None and second_position is not None  # the table's trigger sets them
    assert first_position < second_position


# --- one order ------------------------------------------------------------------------------------
async def test_an_order_stream_sends_the_history_then_live_events_and_ends_with_the_order(
    gateway_url: str, db_sessions: async_sessionmaker[AsyncSession], reviewer: dict[str, str]
) -> None:
    order_id = unique_id("stream")
    await store(db_sessions, order_id, (1, R), (2, V))

    async with streaming(f"{gateway_url}/orders/{order_id}/events/stream", reviewer) as stream:
        assert stream.response.status_code == 200
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        start = await stream.next()
        history = await stream.events(2)
        await store(db_sessions, order_id, (3, A))
        live = await stream.events(1)
        # the ending and a command rejected right after it, stored in one batch
        await store(db_sessions, order_id, (4, EventType.CANCELLED), (0, EventType.COMMAND_REJECTED))
        rest = await stream.rest()

    assert start == ("0", None)
    assert kinds_of(history + live + rest) == [
        (1, R),
        (2, V),
        (3, A),
        (4, EventType.CANCELLED),
        (0, EventType.COMMAND_REJECTED),
    ]
    positions = [event.position for event in history + live + rest]
    assert positions == sorted(positions) and len(set(positions)) == 5
    assert {event.order_id for event in history + live + rest} == {order_id}


async def test_an_order_stream_resumes_right_after_the_last_event_id(
    gateway_url: str, db_sessions: async_sessionmaker[AsyncSession], reviewer: dict[str, str]
) -> None:
    order_id = unique_id("stream")
    await store(db_sessions, order_id, (1, R), (2, V), (3, EventType.COMPLETED))
    url = f"{gateway_url}/orders/{order_id}/events/stream"
    async with streaming(url, reviewer) as stream:
        first, second, _ = await stream.rest()

    async with streaming(url, reviewer, headers={"Last-Event-ID": str(first.position)}) as stream:
        after_first = await stream.rest()
    async with streaming(url, reviewer, params={"last_event_id": second.position}) as stream:
        after_second = await stream.rest()
    async with streaming(
        url, reviewer, headers={"Last-Event-ID": str(second.position)}, params={"last_event_id": 0}
    ) as stream:
        header_wins = await stream.rest()

    assert kinds_of(after_first) == [(2, V), (3, EventType.COMPLETED)]
    assert kinds_of(after_second) == kinds_of(header_wins) == [(3, EventType.COMPLETED)]


async def test_an_ended_order_with_nothing_after_the_last_event_id_is_204(
    gateway_url: str, db_sessions: async_sessionmaker[AsyncSession], reviewer: dict[str, str]
) -> None:
    order_id = unique_id("stream")
    await store(db_sessions, order_id, (1, R), (2, EventType.FAILED))
    async with streaming(f"{gateway_url}/orders/{order_id}/events/stream", reviewer) as stream:
        *_, ending = await stream.rest()

    async with httpx.AsyncClient(headers=reviewer) as client:
        response = await client.get(
            f"{gateway_url}/orders/{order_id}/events/stream", headers={"Last-Event-ID": str(ending.position)}
        )

    assert response.status_code == 204  # an EventSource stops reconnecting
    assert response.content == b""


async def test_an_order_stream_of_an_unknown_order_is_404(gateway_url: str, reviewer: dict[str, str]) -> None:
    async with httpx.AsyncClient(headers=reviewer) as client:
        response = await client.get(f"{gateway_url}/orders/never-placed/events/stream")

    assert response.status_code == 404
    assert "never-placed" in response.json()["detail"]


async def test_an_order_stream_waits_for_an_order_that_has_no_events_yet(
    gateway_url: str, db_sessions: async_sessionmaker[AsyncSession], reviewer: dict[str, str]
) -> None:
    order_id = unique_id("stream")
    await insert_order(db_sessions, order_id, OrderState.QUEUED)

    async with streaming(f"{gateway_url}/orders/{order_id}/events/stream", reviewer) as stream:
        await stream.next()  # its starting point: the stream is open
        await store(db_sessions, order_id, (1, EventType.QUEUED))
        [queued] = await stream.events(1)

    assert (queued.order_id, queued.type) == (order_id, EventType.QUEUED)


# --- every order ----------------------------------------------------------------------------------
async def test_the_stream_of_every_order_starts_now_and_follows_them_all(
    gateway_url: str, db_sessions: async_sessionmaker[AsyncSession], reviewer: dict[str, str]
) -> None:
    one, other = unique_id("all"), unique_id("all")
    await store(db_sessions, one, (1, R))  # before the stream: not sent

    async with streaming(f"{gateway_url}/events/stream", reviewer) as stream:
        start = await stream.next()
        newest = await newest_position(db_sessions)
        await store(db_sessions, one, (2, V))
        await store(db_sessions, other, (1, R))
        events = await stream.events(2)

    assert start == (str(newest), None)
    assert [(event.order_id, event.seq) for event in events] == [(one, 2), (other, 1)]


async def test_the_stream_of_every_order_resumes_exactly_and_ends_at_its_limit(
    gateway_url: str, db_sessions: async_sessionmaker[AsyncSession], reviewer: dict[str, str]
) -> None:
    order_id = unique_id("all")
    before = await newest_position(db_sessions)
    await store(db_sessions, order_id, (1, R), (2, V), (3, A))

    async with streaming(
        f"{gateway_url}/events/stream", reviewer, params={"last_event_id": before, "limit": 2}
    ) as stream:
        first_two = await stream.rest()
    async with streaming(
        f"{gateway_url}/events/stream",
        reviewer,
        headers={"Last-Event-ID": str(first_two[-1].position)},
        params={"limit": 1},
    ) as stream:
        third = await stream.rest()

    assert kinds_of(first_two) == [(1, R), (2, V)]
    assert kinds_of(third) == [(3, A)]
    assert third[0].order_id == order_id


async def test_a_quiet_stream_ends_at_its_timeout(gateway_url: str, reviewer: dict[str, str]) -> None:
    started = time.monotonic()
    async with streaming(f"{gateway_url}/events/stream", reviewer, params={"timeout": 1}) as stream:
        events = await stream.rest()

    assert events == []
    assert 1.0 <= time.monotonic() - started < 5.0


# --- the client and the server leaving ------------------------------------------------------------
async def test_a_client_that_leaves_is_let_go(
    settings: Settings,
    db_sessions: async_sessionmaker[AsyncSession],
    tmp_path: Path,
    reviewer: dict[str, str],
) -> None:
    log = tmp_path / "gateway.log"
    with gateway_process(settings, log) as url:
        async with streaming(f"{url}/events/stream", reviewer) as stream:
            await stream.next()  # open, and waiting for events

        async def let_go() -> bool:
            return "event stream closed: the client left" in log.read_text()

        await eventually(let_go, timeout=5)


async def test_a_stopping_gateway_ends_its_streams_at_once(
    settings: Settings,
    db_sessions: async_sessionmaker[AsyncSession],
    tmp_path: Path,
    reviewer: dict[str, str],
) -> None:
    order_id = unique_id("stop")
    await store(db_sessions, order_id, (1, R))

    with ExitStack() as gateway:
        url = gateway.enter_context(gateway_process(settings, tmp_path / "gateway.log"))
        async with streaming(f"{url}/orders/{order_id}/events/stream", reviewer) as stream:
            await stream.next()  # open
            stopping = time.monotonic()
            await asyncio.to_thread(gateway.close)  # SIGTERM, then wait until the gateway has exited
            stop_seconds = time.monotonic() - stopping
            events = await stream.rest()  # a stream cut off instead of ended would raise here

    assert kinds_of(events) == [(1, R)]
    assert stop_seconds < 5.0  # `make run` and the e2e tests give a service 10 s, then kill it
