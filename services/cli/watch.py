"""`orderflow watch`: follow one order's events on the `orders.events` exchange until it ends.

The queue is bound first and the audit history read second, so an event published in between is
seen twice rather than missed; `event_id` tells the copies apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from uuid import UUID

from aio_pika.abc import AbstractQueue, AbstractRobustConnection
from pydantic import ValidationError

from shared import broker
from shared.contracts import OrderEvent
from shared.settings import Settings

ALL_ORDER_EVENTS = "order.#"


async def follow_order(
    settings: Settings,
    order_id: str,
    timeout: float,
    on_event: Callable[[OrderEvent], None],
    on_listening: Callable[[], None],
    history: Callable[[], list[OrderEvent]],
) -> OrderEvent | None:
    """Report the order's events so far, then as they arrive, each once; returns its terminal
    event, or None on timeout."""
    seen: set[UUID] = set()

    def report_new(event: OrderEvent) -> None:
        if event.event_id not in seen:
            seen.add(event.event_id)
            on_event(event)

    connection = await broker.connect(settings, "orderflow-cli-watch")
    async with connection:
        queue = await bind_private_queue(connection)
        on_listening()
        for event in await asyncio.to_thread(history):
            report_new(event)
            if event.type.is_terminal:
                return event
        try:
            async with asyncio.timeout(timeout):
                return await terminal_event(queue, order_id, report_new)
        except TimeoutError:
            return None


async def bind_private_queue(connection: AbstractRobustConnection) -> AbstractQueue:
    """A queue of our own that the broker deletes when we disconnect."""
    channel = await connection.channel()
    topology = await broker.declare_topology(channel)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(topology.events, routing_key=ALL_ORDER_EVENTS)
    return queue


async def terminal_event(
    queue: AbstractQueue, order_id: str, on_event: Callable[[OrderEvent], None]
) -> OrderEvent | None:
    async with queue.iterator(no_ack=True) as messages:  # a private, throw-away copy: nothing to ack
        async for message in messages:
            try:
                event = OrderEvent.model_validate_json(message.body)
            except ValidationError:
                continue  # not an event of the contract; the audit consumer dead-letters those
            if event.order_id != order_id:
                continue
            on_event(event)
            if event.type.is_terminal:
                return event
    return None
