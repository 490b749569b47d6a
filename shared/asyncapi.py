"""The AsyncAPI 3.0 document of the broker contract, generated from the contract's models into
`docs/asyncapi.json` (`python -m shared.asyncapi`). Each routing key is a channel whose AMQP binding
(`is: routingKey`) names the exchange: how the AMQP bindings describe a topic exchange."""

from __future__ import annotations

import json
from importlib.metadata import version
from inspect import getdoc

from pydantic import BaseModel, JsonValue
from pydantic.json_schema import JsonSchemaValue, models_json_schema

from shared.broker import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    DeadLetterHeaders,
)
from shared.contracts import (
    COMMAND_ROUTING_KEYS,
    EVENT_DATA,
    EXAMPLE_DATA,
    MAX_ITEMS,
    MAX_QTY,
    ApproveOrder,
    CancelOrder,
    CommandType,
    EventType,
    OrderEvent,
    PlaceOrder,
    UpdateAddress,
)
from shared.json_schema import StrippedTextJsonSchema

Json = dict[str, JsonValue]

AMQP_BINDING_VERSION = "0.3.0"
SCHEMA_REF = "#/components/schemas/{model}"
DURABLE: Json = {"durable": True, "autoDelete": False, "vhost": "/"}

COMMAND_MODELS: list[type[BaseModel]] = [PlaceOrder, ApproveOrder, CancelOrder, UpdateAddress]

INFO_DESCRIPTION = f"""\
orderflow runs each order's lifecycle durably: commands go into the exchange
`{COMMANDS_EXCHANGE}`, the lifecycle's events come out of the exchange `{EVENTS_EXCHANGE}`.
Both are durable topic exchanges; the routing key is `order.<command>` or `order.<event>`.

Bounds (enforced, and stated in the schemas): an order id, payment id or SKU is 1 to 64
letters, digits, `.`, `_` or `-`; an order has 1 to {MAX_ITEMS} items of quantity 1 to {MAX_QTY};
a country is an ISO 3166-1 alpha-2 code. Unknown fields are rejected."""

COMMAND_DESCRIPTION = f"""\
Publish to the durable topic exchange `{COMMANDS_EXCHANGE}` with routing key `order.<command>`,
`content_type=application/json`, persistent delivery (`delivery_mode=2`) and
`message_id` = the body's `command_id`. The body's `type` names the command and is required.

Placements (`order.place`) go to a bounded queue: when the backlog of orders waiting to start is
full, the broker refuses the publish with a negative confirm (`basic.nack`), so use publisher
confirms. A refused placement was not accepted at all; an accepted one is never failed for lack of
capacity. The other commands are never held up behind waiting placements.

Authorized: set the message's `user_id` to your broker user (RabbitMQ refuses a publish whose
`user_id` is not the connection's user, so it identifies the publisher for certain). Each broker
user holds the roles orderflow's configuration grants it (`ORDERFLOW_AMQP_PUBLISHER_ROLES`); a
command without `user_id`, from a user without the command's role, or naming another issuer in
`issued_by` (only delegates such as the REST gateway may) is rejected with reason `forbidden`
and changes nothing.

Idempotent: the same `command_id` delivered twice has one effect. A command that cannot apply
produces an `order.command_rejected` event naming its `command_id` and the reason. A message that
is not valid JSON, fails validation, or keeps failing goes to the dead-letter queue
`{DEAD_LETTER_QUEUE}` with the reason in its headers: it is never dropped and never redelivered
forever."""

EVENT_DESCRIPTION = f"""\
Published to the durable topic exchange `{EVENTS_EXCHANGE}` with routing key `order.<type>`,
persistent, with `message_id` = the body's `event_id`. Bind a queue of your own (`order.#` for
every event).

`seq` counts 1, 2, 3, ... per order with no gaps, so a subscriber can order and de-duplicate an
order's events. `seq` 0 marks a `command_rejected` for an order that has no running lifecycle
(unknown or already ended); it stands outside that sequence.

Delivery is at least once: the same `event_id` may arrive twice, and it never means that two
things happened."""

DEAD_LETTER_DESCRIPTION = f"""\
Every message a consumer gave up on. The durable topic exchange `{DEAD_LETTER_EXCHANGE}` routes it by
its original routing key into this durable classic queue (bound with `#`). Body, content_type,
message_id, correlation_id and type are the original ones; the headers say why. Nothing is
redelivered from here automatically."""


def build_asyncapi() -> Json:
    channels, operations, messages = _channels_operations_messages()
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "orderflow", "version": version("orderflow"), "description": INFO_DESCRIPTION},
        "servers": {
            "local": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "title": "RabbitMQ",
                "description": "A local broker (virtual host `/`); orderflow's services use the "
                "one that ORDERFLOW_AMQP_URL names.",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": _schemas(),
            "messages": messages,
            "messageTraits": {"command": _trait(COMMAND_DESCRIPTION), "event": _trait(EVENT_DESCRIPTION)},
            "correlationIds": {
                "correlationId": {
                    "description": "Optional id chosen by the client to tie related messages "
                    "together; also sent as the AMQP `correlation_id` property.",
                    "location": "$message.payload#/correlation_id",
                }
            },
            "channelBindings": {
                "commands": _topic_exchange(COMMANDS_EXCHANGE),
                "events": _topic_exchange(EVENTS_EXCHANGE),
                "deadLetter": _amqp(
                    {"is": "queue", "queue": {"name": DEAD_LETTER_QUEUE, "exclusive": False, **DURABLE}}
                ),
            },
            "operationBindings": {
                "persistent": _amqp({"deliveryMode": 2}),
                "persistent_timestamped": _amqp({"deliveryMode": 2, "timestamp": True}),
            },
        },
    }


