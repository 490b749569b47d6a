"""Order queries: live status (workflow first, then the orders table), history, and the list; a
customer reads only the orders it placed: another's is unknown to it (404), as if it did not exist."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import structlog
from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import and_, or_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select
from temporalio.client import WorkflowExecutionStatus, WorkflowQueryFailedError, WorkflowQueryRejectedError
from temporalio.common import QueryRejectCondition
from temporalio.service import RPCError, RPCStatusCode

from services.api.auth import AUTH_RESPONSES, AnyRole, may_read, readable_by, sees_every_order
from services.api.connections import ConnectionsDep, SessionDep
from services.api.errors import Responses, documented_error
from services.api.schemas import (
    OrderHistory,
    OrderIdPath,
    OrderPage,
    OrderStatusView,
    OrderSummary,
    StatusSource,
)
from shared.contracts import OrderState, OrderStatus, RecordedEvent
from shared.db import AuditEvent, Order
from shared.lifecycle import STATUS_QUERY, order_workflow_id
from shared.probes import DependencyUnavailable, describe

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# exactly the cursors: `<created_at in microseconds since EPOCH>_<order id>` (17 digits reach the year 9999)
CURSOR_PATTERN = r"^[0-9]{1,17}_[A-Za-z0-9._-]{1,64}$"
# bounded so a workflow no worker can answer for falls back to the orders table quickly
STATUS_QUERY_TIMEOUT = timedelta(seconds=2)
# closed through Temporal, not by the workflow: the orders table lacks the ending until reconciled
ENDED_WITHOUT_ITS_CODE = frozenset(
    {WorkflowExecutionStatus.TERMINATED, WorkflowExecutionStatus.TIMED_OUT, WorkflowExecutionStatus.FAILED}
)
# why a status query gets no answer: Temporal cannot be asked, the workflow is missing or closed
NO_WORKFLOW_ANSWER = (
    DependencyUnavailable,
    RPCError,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    TimeoutError,
)

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/orders", tags=["orders"], responses=AUTH_RESPONSES)
NOT_FOUND: Responses = {
    status.HTTP_404_NOT_FOUND: documented_error(
        "Neither Temporal nor the orders table knows the order (or, to a customer, it is another's)."
    )
}


@router.get(
    "/{order_id}",
    summary="An order's live status",
    description="Asks the order's workflow (status query) and, when there is no workflow to ask, "
    "reads the orders table; `source` says which answered.",
    responses={
        **NOT_FOUND,
        status.HTTP_503_SERVICE_UNAVAILABLE: documented_error(
            "Temporal cannot be asked and the orders table has no row for the order.", retry_after=True
        ),
    },
)
async def order_status(
    actor: AnyRole, order_id: OrderIdPath, connections: ConnectionsDep, session: SessionDep
) -> OrderStatusView:
    try:
        client = await connections.temporal.get()
        # one cancelled, terminated or failed through Temporal would answer with the state it was in
        live = await client.get_workflow_handle(order_workflow_id(order_id)).query(
            STATUS_QUERY,
            result_type=OrderStatus,
            rpc_timeout=STATUS_QUERY_TIMEOUT,
            reject_condition=QueryRejectCondition.NOT_COMPLETED_CLEANLY,
        )
    except NO_WORKFLOW_ANSWER as no_answer:
        log.info(
            "workflow did not answer, reading the orders table", order_id=order_id, reason=describe(no_answer)
        )
        view = await status_from_read_model(session, order_id, no_answer)
    else:
        view = OrderStatusView.model_validate({**live.model_dump(), "source": StatusSource.WORKFLOW})
    if not may_read(actor, view.placed_by):
        raise unknown_order(order_id)
    return view


@router.get(
    "/{order_id}/events",
    summary="An order's history",
    description="Every event of the order from the audit table, in `seq` order.",
    responses=NOT_FOUND,
)
async def order_history(actor: AnyRole, order_id: OrderIdPath, session: SessionDep) -> OrderHistory:
    if not await readable_by(session, actor, order_id):
        raise unknown_order(order_id)
    in_seq_order = col(AuditEvent.seq), col(AuditEvent.recorded_at)
    query = select(AuditEvent).where(AuditEvent.order_id == order_id).order_by(*in_seq_order)
    rows = list(await session.scalars(query))
    if not rows and await session.get(Order, order_id) is None:
        raise unknown_order(order_id)
    return OrderHistory(
        order_id=order_id, events=[RecordedEvent.model_validate(row, from_attributes=True) for row in rows]
    )


@router.get(
    "",
    summary="List orders, newest first",
    description="From the orders table (the read model): every order, or to a customer its own.",
)
async def list_orders(
    actor: AnyRole,
    session: SessionDep,
    state: Annotated[OrderState | None, Query(description="Only orders in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Page size.")] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[
        str | None,
        Query(pattern=CURSOR_PATTERN, description="A `next_cursor` from the previous page, as is."),
    ] = None,
) -> OrderPage:
    created_at, order_id = col(Order.created_at), col(Order.id)
    # newest first, the order of the `ix_orders_created_at` index; one more row tells if a page follows
    query = select(Order).order_by(created_at.desc(), order_id).limit(limit + 1)
    if not sees_every_order(actor):
        query = query.where(Order.placed_by == actor.subject)
    if state is not None:
        query = query.where(Order.state == state.value)
    if cursor:  # where the previous page ended: its last order's created_at and id
        micros, after_id = cursor.split("_", 1)
        after = EPOCH + timedelta(microseconds=int(micros))
        query = query.where(or_(created_at < after, and_(created_at == after, order_id > after_id)))
    orders = list(await session.scalars(query))
    return OrderPage(
        items=[OrderSummary.model_validate(order, from_attributes=True) for order in orders[:limit]],
        next_cursor=cursor_after(orders[limit - 1]) if len(orders) > limit else None,
    )


def cursor_after(order: Order) -> str:
    assert order.created_at is not None  # the column is NOT NULL
    return f"{(order.created_at - EPOCH) // timedelta(microseconds=1)}_{order.id}"


async def status_from_read_model(
    session: AsyncSession, order_id: str, no_answer: Exception
) -> OrderStatusView:
    """The orders table's status of the order, whose workflow did not answer (`no_answer` says why)."""
    order = await session.get(Order, order_id)
    if order is None:
        if isinstance(no_answer, RPCError) and no_answer.status == RPCStatusCode.NOT_FOUND:
            raise unknown_order(order_id) from no_answer
        # Temporal could not be asked, so "unknown" would be a guess
        reason = f"{describe(no_answer)}; and the orders table has no row for the order"
        raise DependencyUnavailable("temporal", reason) from no_answer
    view = OrderStatusView.model_validate(
        {
            **order.model_dump(include=set(OrderStatusView.model_fields)),
            "source": StatusSource.READ_MODEL,
            "order_id": order.id,
            "started_at": order.created_at,
            "finished_at": order.updated_at if OrderState(order.state).is_terminal else None,
        }
    )
    closed_as = no_answer.status if isinstance(no_answer, WorkflowQueryRejectedError) else None
    if closed_as in ENDED_WITHOUT_ITS_CODE and not view.state.is_terminal:
        ending = closed_as.name.lower()
        reason = f"the workflow was {ending} through Temporal; the order's ending follows shortly"
        return view.model_copy(update={"state": OrderState.TERMINATED, "reason": reason})
    return view


def unknown_order(order_id: str) -> HTTPException:
    return HTTPException(
        status.HTTP_404_NOT_FOUND,
        detail=f"order {order_id!r} is unknown: no workflow and no row in the orders table",
    )
