"""The AsyncAPI 3.0 document of orderflow's broker contract, generated from `shared.contracts`.

`docs/asyncapi.json` is this module's output (`python -m shared.asyncapi > docs/asyncapi.json`);
`tests/test_asyncapi.py` fails when the two differ, so the document cannot drift from the models.
Each routing key is one channel whose address is the routing key and whose AMQP binding
(`is: routingKey`) names the exchange, which is how the AMQP bindings describe a topic exchange.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared.broker import (
    COMMANDS_EXCHANGE,
    CONSUMER_HEADER,
    DEAD_LETTER_EXCHANGE,
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

Doc = dict[str, Any]

AMQP_BINDING_VERSION = "0.3.0"
SCHEMA_REF = "#/components/schemas/{model}"

COMMAND_MODELS: dict[CommandType, type[BaseModel]] = {
    CommandType.PLACE: PlaceOrder,
    CommandType.APPROVE: ApproveOrder,
    CommandType.CANCEL: CancelOrder,
    CommandType.UPDATE_ADDRESS: UpdateAddress,
}

COMMAND_SUMMARIES: dict[CommandType, str] = {
    CommandType.PLACE: "Place a new order. It is `queued` until the bridge admits its lifecycle "
    "(at most ORDERFLOW_MAX_RUNNING_LIFECYCLES run at once); its 15 seconds count from then. "
    "Placements wait durably in the broker, up to ORDERFLOW_PLACEMENT_BACKLOG_LIMIT of them: past "
    "that the broker answers the publish with a negative confirm (basic.nack), the order is refused "
    "and nothing was accepted; retry later with the same command_id. Placing an order id that "
    "already exists starts no second lifecycle.",
    CommandType.APPROVE: "Approve an order that waits for manual review (sent while the order is "
    "queued, it applies when review comes). Needs the reviewer or operator role, and never from "
    "the order's own placer (four eyes); the approver is the verified issuer, not a body field.",
    CommandType.CANCEL: "Cancel an order. Accepted until dispatch; after payment it is refunded. A "
    "queued order is cancelled before it starts. From its placer, an operator, or a reviewer while "
    "the order is in review.",
    CommandType.UPDATE_ADDRESS: "Change the shipping address. Accepted until dispatch (for a queued "
    "order, it applies as the lifecycle starts). From its placer or an operator.",
}

EVENT_SUMMARIES: dict[EventType, str] = {
    EventType.QUEUED: "The placement was accepted and waits for admission (seq 1). `data.queued_at` "
    "says since when, `data.placed_by` who placed it.",
    EventType.ADMITTED: "The lifecycle started: its 15 seconds count from here. `data` carries "
    "`queued_at` and `admission_wait_seconds`.",
    EventType.RECEIVED: "The order was recorded; `data.placed_by` says who placed it.",
    EventType.VALIDATED: "The order passed validation.",
    EventType.AWAITING_APPROVAL: "The order waits for an ApproveOrder. The review window is "
    "bounded (ORDERFLOW_REVIEW_WINDOW_SECONDS); when it ends without approval the order is "
    "cancelled with reason review_timeout.",
    EventType.APPROVED: "A reviewer approved the order: `data.approved_by` is the verified "
    "subject that sent the approval, `data.note` its note.",
    EventType.PAYMENT_CHARGED: "The payment was charged (once per payment_id).",
    EventType.SHIPPING_STARTED: "Shipping started.",
    EventType.PACKAGE_PREPARED: "The package was prepared.",
    EventType.CARRIER_DISPATCHED: "A carrier took the package.",
    EventType.DISPATCH_FAILED: "A dispatch failed; shipping is retried a bounded number of times.",
    EventType.SHIPPED: "The order was marked shipped.",
    EventType.COMPLETED: "The lifecycle finished successfully.",
    EventType.ADDRESS_UPDATED: "The shipping address changed.",
    EventType.CANCELLED: "The order was cancelled; `data` says whether a refund was made "
    "(`refunded`) and, for an order cancelled while queued, `admitted: false`.",
    EventType.FAILED: "The lifecycle failed; `data` carries the reason.",
    EventType.TERMINATED: "The order's workflow was terminated through Temporal (or timed out or "
    "failed there), so none of its own code ran at the end. Written by the reconciler: `data` "
    "carries the `reason` (with the termination's reason), `workflow_status`, whether the payment "
    "had been `charged`, and whether it was `refunded` (every charge is).",
    EventType.COMMAND_REJECTED: "A command could not apply (for example a cancel after shipment, "
    "or an approve of an unknown order); `command_id` names it and `data` carries the reason. "
    "Reason `forbidden`: its issuer may not send it (`data.detail` says why); nothing was applied.",
}

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


def build_asyncapi() -> Doc:
    document: Doc = {
        "asyncapi": "3.0.0",
        "info": {
            "title": "orderflow",
            "version": version("orderflow"),
            "description": INFO_DESCRIPTION,
        },
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
        "channels": {},
        "operations": {},
        "components": _components(),
    }
    _add_commands(document)
    _add_events(document)
    _add_dead_letters(document)
    return document


def _add_commands(document: Doc) -> None:
    for command, model in COMMAND_MODELS.items():
        key, name = COMMAND_ROUTING_KEYS[command], command.value
        payload = {"$ref": SCHEMA_REF.format(model=model.__name__)}
        message = _message(name, name, COMMAND_SUMMARIES[command], payload, "command", name)
        _add_channel(document, key, "commands", name, message)
        document["operations"][f"send.{key}"] = _operation(
            "send", key, name, f"Send a {name} command.", "persistent"
        )


def _add_events(document: Doc) -> None:
    for event in EventType:
        key, name = event.routing_key, f"OrderEvent.{event.value}"
        summary = EVENT_SUMMARIES[event]
        if event.is_terminal:
            summary += " Terminal: the lifecycle has ended."
        # the envelope, with this type and its payload model as `data`
        data = {"$ref": SCHEMA_REF.format(model=EVENT_DATA[event].__name__)}
        payload = {
            "allOf": [
                {"$ref": SCHEMA_REF.format(model="OrderEvent")},
                {"properties": {"type": {"const": event.value}, "data": data}},
            ]
        }
        message = _message(name, f"Order {event.value}", summary, payload, "event", event.value)
        _add_channel(document, key, "events", name, message)
        document["operations"][f"receive.{key}"] = _operation(
            "receive", key, name, f"Receive `{event.value}` events.", "persistent_timestamped"
        )


def _add_dead_letters(document: Doc) -> None:
    message = {
        "name": "DeadLetter",
        "title": "Dead letter",
        "summary": "A message that a consumer gave up on, with the reason in its headers.",
        "headers": {"$ref": SCHEMA_REF.format(model="DeadLetterHeaders")},
        "payload": {"description": "The original body, unchanged; it may not even be JSON."},
    }
    _add_channel(document, DEAD_LETTER_QUEUE, "deadLetter", "DeadLetter", message)
    document["channels"][DEAD_LETTER_QUEUE]["description"] = (
        f"Every message a consumer gave up on. The durable topic exchange `{DEAD_LETTER_EXCHANGE}` "
        f"routes it by its original routing key into this durable quorum queue (bound with `#`). "
        f"Body, content_type, message_id, correlation_id and type are the original ones; the "
        f"headers say why. Nothing is redelivered from here automatically."
    )
    document["operations"][f"receive.{DEAD_LETTER_QUEUE}"] = _operation(
        "receive",
        DEAD_LETTER_QUEUE,
        "DeadLetter",
        "Operators inspect (and, if they choose, republish) messages that were given up on.",
    )


def _add_channel(document: Doc, address: str, bindings: str, name: str, message: Doc) -> None:
    """A channel carrying one message (defined under components and referred to from here)."""
    document["components"]["messages"][name] = message
    document["channels"][address] = {
        "address": address,
        "title": message["title"],
        "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        "bindings": {"$ref": f"#/components/channelBindings/{bindings}"},
    }


def _message(name: str, title: str, summary: str, payload: Doc, trait: str, amqp_type: str) -> Doc:
    return {
        "name": name,
        "title": title,
        "summary": summary,
        "payload": payload,
        "traits": [{"$ref": f"#/components/messageTraits/{trait}"}],
        # the AMQP `type` property that orderflow's publishers set
        "bindings": {"amqp": {"messageType": amqp_type, "bindingVersion": AMQP_BINDING_VERSION}},
    }


def _operation(action: str, channel: str, message: str, summary: str, bindings: str | None = None) -> Doc:
    operation: Doc = {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
        "summary": summary,
    }
    if bindings:
        operation["bindings"] = {"$ref": f"#/components/operationBindings/{bindings}"}
    return operation


def _components() -> Doc:
    return {
        "schemas": _schemas(),
        "messages": {},
        "messageTraits": {
            "command": _trait(COMMAND_DESCRIPTION),
            "event": _trait(EVENT_DESCRIPTION),
        },
        "correlationIds": {
            "correlationId": {
                "description": "Optional id chosen by the client to tie related messages "
                "together; also sent as the AMQP `correlation_id` property.",
                "location": "$message.payload#/correlation_id",
            }
        },
        "channelBindings": {
            "commands": _exchange_binding(COMMANDS_EXCHANGE),
            "events": _exchange_binding(EVENTS_EXCHANGE),
            "deadLetter": _queue_binding(DEAD_LETTER_QUEUE),
        },
        "operationBindings": {
            "persistent": _amqp({"deliveryMode": 2}),
            "persistent_timestamped": _amqp({"deliveryMode": 2, "timestamp": True}),
        },
    }


def _schemas() -> Doc:
    """The models' JSON schemas, each under its own name, referring to each other by `$ref`."""
    models: list[type[BaseModel]] = [*COMMAND_MODELS.values(), OrderEvent]
    _, top = models_json_schema(
        [(model, "validation") for model in models],
        ref_template=SCHEMA_REF,
        schema_generator=StrippedTextJsonSchema,
    )
    schemas: Doc = top["$defs"]
    for event, example in EXAMPLE_DATA.items():
        schemas[EVENT_DATA[event].__name__]["examples"] = [example.model_dump(mode="json")]
    # Each command model defaults its `type`, but commands are parsed as a union discriminated by
    # `type`, so on the wire it must be present.
    for model in COMMAND_MODELS.values():
        schemas[model.__name__]["required"].append("type")
    schemas["DeadLetterHeaders"] = {
        "type": "object",
        "description": "The original message's headers, plus why a consumer gave up on it.",
        "properties": {
            REASON_HEADER: {
                "type": "string",
                "description": "Why: the body was not valid JSON, failed validation, or kept "
                "failing (was delivered too many times).",
            },
            ERROR_HEADER: {"type": "string", "description": "The error text (truncated)."},
            CONSUMER_HEADER: {
                "type": "string",
                "description": "The consumer that gave up, such as the bridge or the audit consumer.",
            },
            DELIVERIES_HEADER: {
                "type": "integer",
                "minimum": 1,
                "description": "How many times the consumer had received the message when it gave up.",
            },
            EXCHANGE_HEADER: {
                "type": "string",
                "description": "The exchange the message was first published to, where a replay "
                "sends it back (the message's own exchange is now the dead-letter exchange). "
                "Absent on messages dead-lettered before orderflow set it.",
            },
        },
        "required": [REASON_HEADER, ERROR_HEADER, CONSUMER_HEADER, DELIVERIES_HEADER],
        "additionalProperties": True,
    }
    return schemas


def _trait(description: str) -> Doc:
    return {
        "contentType": "application/json",
        "description": description,
        "correlationId": {"$ref": "#/components/correlationIds/correlationId"},
    }


def _exchange_binding(exchange: str) -> Doc:
    return _amqp(
        {
            "is": "routingKey",
            "exchange": {
                "name": exchange,
                "type": "topic",
                "durable": True,
                "autoDelete": False,
                "vhost": "/",
            },
        }
    )


def _queue_binding(queue: str) -> Doc:
    return _amqp(
        {
            "is": "queue",
            "queue": {
                "name": queue,
                "durable": True,
                "exclusive": False,
                "autoDelete": False,
                "vhost": "/",
            },
        }
    )


def _amqp(binding: Doc) -> Doc:
    return {"amqp": {**binding, "bindingVersion": AMQP_BINDING_VERSION}}


def to_json(document: Doc) -> str:
    """The committed form: sorted keys, two-space indent, one trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    print(to_json(build_asyncapi()), end="")


if __name__ == "__main__":
    main()
