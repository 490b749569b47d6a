"""The REST gateway against real RabbitMQ, PostgreSQL and a Temporal dev server.

Commands are checked where they land (a test queue bound to `orders.commands`); reads are checked
against rows inserted into the read model and a stand-in `OrderWorkflow` answering the status query.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import httpx
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from shared.contracts import (
    COMMAND_ROUTING_KEYS,
    MAX_ITEMS,
    Actor,
    Address,
    CommandType,
    EventType,
    OrderState,
    OrderStatus,
    PlaceOrder,
    Role,
    Step,
    StepError,
    command_adapter,
)
from shared.lifecycle import ORDER_WORKFLOW, STATUS_QUERY, order_workflow_id
from shared.settings import Settings
from testsupport.amqp import drain, next_message, own_vhost
from testsupport.gateway import bearer, closed_port, gateway
from testsupport.orders import ADDRESS, ITEMS, order_body, unique_id
from testsupport.read_model import insert_events, insert_order


async def command_message(queue: AbstractQueue, command_id: str) -> AbstractIncomingMessage:
    return await next_message(queue, lambda message: message.message_id == command_id)


async def order_in_the_table(sessions: async_sessionmaker[AsyncSession], state: OrderState) -> str:
    """The id of a new order in `state` that only the orders table knows (no workflow, no events)."""
    order_id = unique_id("ord")
    await insert_order(sessions, order_id, state)
    return order_id


# --- fixtures of this file ------------------------------------------------------------------------
OPERATOR = Actor(subject="olivia", roles=frozenset({Role.OPERATOR}))
"""Who the tests of this file are: one who may do everything (test_authorization.py has the others)."""


def as_operator(settings: Settings) -> dict[str, str]:
    return bearer(settings, OPERATOR.subject, *OPERATOR.roles)


@pytest_asyncio.fixture(scope="module")
async def api(
    settings: Settings, db_sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway connected to the test database, vhost and dev server, called by an operator."""
    async with gateway(settings, as_operator(settings)) as client:
        yield client


