"""The consumers' redelivery rule, against a real RabbitMQ quorum queue: a message that keeps
failing is requeued with `basic.reject`, the broker's delivery count grows with each return, and
the dead-letter queue takes it once the count reaches the limit."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from shared import broker
from shared.consuming import QueueConsumer
from testsupport.amqp import dead_letter_of, verdict
from testsupport.polling import eventually

MAX_DELIVERIES = 4


async def test_a_failing_message_is_rejected_until_its_delivery_count_sends_it_to_the_dead_letter_queue(
    broker_channel: tuple[AbstractChannel, broker.Topology],
    dead_letters: AbstractQueue,
) -> None:
    channel, topology = broker_channel
    redelivery = broker.ConsumerQueue(f"test.redelivery.{uuid4().hex[:8]}", routing_keys=())
    queue = await broker.declare_consumer_queue(channel, topology.commands, redelivery)
    message_id = await _publish(channel, queue)
    seen_counts: list[int] = []

    async def always_fail(message: AbstractIncomingMessage, body: bytes) -> None:
        seen_counts.append(broker.delivery_count(message))
        raise RuntimeError("handler keeps failing")

    stop = asyncio.Event()
    consumer = QueueConsumer("test", topology, MAX_DELIVERIES, stop)
    consuming = asyncio.create_task(consumer.run(queue, lambda body: body, always_fail))
    try:
        dead = await dead_letter_of(dead_letters, message_id)
    finally:
        stop.set()
        await consuming
        await queue.delete(if_unused=False, if_empty=False)

    # the broker counted every return: 0, 1, 2, 3 deliveries before, then the consumer gave up
    assert seen_counts == list(range(MAX_DELIVERIES))
    assert verdict(dead) == ("processing_failed", "test")
    assert dead.headers[broker.DELIVERIES_HEADER] == MAX_DELIVERIES
    assert await eventually(lambda: _is_empty(queue))


async def _publish(channel: AbstractChannel, queue: AbstractQueue) -> str:
    message_id = str(uuid4())
    await channel.default_exchange.publish(
        aio_pika.Message(body=b"{}", message_id=message_id), routing_key=queue.name
    )
    return message_id


async def _is_empty(queue: AbstractQueue) -> bool:
    declared = await queue.declare()
    return declared.message_count == 0
