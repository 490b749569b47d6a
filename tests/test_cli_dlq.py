"""`orderflow dlq list | show | replay` against the real RabbitMQ, in the test session's vhost.

Dead letters are made the way the services make them: by `shared.broker.dead_letter` on a message
taken from a queue, or by a real `QueueConsumer` giving up on what it received. Each test starts
with an empty dead-letter queue and has a queue of its own on `orders.commands`, under a routing key
that nothing else uses, for the messages to come from and be replayed to.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, HeadersType
from typer.testing import CliRunner, Result

from services.cli.main import app
from shared import broker
from shared.consuming import QueueConsumer
from shared.contracts import command_adapter
from shared.settings import Settings
from testsupport.amqp import drain, publish_raw
from testsupport.gateway import closed_port
from testsupport.orders import place_order
from testsupport.polling import eventually

LONG_ERROR = "1 validation error for PlaceOrder\npayload.items\n  " + "Field required " * 10

runner = CliRunner()


@dataclass(frozen=True)
class Origin:
    """Where the test's messages are first published, the queue that receives them, and the
    dead-letter queue."""

    topology: broker.Topology
    routing_key: str
    queue: AbstractQueue
    dead_letters: AbstractQueue


@pytest_asyncio.fixture
async def origin(base_settings: Settings) -> AsyncIterator[Origin]:
    connection = await broker.connect(base_settings, "tests-dlq")
    try:
        channel, topology = await broker.open_channel(connection)
        dead_letters = await channel.get_queue(broker.DEAD_LETTER_QUEUE)
        await dead_letters.purge()  # what earlier tests left there is not this test's business
        routing_key = f"test.dlq.{uuid4().hex[:12]}"
        queue = await broker.declare_consumer_queue(
            channel, topology.commands, broker.ConsumerQueue(routing_key, (routing_key,))
        )
        yield Origin(topology, routing_key, queue, dead_letters)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


async def orderflow(settings: Settings, *args: str, input: str | None = None) -> Result:
    """`orderflow ...` in a thread (it runs an event loop of its own) on the test's broker."""
    env = {"ORDERFLOW_AMQP_URL": settings.amqp_url}
    result: Result = await asyncio.to_thread(runner.invoke, app, list(args), env=env, input=input)
    return result


async def dlq(settings: Settings, *args: str, input: str | None = None) -> Result:
    return await orderflow(settings, "dlq", *args, input=input)


async def publish_as_client(origin: Origin, body: bytes) -> str:
    """Publish to `orders.commands` as a client would, with properties of its own; the message id."""
    return await publish_raw(
        origin.topology.commands,
        origin.routing_key,
        body,
        user_id=None,
        message_type="PlaceOrder",
        correlation_id="corr-1",
        headers={"x-client": "kept"},
    )


async def dead_letter(
    origin: Origin,
    body: bytes = b'{"type": "PlaceOrder"}',
    *,
    consumer: str = "bridge",
    reason: str = "schema_invalid",
    error: str = LONG_ERROR,
) -> str:
    """Publish a message, take it from its queue and dead-letter it as a consumer does."""
    message_id = await publish_as_client(origin, body)
    message = await origin.queue.get(no_ack=False, timeout=5)
    assert message is not None and message.message_id == message_id
    await broker.dead_letter(origin.topology, message, consumer=consumer, reason=reason, error=error)
    return message_id


async def dead_letter_without_exchange(origin: Origin, routing_key: str) -> str:
    """A dead letter as orderflow made them before it kept the exchange it came from."""
    message_id = str(uuid4())
    headers: HeadersType = {
        broker.REASON_HEADER: "processing_failed",
        broker.ERROR_HEADER: "RuntimeError()",
        broker.CONSUMER_HEADER: "audit",
        broker.DELIVERIES_HEADER: 5,
    }
    await origin.topology.dead_letter.publish(
        aio_pika.Message(body=b"{}", message_id=message_id, headers=headers), routing_key=routing_key
    )
    return message_id