@pytest_asyncio.fixture(scope="module")
async def api_without_broker(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway with its broker at a port nothing listens on."""
    async with gateway(
        settings.model_copy(update={"amqp_url": f"amqp://guest:guest@127.0.0.1:{closed_port()}/"}),
        as_operator(settings),
    ) as client:
        yield client


@pytest.fixture
def empty_vhost(base_settings: Settings) -> Iterator[Settings]:
    """Settings for a vhost of this test alone, where nothing was declared yet."""
    with own_vhost(base_settings, "orderflow_api_unroutable") as settings:
        yield settings


# --- commands -------------------------------------------------------------------------------------
async def test_place_order_is_published_before_202(
    api: httpx.AsyncClient, command_queue: AbstractQueue
) -> None:
    body = order_body(order_id=unique_id("ord"), correlation_id="checkout-42")

    response = await api.post("/orders", json=body)

    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["order_id"] == body["order_id"]
    assert accepted["status_url"] == f"http://gw/orders/{body['order_id']}"
    message = await command_message(command_queue, accepted["command_id"])
    command = PlaceOrder.model_validate_json(message.body)
    assert str(command.command_id) == accepted["command_id"]
    assert message.routing_key == "order.place"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    assert command.payload.payment_id == body["payment_id"]
    assert command.payload.items[0].unit_price_cents == 1250
    assert command.payload.address.city == "London"
    assert command.correlation_id == "checkout-42"
    assert command.issued_at.tzinfo is not None
    assert command.issued_by == OPERATOR


async def test_place_order_generates_an_order_id(
    api: httpx.AsyncClient, command_queue: AbstractQueue
) -> None:
    response = await api.post("/orders", json=order_body())

    assert response.status_code == 202, response.text
    accepted = response.json()
    command = PlaceOrder.model_validate_json(
        (await command_message(command_queue, accepted["command_id"])).body
    )
    assert command.order_id == accepted["order_id"]
    assert command.order_id.startswith("ord-")


@pytest.mark.parametrize(
    ("change", "location"),
    [
        ({"order_id": "has space"}, ["body", "order_id"]),
        ({"order_id": "x" * 65}, ["body", "order_id"]),
        ({"payment_id": "pay/1"}, ["body", "payment_id"]),
        ({"items": []}, ["body", "items"]),
        ({"items": [{"sku": "A", "qty": 1}] * (MAX_ITEMS + 1)}, ["body", "items"]),
        ({"items": [{"sku": "A", "qty": 0}]}, ["body", "items", 0, "qty"]),
        ({"address": {**ADDRESS, "country": "gbr"}}, ["body", "address", "country"]),
        (
            {"address": {key: value for key, value in ADDRESS.items() if key != "city"}},
            ["body", "address", "city"],
        ),
        ({"address": {**ADDRESS, "name": "   "}}, ["body", "address", "name"]),
        ({"unexpected": True}, ["body", "unexpected"]),
    ],
)
async def test_invalid_orders_are_422_and_not_published(
    api: httpx.AsyncClient, command_queue: AbstractQueue, change: dict[str, Any], location: list[Any]
) -> None:
    response = await api.post("/orders", json=order_body(**change))

    assert response.status_code == 422
    assert location in [error["loc"] for error in response.json()["detail"]]
    assert await drain(command_queue) == []


async def test_invalid_order_id_in_path_is_422(api: httpx.AsyncClient) -> None:
    response = await api.post("/orders/not%20valid/approve")

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["path", "order_id"]


@pytest.mark.parametrize(
    ("action", "body", "command_type", "payload"),
    [
        ("approve", {"note": "looks fine"}, CommandType.APPROVE, {"note": "looks fine"}),
        ("approve", None, CommandType.APPROVE, {"note": None}),
        ("cancel", {"reason": "changed my mind"}, CommandType.CANCEL, {"reason": "changed my mind"}),
        (
            "address",
            {"address": {**ADDRESS, "city": "Oxford"}},
            CommandType.UPDATE_ADDRESS,
            {"address": {**ADDRESS, "city": "Oxford", "line2": None, "region": None}},
        ),
    ],
)
async def test_order_commands_publish_their_type(
    api: httpx.AsyncClient,
    command_queue: AbstractQueue,
    action: str,
    body: dict[str, Any] | None,
    command_type: CommandType,
    payload: dict[str, Any],
) -> None:
    order_id = unique_id("ord")

    response = await api.post(f"/orders/{order_id}/{action}", json=body)

    assert response.status_code == 202, response.text
    assert response.json()["type"] == command_type.value
    message = await command_message(command_queue, response.json()["command_id"])
    command = command_adapter.validate_json(message.body)
    assert (command.type, command.order_id) == (command_type, order_id)
    assert message.routing_key == COMMAND_ROUTING_KEYS[command_type]
    assert command.payload.model_dump(mode="json") == payload
    assert command.issued_by == OPERATOR  # the approver is the token's subject, never a field


async def test_an_approval_cannot_name_its_reviewer(api: httpx.AsyncClient) -> None:
    response = await api.post(f"/orders/{unique_id('ord')}/approve", json={"reviewer": "grace"})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "reviewer"]


async def test_update_address_needs_a_valid_address(api: httpx.AsyncClient) -> None:
    response = await api.post("/orders/ord-1/address", json={"address": {**ADDRESS, "postal_code": ""}})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "address", "postal_code"]


async def test_idempotency_key_gives_a_retry_the_same_command_id(
    api: httpx.AsyncClient, command_queue: AbstractQueue
) -> None:
    headers = {"Idempotency-Key": f"retry-{uuid4()}"}

    first = await api.post("/orders/ord-1/cancel", json={}, headers=headers)
    second = await api.post("/orders/ord-1/cancel", json={}, headers=headers)

    assert first.status_code == second.status_code == 202
    assert first.json()["command_id"] == second.json()["command_id"]
    command_id = first.json()["command_id"]
    await command_message(command_queue, command_id)
    await command_message(command_queue, command_id)  # the retry is published again: the bridge de-duplicates


async def test_command_id_in_the_body_is_kept(api: httpx.AsyncClient, command_queue: AbstractQueue) -> None:
    command_id = uuid4()

    response = await api.post("/orders/ord-1/approve", json={"command_id": str(command_id)})

    assert UUID(response.json()["command_id"]) == command_id
    await command_message(command_queue, str(command_id))


async def test_command_id_and_idempotency_key_must_agree(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/orders/ord-1/approve", json={"command_id": str(uuid4())}, headers={"Idempotency-Key": "other"}
    )

    assert response.status_code == 409
    assert "Idempotency-Key" in response.json()["detail"]


async def test_a_body_that_is_not_utf8_is_400(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/orders", content=b'{"payment_id": "\xff"}', headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["detail"]


async def test_order_item_numbers_are_json_integers(api: httpx.AsyncClient) -> None:
    quantities = [True, "2", 2.5]
    responses = [
        await api.post("/orders", json=order_body(items=[{"sku": "A", "qty": qty}])) for qty in quantities
    ]

    assert [response.status_code for response in responses] == [422, 422, 422]
    accepted = await api.post("/orders", json=order_body(items=[{"sku": "A", "qty": 2.0}]))
    assert accepted.status_code == 202, accepted.text


async def test_commands_are_503_when_the_broker_is_down(api_without_broker: httpx.AsyncClient) -> None:
    place = await api_without_broker.post("/orders", json=order_body())
    cancel = await api_without_broker.post("/orders/ord-1/cancel")

    for response in (place, cancel):
        assert response.status_code == 503
        assert response.json()["detail"].startswith("broker unavailable")
        assert response.headers["Retry-After"]


async def test_an_invalid_command_is_422_even_when_the_broker_is_down(
    api_without_broker: httpx.AsyncClient,
) -> None:
    response = await api_without_broker.post("/orders", json=order_body(items=[]))

    assert response.status_code == 422


async def test_a_command_waits_for_a_bridge_that_never_started(
    empty_vhost: Settings, settings: Settings
) -> None:
    async with gateway(
        settings.model_copy(update={"amqp_url": empty_vhost.amqp_url}), as_operator(settings)
    ) as client:
        response = await client.post("/orders", json=order_body())

    assert response.status_code == 202, response.text
    connection = await aio_pika.connect(empty_vhost.amqp_url)
    async with connection:
        queue = await (await connection.channel()).get_queue(settings.placement_queue)
        waiting = await queue.get(no_ack=True)
    assert waiting.message_id == response.json()["command_id"]


async def test_unroutable_command_is_503(empty_vhost: Settings, settings: Settings) -> None:
    async with gateway(
        settings.model_copy(update={"amqp_url": empty_vhost.amqp_url}), as_operator(settings)
    ) as client:
        # someone deletes the bridge's queue behind the gateway's back
        connection = await aio_pika.connect(empty_vhost.amqp_url)
        async with connection:
            await (await connection.channel()).queue_delete(settings.placement_queue)
        response = await client.post("/orders", json=order_body())

    assert response.status_code == 503
    assert "no queue is bound" in response.json()["detail"]


# --- status ---------------------------------------------------------------------------------------
@workflow.defn(name=ORDER_WORKFLOW)
class StandInOrderWorkflow:
    """Answers the status query with the status it was started with, until it is cancelled."""

    def __init__(self) -> None:
        self._status: OrderStatus | None = None

    @workflow.run
    async def run(self, status: OrderStatus) -> None:
        self._status = status
        await workflow.wait_condition(lambda: False)

    @workflow.query(name=STATUS_QUERY)
    def status(self) -> OrderStatus | None:
        return self._status


async def test_status_comes_from_the_workflow(api: httpx.AsyncClient, temporal_client: Client) -> None:
    order_id = unique_id("ord")
    now = datetime.now(UTC)
    status = OrderStatus(
        order_id=order_id,
        state=OrderState.AWAITING_APPROVAL,
        step=Step.REVIEW,
        address=Address.model_validate(ADDRESS),
        payment_id="pay-1",
        attempts={Step.RECEIVE: 1, Step.VALIDATE: 2},
        recent_errors=[StepError(step=Step.VALIDATE, attempt=1, error="Forced failure for testing", at=now)],
        started_at=now,
        updated_at=now,
    )
    task_queue = f"api-status-{uuid4()}"
    async with Worker(
        temporal_client,
        task_queue=task_queue,
        workflows=[StandInOrderWorkflow],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        handle = await temporal_client.start_workflow(
            ORDER_WORKFLOW, status, id=order_workflow_id(order_id), task_queue=task_queue
        )
        response = await api.get(f"/orders/{order_id}")
        await handle.terminate("test over")

    assert response.status_code == 200, response.text
    view = response.json()
    assert view["source"] == "workflow"
    assert (view["state"], view["step"]) == ("awaiting_approval", "review")
    assert view["attempts"] == {"receive": 1, "validate": 2}
    assert view["recent_errors"][0]["error"] == "Forced failure for testing"
    assert view["address"]["city"] == "London"


async def test_status_falls_back_to_the_orders_table(
    api: httpx.AsyncClient, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_id = await order_in_the_table(db_sessions, OrderState.COMPLETED)

    response = await api.get(f"/orders/{order_id}")

    assert response.status_code == 200, response.text
    view = response.json()
    assert view["source"] == "read_model"
    assert (view["state"], view["step"], view["amount_cents"]) == ("completed", None, 2500)
    assert view["items"] == ITEMS
    assert view["finished_at"] is not None


async def test_status_without_temporal_reads_the_table_or_is_503(
    settings: Settings, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_id = await order_in_the_table(db_sessions, OrderState.PAID)

    async with gateway(
        settings.model_copy(update={"temporal_address": f"127.0.0.1:{closed_port()}"}), as_operator(settings)
    ) as client:
        known = await client.get(f"/orders/{order_id}")
        unknown = await client.get("/orders/never-placed")

    assert known.status_code == 200, known.text
    assert (known.json()["source"], known.json()["state"]) == ("read_model", "paid")
    assert unknown.status_code == 503
    assert unknown.json()["detail"].startswith("temporal unavailable")


async def test_unknown_order_is_404(api: httpx.AsyncClient) -> None:
    for path in ("/orders/never-placed", "/orders/never-placed/events"):
        response = await api.get(path)

        assert response.status_code == 404
        assert "never-placed" in response.json()["detail"]


# --- history and list -----------------------------------------------------------------------------
async def test_history_is_in_seq_order(
    api: httpx.AsyncClient, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_id, other_id = unique_id("ord"), unique_id("ord")
    await insert_events(db_sessions, order_id, {3: EventType.VALIDATED, 1: EventType.RECEIVED})
    await insert_events(db_sessions, other_id, {1: EventType.RECEIVED})
    await insert_events(db_sessions, order_id, {2: EventType.ADDRESS_UPDATED})

    response = await api.get(f"/orders/{order_id}/events")

    assert response.status_code == 200, response.text
    events = response.json()["events"]
    assert [(event["seq"], event["type"]) for event in events] == [
        (1, "received"),
        (2, "address_updated"),
        (3, "validated"),
    ]
    assert {event["order_id"] for event in events} == {order_id}
    assert events[0]["data"] == {"seq_was": 1}


async def test_history_of_an_order_without_events_is_empty(
    api: httpx.AsyncClient, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    order_id = await order_in_the_table(db_sessions, OrderState.RECEIVED)

    response = await api.get(f"/orders/{order_id}/events")

    assert response.status_code == 200
    assert response.json() == {"order_id": order_id, "events": []}


async def test_list_filters_by_state_newest_first_in_pages(
    api: httpx.AsyncClient, db_sessions: async_sessionmaker[AsyncSession]
) -> None:
    # far in the future, so these are the newest orders whatever else the table holds
    start = datetime(2999, 1, 1, tzinfo=UTC)
    shipping = [unique_id("list") for _ in range(3)]
    for minute, order_id in enumerate(shipping):
        await insert_order(db_sessions, order_id, OrderState.SHIPPING, start + timedelta(minutes=minute))
    await insert_order(db_sessions, unique_id("list"), OrderState.PAID, start + timedelta(hours=1))

    first = (await api.get("/orders", params={"state": "shipping", "limit": 2})).json()
    second = (
        await api.get("/orders", params={"state": "shipping", "limit": 2, "cursor": first["next_cursor"]})
    ).json()

    assert [order["order_id"] for order in first["items"]] == [shipping[2], shipping[1]]
    assert second["items"][0]["order_id"] == shipping[0]
    assert {order["state"] for order in first["items"] + second["items"]} == {"shipping"}
    assert first["next_cursor"]


async def test_list_pages_end(api: httpx.AsyncClient, db_sessions: async_sessionmaker[AsyncSession]) -> None:
    await insert_order(db_sessions, unique_id("list"), OrderState.FAILED)

    page = (await api.get("/orders", params={"state": "failed", "limit": 200})).json()

    assert page["items"] and page["next_cursor"] is None


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 201}, {"state": "lost"}, {"cursor": "not-a-cursor"}]
)
async def test_list_rejects_bad_parameters(api: httpx.AsyncClient, params: dict[str, Any]) -> None:
    response = await api.get("/orders", params=params)

    assert response.status_code == 422
    assert response.json()["detail"]


# --- health and docs ------------------------------------------------------------------------------
async def test_healthz_and_readyz(api: httpx.AsyncClient) -> None:
    alive = await api.get("/healthz")
    ready = await api.get("/readyz")

    assert alive.status_code == 200
    assert ready.status_code == 200, ready.text
    assert ready.json()["ready"] is True
    assert {name: check["ok"] for name, check in ready.json()["checks"].items()} == {
        "broker": True,
        "database": True,
        "temporal": True,
    }


async def test_readyz_names_the_broker_when_it_is_down(api_without_broker: httpx.AsyncClient) -> None:
    response = await api_without_broker.get("/readyz")

    assert response.status_code == 503
    readiness = response.json()
    assert readiness["failed"] == ["broker"]
    assert readiness["checks"]["database"]["ok"] and readiness["checks"]["temporal"]["ok"]
    assert readiness["checks"]["broker"]["detail"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/orders", "GET, POST"),
        ("DELETE", "/orders/ord-1", "GET"),
        ("GET", "/orders/ord-1/cancel", "POST"),
    ],
)
async def test_a_method_the_path_lacks_is_405_naming_all_it_has(
    api: httpx.AsyncClient, method: str, path: str, allowed: str
) -> None:
    response = await api.request(method, path)

    assert response.status_code == 405
    assert response.headers["Allow"] == allowed
    assert allowed in response.json()["detail"]


async def test_openapi_documents_the_gateway(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    docs = await api.get("/docs")

    assert docs.status_code == 200
    assert spec["info"]["title"] == "orderflow REST gateway"
    assert {tag["name"] for tag in spec["tags"]} == {"commands", "orders", "health", "codec"}
    assert spec["paths"]["/orders"]["post"]["summary"] == "Place an order"
    assert "202" in spec["paths"]["/orders/{order_id}/cancel"]["post"]["responses"]
    # the Authorize button, and the roles each operation admits
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "orderflow token" in spec["components"]["securitySchemes"]["bearer"]["description"]
    approve = spec["paths"]["/orders/{order_id}/approve"]["post"]
    assert approve["security"] == [{"bearer": ["operator", "reviewer"]}]
    assert {"401", "403"} <= approve["responses"].keys()
    assert "security" not in spec["paths"]["/healthz"]["get"]
