"""Order queries: live status (workflow first, then the orders table), history, and the list.

A reviewer or operator reads every order; a customer only those it placed, and another's order is
unknown to it (404), as if it did not exist.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import structlog
from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy.ext.asyncio import AsyncSession
from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.common import QueryRejectCondition
from temporalio.service import RPCError, RPCStatusCode

from services.api import read_model
from services.api.auth import AUTH_RESPONSES, AnyRole, may_read, sees_every_order
from services.api.connections import Connections, DependencyUnavailable, describe
from services.api.dependencies import ConnectionsDep, OrderIdPath, SessionDep
from services.api.errors import Responses, documented_error
from services.api.read_model import CURSOR_PATTERN, Cursor
from services.api.schemas import (
    OrderHistory,
    OrderPage,
    OrderStatusView,
    OrderSummary,
    StatusSource,
)
from shared.contracts import OrderState, OrderStatus, RecordedEvent
from shared.db import Order
from shared.lifecycle import STATUS_QUERY, order_workflow_id

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# bounded so a workflow no worker can answer for falls back to the orders table quickly
STATUS_QUERY_TIMEOUT = timedelta(seconds=2)

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
        live = await query_workflow_status(connections, order_id)
    except NoWorkflowAnswer as no_answer:
        log.info(
            "workflow did not answer, reading the orders table", order_id=order_id, reason=no_answer.reason
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
    if not await read_model.readable_by(session, actor, order_id):
        raise unknown_order(order_id)
    rows = await read_model.order_events(session, order_id)
    if not rows and await read_model.find_order(session, order_id) is None:
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
    after = Cursor.decode(cursor) if cursor else None
    placed_by = None if sees_every_order(actor) else actor.subject
    orders, next_cursor = await read_model.list_orders(session, state, limit, after, placed_by)
    return OrderPage(
        items=[summary_from_row(order) for order in orders],
        next_cursor=next_cursor.encode() if next_cursor else None,
    )


# closed without the workflow's own ending: until the workers' reconciler has written it, the
# orders table still shows where the lifecycle was
ENDED_WITHOUT_ITS_CODE = frozenset(
    {WorkflowExecutionStatus.TERMINATED, WorkflowExecutionStatus.TIMED_OUT, WorkflowExecutionStatus.FAILED}
)


class NoWorkflowAnswer(Exception):
    """The status query got no answer: the workflow is missing, closed other than by completing
    (`closed_as`), or Temporal could not be asked."""

    def __init__(
        self, reason: str, workflow_missing: bool, closed_as: WorkflowExecutionStatus | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.workflow_missing = workflow_missing
        self.closed_as = closed_as


async def query_workflow_status(connections: Connections, order_id: str) -> OrderStatus:
    """The workflow's own status; raises `NoWorkflowAnswer` saying whether the workflow is missing."""
    try:
        client = await connections.temporal.get()
        handle = client.get_workflow_handle(order_workflow_id(order_id))
        # a workflow that was cancelled, terminated or failed through Temporal would answer with
        # the state it was in; the orders table has its ending
        live: OrderStatus = await handle.query(
            STATUS_QUERY,
            result_type=OrderStatus,
            rpc_timeout=STATUS_QUERY_TIMEOUT,
            reject_condition=QueryRejectCondition.NOT_COMPLETED_CLEANLY,
        )
        return live
    except (
        DependencyUnavailable,
        RPCError,
        WorkflowQueryFailedError,
        WorkflowQueryRejectedError,
        TimeoutError,
    ) as error:
        missing = isinstance(error, RPCError) and error.status == RPCStatusCode.NOT_FOUND
        closed_as = error.status if isinstance(error, WorkflowQueryRejectedError) else None
        raise NoWorkflowAnswer(describe(error), missing, closed_as) from error


async def status_from_read_model(
    session: AsyncSession, order_id: str, no_answer: NoWorkflowAnswer
) -> OrderStatusView:
    order = await read_model.find_order(session, order_id)
    if order is not None:
        view = status_from_row(order)
        if no_answer.closed_as in ENDED_WITHOUT_ITS_CODE and not view.state.is_terminal:
            closed_as = no_answer.closed_as.name.lower()
            reason = f"the workflow was {closed_as} through Temporal; the order's ending follows shortly"
            return view.model_copy(update={"state": OrderState.TERMINATED, "reason": reason})
        return view
    if no_answer.workflow_missing:
        raise unknown_order(order_id) from no_answer
    # Temporal could not be asked, so "unknown" would be a guess
    raise DependencyUnavailable(
        "temporal", f"{no_answer.reason}; and the orders table has no row for the order"
    ) from no_answer


def status_from_row(order: Order) -> OrderStatusView:
    state = OrderState(order.state)
    return OrderStatusView.model_validate(
        {
            "source": StatusSource.READ_MODEL,
            "order_id": order.id,
            "state": state,
            "address": order.address,
            "payment_id": order.payment_id,
            "items": order.items,
            "amount_cents": order.amount_cents,
            "reason": order.reason,
            "tracking_number": order.tracking_number,
            "placed_by": order.placed_by,
            "approved_by": order.approved_by,
            "started_at": order.created_at,
            "updated_at": order.updated_at,
            "finished_at": order.updated_at if state.is_terminal else None,
        }
    )


def summary_from_row(order: Order) -> OrderSummary:
    return OrderSummary.model_validate(
        {**order.model_dump(include=set(OrderSummary.model_fields)), "order_id": order.id}
    )


def unknown_order(order_id: str) -> HTTPException:
    return HTTPException(
        status.HTTP_404_NOT_FOUND,
        detail=f"order {order_id!r} is unknown: no workflow and no row in the orders table",
    )
