"""Command endpoints: each publishes one contract command to `orders.commands`, answering 202 once
RabbitMQ confirmed it. The caller goes as `issued_by`, which the bridge and the workflow authorize again."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Annotated
from uuid import UUID, uuid4, uuid5

import structlog
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from fastapi import APIRouter, Depends, Header, HTTPException, Request, status

from services.api.auth import AUTH_RESPONSES, Approver, Canceller, Placer, Readdresser
from services.api.connections import ConnectionsDep
from services.api.errors import UNREADABLE_BODY, Responses, documented_error
from services.api.limits import WRITE_LIMIT_RESPONSES
from services.api.schemas import (
    ApproveOrderRequest,
    CancelOrderRequest,
    CommandAccepted,
    CommandOptions,
    OrderIdPath,
    PlaceOrderRequest,
    UpdateAddressRequest,
)
from shared.authorization import refusal
from shared.broker import CommandNotRouted, CommandRefused, publish_command
from shared.contracts import Actor, Command, CommandType, command_adapter
from shared.db import Order
from shared.probes import DependencyUnavailable, describe

# fixed, so one Idempotency-Key maps to one command id in every gateway process, before and after restarts
IDEMPOTENCY_NAMESPACE = UUID("5b0e7c36-5f0c-4a51-9d43-2a8f1f3c8e21")
# what a command request carries besides its payload
ENVELOPE_FIELDS = {*CommandOptions.model_fields, "order_id"}
PUBLISH_TIMEOUT_SECONDS = 5.0

log = structlog.get_logger(__name__)
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


@dataclass(frozen=True)
class CommandSender:
    """What every command route does with its request: check, build, publish, answer 202."""

    request: Request
    connections: ConnectionsDep
    idempotency_key: IdempotencyKey = None

    async def send(
        self, command_type: CommandType, actor: Actor, order_id: str, body: CommandOptions | None
    ) -> CommandAccepted:
        body = body or CommandOptions()  # an approval or cancellation may come without a body
        if command_type is not CommandType.PLACE:  # 403 at once where the orders table names the placer
            async with self.connections.sessions() as session:
                order = await session.get(Order, order_id)
            # whether the order is in review, or exists, is the workflow's to say: the table may lag behind
            reason = None if order is None else refusal(command_type, actor, order.placed_by, in_review=True)
            if reason is not None:
                raise HTTPException(status.HTTP_403_FORBIDDEN, detail=reason)
        command = command_adapter.validate_python(
            {
                "type": command_type,
                "command_id": resolve_command_id(body.command_id, self.idempotency_key),
                "order_id": order_id,
                "issued_at": datetime.now(UTC),
                "correlation_id": body.correlation_id,
                "issued_by": actor,
                "payload": body.model_dump(exclude=ENVELOPE_FIELDS),
            }
        )
        await self.request.app.state.write_limit.check(actor.subject)
        await self.publish(command)
        return CommandAccepted(
            command_id=command.command_id,
            type=command.type,
            order_id=order_id,
            status_url=str(self.request.url_for("order_status", order_id=order_id)),
        )

    async def publish(self, command: Command) -> None:
        """Returns once the broker confirmed `command`; raises a 503 when it did not."""
        logger = log.bind(order_id=command.order_id, command_id=str(command.command_id), type=command.type)
        link = await self.connections.broker.get()
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                await publish_command(link.topology, command)
        except CommandRefused as refused:
            logger.warning("placement refused: backlog full")
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail="too many orders are waiting to start: the placement was not accepted; "
                "retry after the time in Retry-After",
                headers={"Retry-After": str(self.request.app.state.settings.shed_retry_after_seconds)},
            ) from refused
        except (CommandNotRouted, TimeoutError, *CONNECTION_EXCEPTIONS) as error:
            logger.warning("command not accepted", reason=describe(error))
            raise DependencyUnavailable(
                "broker", f"the command was not accepted ({describe(error)})"
            ) from error
        logger.info("command accepted", correlation_id=command.correlation_id)


Sender = Annotated[CommandSender, Depends()]


def resolve_command_id(from_body: UUID | None, idempotency_key: str | None) -> UUID:
    from_key = None
    if idempotency_key:
        try:
            from_key = UUID(idempotency_key)
        except ValueError:
            from_key = uuid5(IDEMPOTENCY_NAMESPACE, idempotency_key)
    if from_body and from_key and from_body != from_key:
        # a conflict, not a validation error: each id alone is valid, but the key stands for another command
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail="command_id and the Idempotency-Key header name different commands: send one of them",
        )
    return from_body or from_key or uuid4()


command_route = partial(router.post, status_code=status.HTTP_202_ACCEPTED, responses=ORDER_COMMAND_RESPONSES)


@command_route(
    "",
    summary="Place an order",
    description="Publishes a `PlaceOrder` command (routing key `order.place`). The order is `queued` "
    "until the bridge admits its lifecycle (at most `max_running_lifecycles` run at once).",
    responses=PLACE_RESPONSES,
)
async def place_order(actor: Placer, body: PlaceOrderRequest, sender: Sender) -> CommandAccepted:
    return await sender.send(CommandType.PLACE, actor, body.order_id or f"ord-{uuid4().hex}", body)


@command_route(
    "/{order_id}/approve",
    summary="Approve an order waiting in manual review",
    description="Publishes an `ApproveOrder` command (routing key `order.approve`). The approver is "
    "the token's subject, who must not be the order's placer (four eyes).",
)
async def approve_order(
    actor: Approver, order_id: OrderIdPath, sender: Sender, body: ApproveOrderRequest | None = None
) -> CommandAccepted:
    return await sender.send(CommandType.APPROVE, actor, order_id, body)


@command_route(
    "/{order_id}/address",
    summary="Change an order's shipping address (until dispatch)",
    description="Publishes an `UpdateAddress` command (routing key `order.update_address`): by the order's "
    "placer or an operator.",
)
async def update_address(
    actor: Readdresser, order_id: OrderIdPath, body: UpdateAddressRequest, sender: Sender
) -> CommandAccepted:
    return await sender.send(CommandType.UPDATE_ADDRESS, actor, order_id, body)


@command_route(
    "/{order_id}/cancel",
    summary="Cancel an order (until dispatch; refunds if it was paid)",
    description="Publishes a `CancelOrder` command (routing key `order.cancel`): by the order's placer, an "
    "operator, or a reviewer while the order is in review.",
)
async def cancel_order(
    actor: Canceller, order_id: OrderIdPath, sender: Sender, body: CancelOrderRequest | None = None
) -> CommandAccepted:
    return await sender.send(CommandType.CANCEL, actor, order_id, body)
