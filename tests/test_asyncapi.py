"""The committed AsyncAPI document is the one the models generate, and it states the contract."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from shared.asyncapi import build_asyncapi, to_json
from shared.broker import (
    COMMANDS_EXCHANGE,
    CONSUMER_HEADER,
    DEAD_LETTER_QUEUE,
    DELIVERIES_HEADER,
    ERROR_HEADER,
    EVENTS_EXCHANGE,
    EXCHANGE_HEADER,
    REASON_HEADER,
)
from shared.contracts import (
    COMMAND_ROUTING_KEYS,
    EVENT_DATA,
    MAX_ITEMS,
    MAX_QTY,
    CommandType,
    EventType,
    Identifier,
    OrderItem,
)

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.json"
REGENERATE = "python -m shared.asyncapi > docs/asyncapi.json"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_asyncapi()


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """Follow a local `$ref` (a JSON pointer into the document)."""
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def exchange_of(doc: dict[str, Any], channel: dict[str, Any]) -> dict[str, Any]:
    exchange: dict[str, Any] = resolve(doc, channel["bindings"]["$ref"])["amqp"]["exchange"]
    return exchange


def message_of(doc: dict[str, Any], channel: dict[str, Any]) -> dict[str, Any]:
    (ref,) = [message["$ref"] for message in channel["messages"].values()]
    message: dict[str, Any] = resolve(doc, ref)
    return message


def test_committed_document_is_up_to_date(doc: dict[str, Any]) -> None:
    assert DOC_PATH.read_text() == to_json(doc), (
        f"docs/asyncapi.json is out of date with shared/contracts.py; regenerate it: {REGENERATE}"
    )


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [ref for value in node.values() for ref in refs(value)]
        if isinstance(node, list):
            return [ref for value in node for ref in refs(value)]
        return []

    for ref in refs(doc):
        assert resolve(doc, ref) is not None, ref


@pytest.mark.parametrize("command", list(CommandType))
def test_each_command_has_its_routing_key_on_the_commands_exchange(
    doc: dict[str, Any], command: CommandType
) -> None:
    key = COMMAND_ROUTING_KEYS[command]
    channel = doc["channels"][key]
    assert channel["address"] == key
    assert exchange_of(doc, channel) == {
        "name": COMMANDS_EXCHANGE,
        "type": "topic",
        "durable": True,
        "autoDelete": False,
        "vhost": "/",
    }
    message = message_of(doc, channel)
    assert message["bindings"]["amqp"]["messageType"] == command.value
    schema = resolve(doc, message["payload"]["$ref"])
    assert schema["properties"]["type"]["const"] == command.value
    assert {"command_id", "type", "order_id", "issued_at"} <= set(schema["required"])

    operation = doc["operations"][f"send.{key}"]
    assert operation["action"] == "send"
    assert resolve(doc, operation["bindings"]["$ref"])["amqp"]["deliveryMode"] == 2


@pytest.mark.parametrize("event", list(EventType))
def test_each_event_has_its_routing_key_on_the_events_exchange(doc: dict[str, Any], event: EventType) -> None:
    channel = doc["channels"][event.routing_key]
    assert channel["address"] == f"order.{event.value}"
    assert exchange_of(doc, channel)["name"] == EVENTS_EXCHANGE
    envelope, narrowed = message_of(doc, channel)["payload"]["allOf"]
    assert envelope == {"$ref": "#/components/schemas/OrderEvent"}
    assert narrowed["properties"]["type"]["const"] == event.value
    assert doc["operations"][f"receive.{event.routing_key}"]["action"] == "receive"


@pytest.mark.parametrize("event", list(EventType))
def test_each_event_states_its_payload_model(doc: dict[str, Any], event: EventType) -> None:
    model = EVENT_DATA[event]  # every event type has its payload model
    assert model.event_type is event
    _, narrowed = message_of(doc, doc["channels"][event.routing_key])["payload"]["allOf"]
    data = resolve(doc, narrowed["properties"]["data"]["$ref"])
    assert data["title"] == model.__name__
    assert set(data.get("properties", {})) == set(model.model_fields)
    assert data["additionalProperties"] is False


def test_event_semantics_are_documented(doc: dict[str, Any]) -> None:
    description = doc["components"]["messageTraits"]["event"]["description"]
    assert "no gaps" in description
    assert "`seq` 0" in description
    assert "may arrive twice" in description
    assert doc["components"]["schemas"]["OrderEvent"]["properties"]["seq"]["minimum"] == 0


def test_schemas_carry_the_bounds(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    items = schemas["PlaceOrderPayload"]["properties"]["items"]
    assert (items["minItems"], items["maxItems"]) == (1, MAX_ITEMS)
    assert schemas["OrderItem"]["properties"]["qty"]["maximum"] == MAX_QTY

    identifier = TypeAdapter(Identifier).json_schema()
    for schema, field in [
        ("PlaceOrder", "order_id"),
        ("PlaceOrderPayload", "payment_id"),
        ("OrderItem", "sku"),
        ("OrderEvent", "order_id"),
    ]:
        prop = schemas[schema]["properties"][field]
        assert prop["pattern"] == identifier["pattern"] == r"^[A-Za-z0-9._-]+$"
        assert (prop["minLength"], prop["maxLength"]) == (1, 64)
    assert schemas["Address"]["properties"]["country"]["pattern"] == "^[A-Z]{2}$"


def test_dead_letter_queue_and_its_headers(doc: dict[str, Any]) -> None:
    channel = doc["channels"][DEAD_LETTER_QUEUE]
    queue = resolve(doc, channel["bindings"]["$ref"])["amqp"]["queue"]
    assert queue["name"] == DEAD_LETTER_QUEUE and queue["durable"]
    headers = resolve(doc, message_of(doc, channel)["headers"]["$ref"])
    assert set(headers["required"]) == {
        REASON_HEADER,
        ERROR_HEADER,
        CONSUMER_HEADER,
        DELIVERIES_HEADER,
    }
    # older dead letters lack it, so it is documented but not required
    assert EXCHANGE_HEADER in headers["properties"]


@pytest.mark.parametrize(
    ("qty", "accepted"), [(2, True), (2.0, True), (True, False), ("2", False), (2.5, False)]
)
def test_an_item_quantity_is_a_json_integer_as_documented(qty: object, accepted: bool) -> None:
    body = {"sku": "BOOK-1", "qty": qty}
    if accepted:
        assert OrderItem.model_validate(body).qty == 2
    else:
        with pytest.raises(ValidationError):
            OrderItem.model_validate(body)


def test_stripped_text_is_documented_by_a_pattern_not_by_lengths(doc: dict[str, Any]) -> None:
    name = doc["components"]["schemas"]["Address"]["properties"]["name"]
    assert "maxLength" not in name and "minLength" not in name
    pattern = re.compile(name["pattern"])
    assert pattern.search(" " * 300 + "Ada" + " " * 300)  # accepted: stripped, it is 3 characters
    assert not pattern.search("   ")  # refused: nothing is left