async def ids_waiting(queue: AbstractQueue) -> list[str | None]:
    """The message ids in the queue, in queue order (the messages are taken for good)."""
    return [message.message_id for message in await drain(queue)]


def listed_ids(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [item["message_id"] for item in json.loads(result.stdout)]


def succeeded(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def failed(result: Result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


# --- help and usage -------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["list"], ["show"], ["replay"]])
def test_every_dlq_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, ["dlq", *command, "--help"])

    assert result.exit_code == 0, result.output
    assert "Usage: orderflow dlq" in result.stdout


@pytest.mark.parametrize("arguments", [[], ["some-id", "--all"], ["some-id", "--reason", "invalid_json"]])
def test_replay_wants_message_ids_or_all(arguments: list[str]) -> None:
    result = runner.invoke(app, ["dlq", "replay", *arguments])

    assert result.exit_code == 2
    assert "--all" in result.output


# --- list -----------------------------------------------------------------------------------------
async def test_list_shows_dead_letters_oldest_first(base_settings: Settings, origin: Origin) -> None:
    first = await dead_letter(origin, consumer="bridge", reason="schema_invalid")
    second = await dead_letter(origin, b"not json", consumer="bridge", reason="invalid_json", error="bad")
    third = await dead_letter(origin, consumer="audit", reason="processing_failed", error="RuntimeError()")

    result = succeeded(await dlq(base_settings, "list"))

    header, *rows = result.stdout.splitlines()
    assert header.split() == ["MESSAGE", "ID", "CONSUMER", "REASON", "DELIVERIES", "ROUTING", "KEY", "ERROR"]
    assert [row.split()[:5] for row in rows] == [
        [first, "bridge", "schema_invalid", "1", origin.routing_key],
        [second, "bridge", "invalid_json", "1", origin.routing_key],
        [third, "audit", "processing_failed", "1", origin.routing_key],
    ]
    # the error on one line and shortened
    assert rows[0].endswith("1 validation error for PlaceOrder payload.items Field req...")


async def test_listing_leaves_the_queue_as_it_was(base_settings: Settings, origin: Origin) -> None:
    made = [await dead_letter(origin, consumer=f"consumer-{n}") for n in range(5)]

    # several listings, partial ones too: a quorum queue puts a requeued message behind those still
    # waiting, so a listing that gave back only some would reorder the queue
    for arguments in [[], ["--limit", "2"], ["--consumer", "consumer-3"], ["--json"], []]:
        succeeded(await dlq(base_settings, "list", *arguments))
    succeeded(await dlq(base_settings, "show", made[2]))

    assert await ids_waiting(origin.dead_letters) == made


async def test_list_limit_shows_the_oldest_and_says_how_many_more(
    base_settings: Settings, origin: Origin
) -> None:
    made = [await dead_letter(origin) for _ in range(3)]

    result = succeeded(await dlq(base_settings, "list", "--limit", "2", "--json"))

    assert listed_ids(result) == made[:2]
    assert "1 more not shown" in result.stderr


async def test_listing_reads_no_further_than_its_limit_however_often(
    base_settings: Settings, origin: Origin
) -> None:
    made = [await dead_letter(origin) for _ in range(5)]

    # more listings than the delivery limit of a quorum queue on RabbitMQ 4.0-4.2 (20 by default)
    for _ in range(25):
        assert listed_ids(await dlq(base_settings, "list", "--limit", "2", "--json")) == made[:2]

    waiting = await drain(origin.dead_letters)
    assert [message.message_id for message in waiting] == made
    # only the two listed were ever taken, and taking them counted no delivery
    assert [message.redelivered for message in waiting] == [True, True, False, False, False]
    never_taken = waiting[-1].headers.get("x-delivery-count")
    assert [message.headers.get("x-delivery-count") for message in waiting] == [never_taken] * 5


async def test_list_filters_by_reason_and_consumer(base_settings: Settings, origin: Origin) -> None:
    bridge_invalid = await dead_letter(origin, consumer="bridge", reason="invalid_json")
    await dead_letter(origin, consumer="bridge", reason="schema_invalid")
    audit_invalid = await dead_letter(origin, consumer="audit", reason="invalid_json")

    by_reason = await dlq(base_settings, "list", "--reason", "invalid_json", "--json")
    by_both = await dlq(base_settings, "list", "--reason", "invalid_json", "--consumer", "audit", "--json")
    by_nothing = succeeded(await dlq(base_settings, "list", "--consumer", "nobody"))

    limited = await dlq(base_settings, "list", "--reason", "invalid_json", "--limit", "1", "--json")

    assert listed_ids(by_reason) == [bridge_invalid, audit_invalid]
    assert listed_ids(by_both) == [audit_invalid]
    assert by_nothing.stdout.strip() == "no dead letters"
    # those behind the first match were not searched
    assert listed_ids(limited) == [bridge_invalid]
    assert "2 more not searched (--limit)" in limited.stderr


async def test_list_json_carries_each_dead_letters_diagnosis(base_settings: Settings, origin: Origin) -> None:
    message_id = await dead_letter(origin, consumer="bridge", reason="schema_invalid")

    [item] = json.loads(succeeded(await dlq(base_settings, "list", "--json")).stdout)

    assert item == {
        "message_id": message_id,
        "consumer": "bridge",
        "reason": "schema_invalid",
        "deliveries": 1,
        "exchange": broker.COMMANDS_EXCHANGE,
        "routing_key": origin.routing_key,
        "error": LONG_ERROR,
    }


# --- show -----------------------------------------------------------------------------------------
async def test_show_prints_the_whole_error_and_the_body_pretty(
    base_settings: Settings, origin: Origin
) -> None:
    message_id = await dead_letter(origin, b'{"type": "PlaceOrder", "order_id": "A-1"}')

    result = succeeded(await dlq(base_settings, "show", message_id))

    text = result.stdout
    assert text.startswith(f"dead letter {message_id}\n")
    for label, value in [
        ("reason", "schema_invalid"),
        ("consumer", "bridge"),
        ("deliveries", "1"),
        ("exchange", broker.COMMANDS_EXCHANGE),
        ("routing key", origin.routing_key),
        ("type", "PlaceOrder"),
    ]:
        assert f"  {label:<12} {value}\n" in text
    assert '"x-client": "kept"' in text
    assert "\n".join(f"    {line}" for line in LONG_ERROR.splitlines()) in text
    assert '  body\n    {\n      "type": "PlaceOrder",\n      "order_id": "A-1"\n    }' in text


async def test_show_json_has_the_headers_and_a_body_that_is_not_json_as_bytes(
    base_settings: Settings, origin: Origin
) -> None:
    message_id = await dead_letter(origin, b"\xffnot json", reason="invalid_json", error="Invalid JSON")

    item = json.loads(succeeded(await dlq(base_settings, "show", message_id, "--json")).stdout)

    assert (item["reason"], item["error"], item["consumer"]) == ("invalid_json", "Invalid JSON", "bridge")
    assert (item["exchange"], item["routing_key"]) == (broker.COMMANDS_EXCHANGE, origin.routing_key)
    assert (item["content_type"], item["type"], item["correlation_id"]) == (
        "application/json",
        "PlaceOrder",
        "corr-1",
    )
    assert item["headers"][broker.EXCHANGE_HEADER] == broker.COMMANDS_EXCHANGE
    assert item["headers"]["x-client"] == "kept"
    assert (item["body_is_json"], item["body"]) == (False, repr(b"\xffnot json"))


# --- replay ---------------------------------------------------------------------------------------
async def test_replay_sends_a_dead_letter_back_to_its_exchange_and_removes_it(
    base_settings: Settings, origin: Origin
) -> None:
    body = b'{"type": "PlaceOrder", "order_id": "A-2"}'
    replayed_id = await dead_letter(origin, body)
    kept_id = await dead_letter(origin)

    result = succeeded(await dlq(base_settings, "replay", replayed_id))

    assert result.stdout.strip() == (
        f"replayed {replayed_id} to {broker.COMMANDS_EXCHANGE} with routing key {origin.routing_key}"
    )
    [message] = await drain(origin.queue)
    assert (message.message_id, message.body, message.routing_key, message.exchange) == (
        replayed_id,
        body,
        origin.routing_key,
        broker.COMMANDS_EXCHANGE,
    )
    assert (message.content_type, message.type, message.correlation_id) == (
        "application/json",
        "PlaceOrder",
        "corr-1",
    )
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    # the publisher's headers, without the diagnosis or a delivery count from before
    headers = dict(message.headers)
    assert headers.pop("x-delivery-count", 0) == 0
    assert headers == {"x-client": "kept"}
    assert await ids_waiting(origin.dead_letters) == [kept_id]


async def test_replay_of_several_ids_keeps_the_rest_in_order(base_settings: Settings, origin: Origin) -> None:
    made = [await dead_letter(origin) for _ in range(5)]

    result = succeeded(await dlq(base_settings, "replay", made[3], made[1], "--json"))

    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"message_id": made[n], "exchange": broker.COMMANDS_EXCHANGE, "routing_key": origin.routing_key}
        for n in (1, 3)
    ]
    assert await ids_waiting(origin.queue) == [made[1], made[3]]
    assert await ids_waiting(origin.dead_letters) == [made[0], made[2], made[4]]


