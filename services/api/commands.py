"""Command endpoints: each builds one contract command and publishes it to `orders.commands`.

A 202 means RabbitMQ confirmed the command (publisher confirms, mandatory routing); anything less is
a 503 and nothing was published, so a client may retry, ideally with the same command id.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from uuid import UUID, uuid4, uuid5

from fastapi import APIRouter, Header, HTTPException, Request, status

from services.api.dependencies import OrderIdPath, PublisherDep
from services.api.errors import UNREADABLE_BODY, Responses, documented_error
from services.api.publishing import CommandPublisher
from services.api.schemas import (
    ApproveOrderRequest,
    CancelOrderRequest,
    CommandAccepted,
    CommandOptions,
    PlaceOrderRequest,
    UpdateAddressRequest,
)
from shared.contracts import (
    ApproveOrder,
    ApproveOrderPayload,
    CancelOrder,
    CancelOrderPayload,
    Command,
    Model,
    PlaceOrder,
    PlaceOrderPayload,
    UpdateAddress,
    UpdateAddressPayload,
)

# fixed, so one Idempotency-Key maps to one command id in every gateway process, before and after restarts
IDEMPOTENCY_NAMESPACE = UUID("5b0e7c36-5f0c-4a51-9d43-2a8f1f3c8e21")

PayloadT = TypeVar("PayloadT", bound=Model)

router = APIRouter(prefix="/orders", tags=["commands"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=200,
        description="A client's retry key: the same key gives the same command id (a UUID key is "
        "used as the command id as is).",
    ),
]
COMMAND_RESPONSES: Responses = {
    **UNREADABLE_BODY,
    status.HTTP_409_CONFLICT: documented_error(
        "`command_id` and the `Idempotency-Key` header name different commands: send one of them "
        "(or both naming the same command)."
    ),
    status.HTTP_503_SERVICE_UNAVAILABLE: documented_error(
        "The broker did not confirm the command; retry, with the same command id.", retry_after=True
    ),
}
PLACE_RESPONSES: Responses = {
    **COMMAND_RESPONSES,
    status.HTTP_503_SERVICE_UNAVAILABLE: documented_error(
        "Not accepted, nothing published: the broker did not confirm the command, or the backlog of "
        "orders waiting to start is full (shed at the door). Retry after `Retry-After` seconds, with "
        "the same command id.",
        retry_after=True,
    ),
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Place an order",
    description="Publishes a `PlaceOrder` command (routing key `order.place`). The order is `queued` "
    "until the bridge admits its lifecycle (at most `max_running_lifecycles` run at once).",
    responses=PLACE_RESPONSES,
)
async def place_order(
    body: PlaceOrderRequest, request: Request, publisher: PublisherDep, idempotency_key: IdempotencyKey = None
) -> CommandAccepted:
    order_id = body.order_id or f"ord-{uuid4().hex}"
    command = PlaceOrder(
        **envelope(order_id, body, idempotency_key), payload=payload_of(body, PlaceOrderPayload)
    )
    return await accept(command, publisher, request)


@router.post(
    "/{order_id}/approve",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Approve an order waiting in manual review",
    description="Publishes an `ApproveOrder` command (routing key `order.approve`).",
    responses=COMMAND_RESPONSES,
)
async def approve_order(
    order_id: OrderIdPath,
    request: Request,
    publisher: PublisherDep,
    body: ApproveOrderRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> CommandAccepted:
    body = body or ApproveOrderRequest()  # the body is optional: nothing to say but "approved"
    command = ApproveOrder(
        **envelope(order_id, body, idempotency_key), payload=payload_of(body, ApproveOrderPayload)
    )
    return await accept(command, publisher, request)


@router.post(
    "/{order_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Cancel an order (until dispatch; refunds if it was paid)",
    description="Publishes a `CancelOrder` command (routing key `order.cancel`).",
    responses=COMMAND_RESPONSES,
)
async def cancel_order(
    order_id: OrderIdPath,
    request: Request,
    publisher: PublisherDep,
    body: CancelOrderRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> CommandAccepted:
    body = body or CancelOrderRequest()  # the body is optional: a reason is not required
    command = CancelOrder(
        **envelope(order_id, body, idempotency_key), payload=payload_of(body, CancelOrderPayload)
    )
    return await accept(command, publisher, request)


@router.post(
    "/{order_id}/address",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Change an order's shipping address (until dispatch)",
    description="Publishes an `UpdateAddress` command (routing key `order.update_address`).",
    responses=COMMAND_RESPONSES,
)
async def update_address(
    order_id: OrderIdPath,
    body: UpdateAddressRequest,
    request: Request,
    publisher: PublisherDep,
    idempotency_key: IdempotencyKey = None,
) -> CommandAccepted:
    command = UpdateAddress(
        **envelope(order_id, body, idempotency_key), payload=payload_of(body, UpdateAddressPayload)
    )
    return await accept(command, publisher, request)


def envelope(order_id: str, body: CommandOptions, idempotency_key: str | None) -> dict[str, Any]:
    """The fields every command shares, from the request and the time it arrived."""
    return {
        "command_id": resolve_command_id(body.command_id, idempotency_key),
        "order_id": order_id,
        "issued_at": datetime.now(UTC),
        "correlation_id": body.correlation_id,
    }


def payload_of(body: CommandOptions, payload_type: type[PayloadT]) -> PayloadT:
    return payload_type.model_validate(body.model_dump(include=set(payload_type.model_fields)))


def resolve_command_id(from_body: UUID | None, idempotency_key: str | None) -> UUID:
    from_key = command_id_for_key(idempotency_key) if idempotency_key else None
    if from_body and from_key and from_body != from_key:
        # a conflict, not a validation error: each id alone is valid, but the key stands for another command
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail="command_id and the Idempotency-Key header name different commands: send one of them",
        )
    return from_body or from_key or uuid4()


def command_id_for_key(key: str) -> UUID:
    try:
        return UUID(key)
    except ValueError:
        return uuid5(IDEMPOTENCY_NAMESPACE, key)


async def accept(command: Command, publisher: CommandPublisher, request: Request) -> CommandAccepted:
    await publisher.publish(command)
    return CommandAccepted(
        command_id=command.command_id,
        type=command.type,
        order_id=command.order_id,
        status_url=str(request.url_for("order_status", order_id=command.order_id)),
    )