def _channels_operations_messages() -> tuple[Json, Json, Json]:
    """A channel, an operation and a message for each command, each event type and dead letters."""
    channels: Json = {}
    operations: Json = {}
    messages: Json = {}
    for model in COMMAND_MODELS:
        name = model.__name__  # a command's model is named as its type
        key = COMMAND_ROUTING_KEYS[CommandType(name)]
        messages[name] = _message(name, name, _summary(model), _ref(name), "command", name)
        channels[key] = _channel(key, name, name, "commands")
        operations[f"send.{key}"] = _operation("send", key, name, f"Send a {name} command.", "persistent")
    for event in EventType:
        key, name, model = event.routing_key, f"OrderEvent.{event.value}", EVENT_DATA[event]
        summary = _summary(model) + (" Terminal: the lifecycle has ended." if event.is_terminal else "")
        narrowed: Json = {"properties": {"type": {"const": event.value}, "data": _ref(model.__name__)}}
        payload: Json = {"allOf": [_ref("OrderEvent"), narrowed]}
        messages[name] = _message(name, f"Order {event.value}", summary, payload, "event", event.value)
        channels[key] = _channel(key, name, f"Order {event.value}", "events")
        operations[f"receive.{key}"] = _operation(
            "receive", key, name, f"Receive `{event.value}` events.", "persistent_timestamped"
        )
    messages["DeadLetter"] = {
        "name": "DeadLetter",
        "title": "Dead letter",
        "summary": "A message that a consumer gave up on, with the reason in its headers.",
        "headers": _ref(DeadLetterHeaders.__name__),
        "payload": {"description": "The original body, unchanged; it may not even be JSON."},
    }
    channels[DEAD_LETTER_QUEUE] = _channel(DEAD_LETTER_QUEUE, "DeadLetter", "Dead letter", "deadLetter") | {
        "description": DEAD_LETTER_DESCRIPTION
    }
    operations[f"receive.{DEAD_LETTER_QUEUE}"] = _operation(
        "receive",
        DEAD_LETTER_QUEUE,
        "DeadLetter",
        "Operators inspect (and, if they choose, republish) messages that were given up on.",
    )
    return channels, operations, messages


def _summary(model: type[BaseModel]) -> str:
    """The model's docstring, on one line."""
    return " ".join((getdoc(model) or "").split())


def _ref(model: str) -> Json:
    return {"$ref": SCHEMA_REF.format(model=model)}


def _channel(address: str, message: str, title: str, bindings: str) -> Json:
    """A channel carrying one message (defined under components and referred to from here)."""
    return {
        "address": address,
        "title": title,
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
        "bindings": {"$ref": f"#/components/channelBindings/{bindings}"},
    }


def _message(name: str, title: str, summary: str, payload: Json, trait: str, amqp_type: str) -> Json:
    return {
        "name": name,
        "title": title,
        "summary": summary,
        "payload": payload,
        "traits": [{"$ref": f"#/components/messageTraits/{trait}"}],
        # the AMQP `type` property that orderflow's publishers set
        "bindings": _amqp({"messageType": amqp_type}),
    }


def _operation(action: str, channel: str, message: str, summary: str, bindings: str | None = None) -> Json:
    operation: Json = {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
        "summary": summary,
    }
    if bindings:
        operation["bindings"] = {"$ref": f"#/components/operationBindings/{bindings}"}
    return operation


def _schemas() -> Json:
    """The models' JSON schemas, each under its own name, referring to each other by `$ref`."""
    models: list[type[BaseModel]] = [*COMMAND_MODELS, OrderEvent, DeadLetterHeaders]
    _, top = models_json_schema(
        [(model, "validation") for model in models],
        ref_template=SCHEMA_REF,
        schema_generator=StrippedTextJsonSchema,
    )
    schemas: JsonSchemaValue = top["$defs"]
    for event, example in EXAMPLE_DATA.items():
        schemas[EVENT_DATA[event].__name__]["examples"] = [example.model_dump(mode="json")]
    # commands are parsed as a union discriminated by `type`: on the wire it is required
    for model in COMMAND_MODELS:
        schemas[model.__name__]["required"].append("type")
    return schemas


def _trait(description: str) -> Json:
    return {
        "contentType": "application/json",
        "description": description,
        "correlationId": {"$ref": "#/components/correlationIds/correlationId"},
    }


def _topic_exchange(name: str) -> Json:
    """The binding of channels whose address is a routing key on this exchange."""
    return _amqp({"is": "routingKey", "exchange": {"name": name, "type": "topic", **DURABLE}})


def _amqp(binding: Json) -> Json:
    return {"amqp": {**binding, "bindingVersion": AMQP_BINDING_VERSION}}


def to_json(document: Json) -> str:
    """The committed form: sorted keys, two-space indent, one trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(to_json(build_asyncapi()), end="")