async def test_replay_all_asks_first(base_settings: Settings, origin: Origin) -> None:
    made = [await dead_letter(origin) for _ in range(2)]

    declined = await dlq(base_settings, "replay", "--all", input="n\n")
    assert declined.exit_code == 1
    assert "Replay 2 dead letter(s)" in declined.output
    assert await ids_waiting(origin.queue) == []

    succeeded(await dlq(base_settings, "replay", "--all", input="y\n"))
    assert await ids_waiting(origin.queue) == made
    assert await ids_waiting(origin.dead_letters) == []


async def test_replay_all_with_filters_and_yes(base_settings: Settings, origin: Origin) -> None:
    audit_failed = await dead_letter(origin, consumer="audit", reason="processing_failed")
    bridge_failed = await dead_letter(origin, consumer="bridge", reason="processing_failed")
    audit_invalid = await dead_letter(origin, consumer="audit", reason="invalid_json")

    result = succeeded(
        await dlq(
            base_settings, "replay", "--all", "--reason", "processing_failed", "--consumer", "audit", "--yes"
        )
    )

    assert result.stdout.count("replayed ") == 1
    assert await ids_waiting(origin.queue) == [audit_failed]
    assert await ids_waiting(origin.dead_letters) == [bridge_failed, audit_invalid]


