"""The workers' `publish_events` against a real RabbitMQ: a batch's confirms are awaited together,
its events still arrive in seq order, and any event the broker refuses fails the whole activity."""

from __future__ import annotations

from typing import Any

import pytest
from aio_pika.abc import AbstractQueue
from aio_pika.exceptions import DeliveryError
from aiormq.abc import FieldTable
from temporalio.testing import ActivityEnvironment

from services.workers.activities import BusinessActivities
from shared.contracts import EventType, OrderEvent
from testsupport.amqp import Broker, take_messages
from testsupport.orders import unique_id
from testsupport.read_model import event


async def publish_events(to: Broker, events: list[OrderEvent]) -> None:
    """As the workers' regular activity publishes a batch."""
    _, topology = to
    activities = BusinessActivities(None, topology, None, None, None)  # type: ignore[arg-type]
    await ActivityEnvironment().run(activities.publish_events, events)


async def events_tap(to: Broker, arguments: FieldTable) -> AbstractQueue:
    """A private queue (gone with the test's connection) that receives what `orders.events` does."""
    channel, topology = to
    queue = await channel.declare_queue(exclusive=True, arguments=arguments)
    await queue.bind(topology.events, routing_key="order.#")
    return queue


async def test_a_batch_awaits_its_confirms_together_and_arrives_in_seq_order(
    broker_channel: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    tap = await events_tap(broker_channel, {})
    lifecycle = [event(unique_id("ord"), seq, EventType.VALIDATED) for seq in range(1, 41)]
    exchange = broker_channel[1].events
    publish, waiting, most_waiting = exchange.publish, 0, 0

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal waiting, most_waiting
        waiting += 1
        most_waiting = max(most_waiting, waiting)
        try:
            return await publish(*args, **kwargs)
        finally:
            waiting -= 1

    monkeypatch.setattr(exchange, "publish", counted)
    await publish_events(broker_channel, lifecycle)

    assert most_waiting == len(lifecycle)  # none waited for its confirm before the next was sent
    ids = {str(one.event_id) for one in lifecycle}
    arrived = await take_messages(tap, lambda message: message.message_id in ids, len(lifecycle))
    assert [message.message_id for message in arrived] == [str(one.event_id) for one in lifecycle]


async def test_a_batch_fails_if_the_broker_refuses_any_of_its_events(broker_channel: Broker) -> None:
    # a queue that holds one event: the broker refuses (nacks) every later one routed to it
    tap = await events_tap(broker_channel, {"x-max-length": 1, "x-overflow": "reject-publish"})
    lifecycle = [event(unique_id("ord"), seq, EventType.VALIDATED) for seq in (1, 2, 3)]

    with pytest.raises(DeliveryError):
        await publish_events(broker_channel, lifecycle)

    kept = await take_messages(tap, lambda _: True)
    assert [message.message_id for message in kept] == [str(lifecycle[0].event_id)]
