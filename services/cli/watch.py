"""`orderflow watch`: follow one order through the gateway's stream of its events until it ends.

The stream sends the order's history, then each event as it is stored, and ends after its terminal
event; one lost on the way (the gateway restarted, say) is resumed with `Last-Event-ID`, so every
event is reported once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx

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


async def follow_order(
    gateway: Gateway,
    order_id: str,
    timeout: float,
    on_event: Callable[[RecordedEvent], None],
    on_note: Callable[[str], None],
) -> RecordedEvent | None:
    """Report the order's events as the gateway streams them; its terminal event, or None if it has
    not ended within `timeout` seconds. An unreachable gateway, or an answer other than the stream
    or 404 (the order may not be known yet), ends the command."""
    try:
        async with (
            asyncio.timeout(timeout),
            httpx.AsyncClient(
                base_url=gateway.base_url,
                headers=gateway.headers,
                timeout=httpx.Timeout(CONNECT_TIMEOUT_SECONDS, read=None),
            ) as client,
        ):
            return await follow_stream(client, order_id, on_event, on_note)
    except TimeoutError:
        return None


async def follow_stream(
    client: httpx.AsyncClient,
    order_id: str,
    on_event: Callable[[RecordedEvent], None],
    on_note: Callable[[str], None],
) -> RecordedEvent:
    path = order_path(order_id, "events/stream")
    last_event_id: str | None = None
    ending: RecordedEvent | None = None
    answered = told_unknown = False
    while ending is None:
        headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
        try:
            async with client.stream("GET", path, headers=headers) as response:
                answered = True
                if response.status_code == httpx.codes.NOT_FOUND:
                    if not told_unknown:
                        on_note(f"order {order_id} is not known yet; waiting for it")
                        told_unknown = True
                elif response.status_code != httpx.codes.OK:
                    await response.aread()
                    refused(response)
                else:
                    async for event_id, data in server_sent_events(response):
                        last_event_id = event_id
                        if data is not None:
                            event = contract_event(data)
                            on_event(event)
                            # read on: the stream ends after what was stored with the ending
                            ending = event if event.type.is_terminal else ending
                    if ending is None:
                        on_note("the stream ended before the order did (the gateway stopped?); resuming")
        except httpx.TransportError as error:
            if not answered:
                fail(f"cannot reach the gateway at {client.base_url}: {reason(error)}")
            on_note(f"lost the stream ({reason(error)}); resuming")
        if ending is None:
            await asyncio.sleep(RETRY_SECONDS)
    return ending


async def server_sent_events(response: httpx.Response) -> AsyncIterator[tuple[str | None, str | None]]:
    """The last event id and the data (None: the block only moved the id) of each block of a
    `text/event-stream` body that carries either, as the SSE standard reads them."""
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


def contract_event(data: str) -> RecordedEvent:
    """The event in a streamed event's data (which adds its audit `position`)."""
    fields = json.loads(data)
    fields.pop("position", None)
    return RecordedEvent.model_validate(fields)