async def test_a_dead_letter_that_does_not_say_its_exchange_needs_one_named(
    base_settings: Settings, origin: Origin
) -> None:
    old = await dead_letter_without_exchange(origin, origin.routing_key)

    refused = await dlq(base_settings, "replay", old)
    failed(refused, f"dead letter {old} does not say which exchange it came from")
    failed(refused, "--exchange")

    succeeded(await dlq(base_settings, "replay", old, "--exchange", broker.COMMANDS_EXCHANGE))
    assert await ids_waiting(origin.queue) == [old]
    assert await ids_waiting(origin.dead_letters) == []


async def test_replay_refuses_all_when_one_cannot_go(base_settings: Settings, origin: Origin) -> None:
    made = await dead_letter(origin)
    old = await dead_letter_without_exchange(origin, origin.routing_key)

    failed(await dlq(base_settings, "replay", "--all", "--yes"), f"dead letter {old} does not say")

    assert await ids_waiting(origin.queue) == []
    assert await ids_waiting(origin.dead_letters) == [made, old]


async def test_replay_to_an_exchange_that_does_not_exist_replays_nothing(
    base_settings: Settings, origin: Origin
) -> None:
    made = [await dead_letter(origin) for _ in range(2)]
    old = await dead_letter_without_exchange(origin, origin.routing_key)

    result = await dlq(base_settings, "replay", "--all", "--yes", "--exchange", "no.such.exchange")

    failed(result, "there is no exchange 'no.such.exchange'")
    assert await ids_waiting(origin.dead_letters) == [*made, old]


