"""Command endpoints: each builds one contract command and publishes it to `orders.commands`.

A 202 means RabbitMQ confirmed the command (publisher confirms, mandatory routing); anything less is
a 503 and nothing was published, so a client may retry, ideally with the same command id. Each
command carries its caller as `issued_by` (from the bearer token), which the bridge and the workflow
authorize again against the order.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, TypedDict, TypeVar
from uuid import UUID, uuid4, uuid5

from fastapi import APIRouter, Header, HTTPException, Request, status
from sqlalchemy.ext.asyncio import AsyncSession

from services.api import read_model
from services.api.auth import AUTH_RESPONSES, Approver, Canceller, Placer, Readdresser
from services.api.dependencies import OrderIdPath, PublisherDep, SessionDep
from services.api.errors import UNREADABLE_BODY, Responses, documented_error
from services.api.limits import WRITE_LIMIT_RESPONSES, count_write
from services.api.publishing import CommandPublisher
from services.api.schemas import (
    ApproveOrderRequest,
    CancelOrderRequest,
    CommandAccepted,
    CommandOptions,
    PlaceOrderRequest,
    UpdateAddressRequest,
)
from shared.authorization import refusal
from shared.contracts import (
    Actor,
    ApproveOrder,
    ApproveOrderPayload,
    CancelOrder,
    CancelOrderPayload,
    Command,
    CommandType,
    Model,
    PlaceOrder,
    PlaceOrderPayload,
    UpdateAddress,
    UpdateAddressPayload,
)

# fixed, so one Idempotency-Key maps to one command id in every gateway process, before and after restarts
IDEMPOTENCY_NAMESPACE = UUID("5b0e7c36-5f0c-4a51-9d43-2a8f1f3c8e21")

PayloadT = TypeVar("PayloadT", bound=Model)
CommandT = TypeVar("CommandT", PlaceOrder, ApproveOrder, CancelOrder, UpdateAddress)

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
    **AUTH_RESPONSES,
    **WRITE_LIMIT_RESPONSES,
    status.HTTP_409_CONFLICT: documented_error(
        "`command_id` and the `Idempotency-Key` header name different commands: send one of them "
        "(or both naming the same command)."
    ),
    status.HTTP_503_SERVICE_UNAVAILABLE: documented_error(
        "The broker did not confirm the command; retry, with the same command id.", retry_after=True
    ),
}
ORDER_COMMAND_RESPONSES: Responses = {
    **COMMAND_RESPONSES,
    status.HTTP_403_FORBIDDEN: documented_error(
        "The token holds none of the roles this needs, or the order is known and its caller may "
        "not steer it: nobody approves an order they placed, a customer steers only its own orders."
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
    actor: Placer,
    body: PlaceOrderRequest,
    request: Request,
    publisher: PublisherDep,
    idempotency_key: IdempotencyKey = None,
) -> CommandAccepted:
    order_id = body.order_id or f"ord-{uuid4().hex}"
    command = command_of(PlaceOrder, PlaceOrderPayload, order_id, body, idempotency_key, actor)
    return await accept(command, publisher, request)


@router.post(
    "/{order_id}/approve",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Approve an order waiting in manual review",
    description="Publishes an `ApproveOrder` command (routing key `order.approve`). The approver is "
    "the token's subject, who must not be the order's placer (four eyes).",
    responses=ORDER_COMMAND_RESPONSES,
)
async def approve_order(
    actor: Approver,
    order_id: OrderIdPath,
    request: Request,
    publisher: PublisherDep,
    session: SessionDep,
    body: ApproveOrderRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> CommandAccepted:
    await refuse_early(session, CommandType.APPROVE, actor, order_id)
    body = body or ApproveOrderRequest()  # the body is optional: nothing to say but "approved"
    command = command_of(ApproveOrder, ApproveOrderPayload, order_id, body, idempotency_key, actor)
    return await accept(command, publisher, request)


@router.post(
    "/{order_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Cancel an order (until dispatch; refunds if it was paid)",
    description="Publishes a `CancelOrder` command (routing key `order.cancel`): by the order's "
    "placer, an operator, or a reviewer while the order is in review.",
    responses=ORDER_COMMAND_RESPONSES,
)
async def cancel_order(
    actor: Canceller,
    order_id: OrderIdPath,
    request: Request,
    publisher: PublisherDep,
    session: SessionDep,
    body: CancelOrderRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> CommandAccepted:
    await refuse_early(session, CommandType.CANCEL, actor, order_id)
    body = body or CancelOrderRequest()  # the body is optional: a reason is not required
    command = command_of(CancelOrder, CancelOrderPayload, order_id, body, idempotency_key, actor)
    return await accept(command, publisher, request)


@router.post(
    "/{order_id}/address",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Change an order's shipping address (until dispatch)",
    description="Publishes an `UpdateAddress` command (routing key `order.update_address`): by the "
    "order's placer or an operator.",
    responses=ORDER_COMMAND_RESPONSES,
)
async def update_address(
    actor: Readdresser,
    order_id: OrderIdPath,
    body: UpdateAddressRequest,
    request: Request,
    publisher: PublisherDep,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> CommandAccepted:
    await refuse_early(session, CommandType.UPDATE_ADDRESS, actor, order_id)
    command = command_of(UpdateAddress, UpdateAddressPayload, order_id, body, idempotency_key, actor)
    return await accept(command, publisher, request)


async def refuse_early(session: AsyncSession, command_type: CommandType, actor: Actor, order_id: str) -> None:
    """403 at once where the orders table already names the order's placer (four eyes; a customer
    steers only its own orders). Whether it is in review is left to the workflow: the table may lag
    behind it. An order the table lacks yet is decided by the bridge or the workflow."""
    order = await read_model.find_order(session, order_id)
    if order is None:
        return
    reason = refusal(command_type, actor, order.placed_by, in_review=True)
    if reason is not None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=reason)


class Envelope(TypedDict):
    command_id: UUID
    order_id: str
    issued_at: datetime
    correlation_id: str | None
    issued_by: Actor


def envelope(order_id: str, body: CommandOptions, idempotency_key: str | None, actor: Actor) -> Envelope:
    """The fields every command shares, from the request, its caller and the time it arrived."""
    return {
        "command_id": resolve_command_id(body.command_id, idempotency_key),
        "order_id": order_id,
        "issued_at": datetime.now(UTC),
        "correlation_id": body.correlation_id,
        "issued_by": actor,
    }


def command_of(
    command_type: type[CommandT],
    payload_type: type[Model],
    order_id: str,
    body: CommandOptions,
    idempotency_key: str | None,
    actor: Actor,
) -> CommandT:
    """The command a request stands for: the envelope every command shares, the body's payload."""
    return command_type.model_validate(
        {**envelope(order_id, body, idempotency_key, actor), "payload": payload_of(body, payload_type)}
    )


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
    assert command.issued_by is not None  # every route sets it from the token
    await count_write(request, command.issued_by.subject)
    await publisher.publish(command)
    return CommandAccepted(
        command_id=command.command_id,
        type=command.type,
        order_id=command.order_id,
        status_url=str(request.url_for("order_status", order_id=command.order_id)),
    )
