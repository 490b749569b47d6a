"""`orderflow watch`: follow one order through the gateway's stream of its events until it ends,
resuming a lost stream with `Last-Event-ID`, so every event is printed once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import typer

from services.cli import render
from services.cli.errors import fail, reason
from services.cli.gateway import Gateway, order_path, refused
from shared.contracts import EventType, RecordedEvent

CONNECT_TIMEOUT_SECONDS = 5.0
RETRY_SECONDS = 0.5  # before asking again for an order not known yet, or resuming a lost stream
# how `orderflow watch` exits for each ending (and WATCH_TIMEOUT_EXIT_CODE when it gives up)
ENDING_EXIT_CODES = {
    EventType.COMPLETED: 0,
    EventType.CANCELLED: 3,
    EventType.FAILED: 4,
    EventType.TERMINATED: 5,
}


def note(text: str) -> None:
    typer.echo(text, err=True)


async def follow_order(gateway: Gateway, order_id: str, as_json: bool) -> RecordedEvent:
    """Print the order's events as the gateway streams them, until its terminal event."""
    path = order_path(order_id, "events/stream")
    timeout = httpx.Timeout(CONNECT_TIMEOUT_SECONDS, read=None)
    last_event_id: str | None = None
    ending: RecordedEvent | None = None
    answered = told_unknown = False
    while ending is None:
        headers = gateway.headers | ({"Last-Event-ID": last_event_id} if last_event_id is not None else {})
        try:
            async with (
                httpx.AsyncClient(base_url=gateway.base_url, headers=headers, timeout=timeout) as client,
                client.stream("GET", path) as response,
            ):
                answered = True
                if response.status_code == httpx.codes.NOT_FOUND:
                    if not told_unknown:
                        note(f"order {order_id} is not known yet; waiting for it")
                        told_unknown = True
                elif response.status_code != httpx.codes.OK:
                    await response.aread()
                    refused(response)
                else:
                    async for event_id, data in server_sent_events(response):
                        last_event_id = event_id
                        if data is not None:
                            event = printed(data, as_json)
                            # read on: the stream ends after what was stored with the ending
                            ending = event if event.type.is_terminal else ending
                    if ending is None:
                        note("the stream ended before the order did (the gateway stopped?); resuming")
        except httpx.TransportError as error:
            if not answered:
                fail(f"cannot reach the gateway at {gateway.base_url}: {reason(error)}")
            note(f"lost the stream ({reason(error)}); resuming")
        if ending is None:
            await asyncio.sleep(RETRY_SECONDS)
    return ending


async def server_sent_events(response: httpx.Response) -> AsyncIterator[tuple[str | None, str | None]]:
    """The last event id and data (None: only the id moved) of each `text/event-stream` block."""
    event_id: str | None = None
    data: list[str] = []
    has_id = False
    async for line in response.aiter_lines():
        if line:
            field, _, value = line.partition(":")  # a comment has an empty field name
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            elif field == "id":
                event_id, has_id = value, True
            continue
        if data or has_id:
            yield event_id, "\n".join(data) if data else None
        data, has_id = [], False


def printed(data: str, as_json: bool) -> RecordedEvent:
    """Print the event in a streamed event's data (less the audit `position` the stream adds)."""
    fields = json.loads(data)
    fields.pop("position", None)
    event = RecordedEvent.model_validate(fields)
    typer.echo(json.dumps(event.model_dump(mode="json")) if as_json else render.event(event))
    return event