async def test_replay_stops_at_a_dead_letter_no_queue_takes(base_settings: Settings, origin: Origin) -> None:
    routed = await dead_letter(origin)
    unroutable = await dead_letter_without_exchange(origin, "test.dlq.nobody")
    after = await dead_letter(origin)

    result = await dlq(
        base_settings, "replay", routed, unroutable, after, "--exchange", broker.COMMANDS_EXCHANGE
    )

    failed(result, f"routes 'test.dlq.nobody' to no queue: dead letter {unroutable} and those after it stay")
    assert f"replayed {routed}" in result.stdout
    assert await ids_waiting(origin.dead_letters) == [unroutable, after]


# --- errors ---------------------------------------------------------------------------------------
async def test_an_unknown_message_id_is_an_error(base_settings: Settings, origin: Origin) -> None:
    made = await dead_letter(origin)

    unknown = "no dead letter has the message id no-such-id"
    failed(await dlq(base_settings, "show", "no-such-id"), unknown)
    failed(await dlq(base_settings, "replay", made, "no-such-id"), unknown)

    assert await ids_waiting(origin.queue) == []  # nothing was replayed
    assert await ids_waiting(origin.dead_letters) == [made]


async def test_replay_of_nothing_that_matches_is_an_error(base_settings: Settings, origin: Origin) -> None:
    await dead_letter(origin, reason="schema_invalid")

    for confirmation in (["--yes"], []):
        result = await dlq(base_settings, "replay", "--all", "--reason", "invalid_json", *confirmation)
        failed(result, "no dead letter matches")


@pytest.mark.parametrize("command", [["list"], ["show", "some-id"], ["replay", "--all", "--yes"]])
async def test_an_unreachable_broker_is_a_clear_error(base_settings: Settings, command: list[str]) -> None:
    amqp_url = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    unreachable = base_settings.model_copy(update={"amqp_url": amqp_url})

    failed(await dlq(unreachable, *command), "cannot reach RabbitMQ at amqp://guest@127.0.0.1:")


# --- the consumers' own dead letters ----------------------------------------------------------------
async def test_what_a_consumer_gave_up_on_can_be_listed_and_replayed(
    base_settings: Settings, origin: Origin
) -> None:
    async def always_fail(message: AbstractIncomingMessage, command: Any) -> None:
        raise RuntimeError("the handler keeps failing")

    stop = asyncio.Event()
    consumer = QueueConsumer("test-consumer", origin.topology, 2, stop)
    consuming = asyncio.create_task(consumer.run(origin.queue, command_adapter.validate_json, always_fail))
    try:
        not_json = await publish_as_client(origin, b"not json")
        not_a_command = await publish_as_client(origin, b'{"type": "PlaceOrder"}')
        valid = await publish_as_client(origin, PLACE_ORDER)
        await eventually(lambda: holds(origin.dead_letters, 3))
    finally:
        stop.set()
        await consuming

    result = await dlq(base_settings, "list", "--json")
    reasons = {item["message_id"]: (item["reason"], item["consumer"]) for item in json.loads(result.stdout)}
    assert reasons == {
        not_json: ("invalid_json", "test-consumer"),
        not_a_command: ("schema_invalid", "test-consumer"),
        valid: ("processing_failed", "test-consumer"),
    }
    succeeded(await dlq(base_settings, "replay", valid))
    [replayed] = await drain(origin.queue)
    assert replayed.body == PLACE_ORDER
    assert replayed.headers.get("x-delivery-count", 0) == 0  # its consumer counts from the start again
    assert Counter(await ids_waiting(origin.dead_letters)) == Counter([not_json, not_a_command])


PLACE_ORDER = place_order("A-dlq").model_dump_json().encode()


async def holds(queue: AbstractQueue, count: int) -> bool:
    declared = await queue.declare()
    return declared.message_count == count
